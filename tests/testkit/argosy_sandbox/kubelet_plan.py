"""What the sandbox's kubelet stand-in runs for a container (pure: no I/O, no clock, no processes).

The pod runner (podrunner.py) asks this module which program stands in for a container
image, with which argv and environment, how to probe it, how long to back off after a
crash, and what the pod's status then says. Everything here takes plain values (the pod
as a dict, already-fetched Secret and ConfigMap data) so it is table-tested on its own.

Substitutions are kept to what this machine cannot do otherwise, and every one is
listed in docs/sandbox.md:

- a container's network namespace: a pod's wildcard address (``0.0.0.0``) is its pod IP,
  so a server told to listen on ``0.0.0.0`` listens on the pod IP here, and vLLM (which
  listens on every address by default) gets ``--host <pod IP>``;
- the vLLM image: the CPU build of vLLM runs the pod's own ``vllm serve`` arguments, with
  the model argument pointing at the sandbox's stand-in model (no model hub here) and
  the flags that only make sense for the real weights or a GPU adjusted (see
  ``vllm_serve_args``); or the vLLM simulator, where a test chose speed over truth;
- Argosy's images: the project's own entry points from the virtualenv, authenticated with a
  token of the pod's ServiceAccount through a kubeconfig file (the in-cluster token path
  is fixed, so it cannot differ per pod on one machine).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

# The label/annotation a test (or a newcomer) sets to pick what serves a vLLM pod.
BACKEND_KEY = "sandbox.argosy.dev/vllm"
# none: Running and Ready with no process, as kwok does for unknown images (scale tests that count objects).
Backend = Literal["real", "simulator", "none"]
BACKENDS: tuple[Backend, ...] = ("real", "simulator", "none")
DEFAULT_BACKEND: Backend = "simulator"

ImageKind = Literal["vllm", "argosy-operator", "argosy-gateway"]
_IMAGE_PATTERNS: tuple[tuple[ImageKind, re.Pattern[str]], ...] = (
    ("vllm", re.compile(r"^(docker\.io/)?vllm/vllm-openai([:@]|$)")),
    ("argosy-operator", re.compile(r"(^|/)argosy-operator([:@]|$)")),
    ("argosy-gateway", re.compile(r"(^|/)argosy-gateway([:@]|$)")),
)
# The same rule as a jq test for kwok's stage selectors (kwok must leave these pods to the runner).
KNOWN_IMAGES_REGEX = (
    r"^(docker\.io/)?vllm/vllm-openai([:@]|$)|(^|/)argosy-(operator|gateway)([:@]|$)"
)

# Environment markers on every container process: `sandbox down` finds leftovers by them.
STATE_ENV = "ARGOSY_SANDBOX_STATE"
POD_UID_ENV = "ARGOSY_SANDBOX_POD_UID"
VLLM_SERVED_NAME_LABEL = "argosy.dev/deployment"
WILDCARD_ADDRESS = "0.0.0.0"
# vLLM's default --master-port (torch.distributed's customary store port).
DEFAULT_MASTER_PORT = "29500"
# The Dockerfiles' entry points (images/*/Dockerfile): ENTRYPOINT and CMD.
ENTRY_POINTS: Mapping[ImageKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "argosy-operator": (("argosy-operator",), ("run",)),
    "argosy-gateway": (("argosy-gateway",), ("--host=0.0.0.0", "--port=8000")),
    "vllm": (("vllm",), ("serve",)),
}

# Shortened CrashLoopBackOff: the kubelet starts at 10 s and caps at 5 min.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 20.0
# A container that ran this long without exiting resets the backoff, as the kubelet does.
BACKOFF_RESET_AFTER_SECONDS = 60.0


class ContainerConfigError(ValueError):
    """The container cannot start as specified (the kubelet's CreateContainerConfigError)."""


def image_kind(image: str) -> ImageKind | None:
    """Which known program an image stands for; None for images the sandbox cannot run."""
    for kind, pattern in _IMAGE_PATTERNS:
        if pattern.search(image):
            return kind
    return None


def runs_containers(pod: Mapping[str, Any]) -> bool:
    """True when the runner owns the pod: it has at least one container of a known image."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return any(image_kind(str(container.get("image", ""))) for container in containers)


# -- $(VAR) expansion, as the kubelet does it ---------------------------------------------------

def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined references are replaced, ``$$`` is a literal ``$``,
    and references to undefined variables are left as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and i + 1 < len(text):
            following = text[i + 1]
            if following == "$":
                out.append("$")
                i += 2
                continue
            if following == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    if name in variables:
                        out.append(variables[name])
                    else:
                        out.append(text[i:end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


# -- environment ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PodFacts:
    """What fieldRef and downward-API lookups read from the pod."""

    name: str
    namespace: str
    uid: str
    pod_ip: str
    node_name: str
    service_account: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodFacts:
        metadata = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        return cls(
            name=str(metadata.get("name", "")),
            namespace=str(metadata.get("namespace", "")),
            uid=str(metadata.get("uid", "")),
            pod_ip=str(status.get("podIP", "")),
            node_name=str(spec.get("nodeName", "")),
            service_account=str(spec.get("serviceAccountName") or "default"),
            labels=dict(metadata.get("labels") or {}),
            annotations=dict(metadata.get("annotations") or {}),
        )


def _field_ref(path: str, facts: PodFacts) -> str:
    simple = {
        "metadata.name": facts.name,
        "metadata.namespace": facts.namespace,
        "metadata.uid": facts.uid,
        "status.podIP": facts.pod_ip,
        "status.podIPs": facts.pod_ip,
        "status.hostIP": "127.0.0.1",
        "spec.nodeName": facts.node_name,
        "spec.serviceAccountName": facts.service_account,
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        source = facts.labels if match.group(1) == "labels" else facts.annotations
        return source.get(match.group(2), "")
    raise ContainerConfigError(f"fieldRef {path!r} is not supported by the sandbox")


Lookup = Callable[[str, str], "Mapping[str, str] | None"]
"""(kind, name) -> the object's data (Secret data decoded), or None when it does not exist."""


def _key_ref(kind: str, ref: Mapping[str, Any], lookup: Lookup) -> str | None:
    name, key = str(ref.get("name", "")), str(ref.get("key", ""))
    optional = bool(ref.get("optional", False))
    data = lookup(kind, name)
    if data is None or key not in data:
        if optional:
            return None
        what = f"{kind} {name!r}" if data is None else f"key {key!r} in {kind} {name!r}"
        raise ContainerConfigError(f"{what} not found")
    return data[key]


def container_env(container: Mapping[str, Any], facts: PodFacts, lookup: Lookup) -> dict[str, str]:
    """The container's environment: envFrom first, then env in order, with ``$(VAR)`` expansion."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix", ""))
        for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            ref = source.get(field)
            if ref is None:
                continue
            data = lookup(kind, str(ref.get("name", "")))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f"{kind} {ref.get('name')!r} not found")
            env.update({prefix + key: value for key, value in data.items()})
    for item in container.get("env") or []:
        name = str(item["name"])
        value_from = item.get("valueFrom")
        if value_from is None:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        value: str | None
        if "fieldRef" in value_from:
            value = _field_ref(str(value_from["fieldRef"]["fieldPath"]), facts)
        elif "secretKeyRef" in value_from:
            value = _key_ref("Secret", value_from["secretKeyRef"], lookup)
        elif "configMapKeyRef" in value_from:
            value = _key_ref("ConfigMap", value_from["configMapKeyRef"], lookup)
        elif "resourceFieldRef" in value_from:
            value = "0"
        else:
            raise ContainerConfigError(f"env {name}: valueFrom {sorted(value_from)} is not supported")
        if value is not None:
            env[name] = value
    return env


def container_argv(container: Mapping[str, Any], kind: ImageKind, env: Mapping[str, str]) -> list[str]:
    """command/args as the kubelet combines them with the image's ENTRYPOINT/CMD, then expanded."""
    entrypoint, cmd = ENTRY_POINTS[kind]
    command = container.get("command")
    args = container.get("args")
    argv = [*command, *(args or [])] if command else [*entrypoint, *(args if args is not None else cmd)]
    return [expand(str(part), env) for part in argv]


# -- volumes ----------------------------------------------------------------------------------

def volume_refs(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, name) of the ConfigMaps and Secrets behind the container's mounted volumes."""
    mounted = {str(m.get("name")) for m in container.get("volumeMounts") or []}
    refs = []
    for volume in pod_spec.get("volumes") or []:
        if volume.get("name") not in mounted:
            continue
        if "configMap" in volume:
            refs.append(("ConfigMap", str(volume["configMap"].get("name", ""))))
        elif "secret" in volume:
            refs.append(("Secret", str(volume["secret"].get("secretName", ""))))
    return refs


def mounted_files(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup
) -> dict[str, dict[str, str]]:
    """mountPath -> {relative path: content} for the container's ConfigMap and Secret volumes.

    Other volume kinds (emptyDir, PVCs, ...) are not materialised; their paths stay as written.
    """
    volumes = {str(v.get("name")): v for v in pod_spec.get("volumes") or []}
    mounts: dict[str, dict[str, str]] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(str(mount.get("name"))) or {}
        if "configMap" in volume:
            kind, source = "ConfigMap", volume["configMap"]
            name = str(source.get("name", ""))
        elif "secret" in volume:
            kind, source = "Secret", volume["secret"]
            name = str(source.get("secretName", ""))
        else:
            continue
        data = lookup(kind, name)
        if data is None:
            if source.get("optional"):
                continue
            raise ContainerConfigError(f"volume {mount.get('name')!r}: {kind} {name!r} not found")
        items = source.get("items")
        if items:
            missing = [i["key"] for i in items if i["key"] not in data]
            if missing and not source.get("optional"):
                raise ContainerConfigError(f"volume {mount.get('name')!r}: keys {missing} not in {kind} {name!r}")
            files = {str(i["path"]): data[i["key"]] for i in items if i["key"] in data}
        else:
            files = dict(data)
        if mount.get("subPath"):
            sub = str(mount["subPath"])
            files = {"": files[sub]} if sub in files else {}
        mounts[str(mount["mountPath"])] = files
    return mounts


def rewrite_mount_paths(text: str, local: Mapping[str, str]) -> str:
    """A path under a mounted volume's mountPath (also as ``--flag=path``) points at the volume's local copy."""
    head, sep, value = text.partition("=") if text.startswith("-") else ("", "", text)
    for mount_path, directory in sorted(local.items(), key=lambda item: -len(item[0])):
        root = mount_path.rstrip("/")
        if value == root or value.startswith(root + "/"):
            return head + sep + directory + value[len(root):]
    return text


# -- the vLLM image ----------------------------------------------------------------------------

def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value of a flag that takes one or more values (``--served-model-name a b``)."""
    values: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag:
            index += 1
            while index < len(args) and not args[index].startswith("-"):
                values.append(args[index])
                index += 1
            continue
        index += 1
    return values


def _drop_flag(args: list[str], flag: str) -> bool:
    """Remove ``flag value`` or ``flag=value`` in place; True when it was there."""
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            del args[index]
            return True
        if arg == flag:
            del args[index:index + 2]
            return True
    return False


def _set_flag(args: list[str], flag: str, value: str) -> None:
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            args[index] = f"{flag}={value}"
            return
        if arg == flag and index + 1 < len(args):
            args[index + 1] = value
            return
    args += [flag, value]


def split_vllm_serve(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``vllm serve`` (the model first), or None when argv is not ``vllm serve``."""
    if len(argv) >= 2 and argv[0].rsplit("/", 1)[-1] == "vllm" and argv[1] == "serve":
        return list(argv[2:])
    return None


@dataclasses.dataclass(frozen=True)
class VllmServe:
    args: list[str]
    """What follows ``vllm serve`` in the process's command line."""
    substitutions: list[str]
    """Human-readable list of what was changed, for the container's log."""


# Flags that describe the real weights or a GPU and would fail on the stand-in model.
_DROPPED_FLAGS = {
    "--quantization": "the stand-in model's weights are not quantized",
    "--revision": "a hub revision; the stand-in model is a local directory",
    "--load-format": "the stand-in model is plain safetensors on local disk",
}
_ONE_ON_CPU = {
    "--tensor-parallel-size": "one CPU process per pod: the pod's simulated GPUs are not real devices",
    "--pipeline-parallel-size": "one CPU process per pod: the pod's simulated GPUs are not real devices",
}


def vllm_serve_args(serve_args: Sequence[str], pod_ip: str, model_dir: str) -> VllmServe:
    """The pod's ``vllm serve`` arguments for the CPU build and the stand-in model.

    Kept as written: every other flag, in order (served names, --max-model-len, --port,
    --gpu-memory-utilization, --dtype, --kv-cache-dtype, pass-through args). Changed: the
    model (the first argument) becomes the stand-in model's directory; --quantization,
    --revision and --load-format are dropped; tensor/pipeline parallel sizes above 1 become
    1, except in a group member (``--nnodes`` above 1), whose layout every member shares;
    ``--host`` is the pod IP (vLLM listens on every address by default).
    """
    if not serve_args or serve_args[0].startswith("-"):
        raise ContainerConfigError("vllm serve needs the model as its first argument")
    args = list(serve_args)
    notes = [f"model {args[0]!r} -> the stand-in model {model_dir}"]
    args[0] = model_dir
    for flag, why in _DROPPED_FLAGS.items():
        value = _flag_value(args, flag)
        if value is not None and _drop_flag(args, flag):
            notes.append(f"dropped {flag} {value} ({why})")
    for flag, why in _ONE_ON_CPU.items():
        value = _flag_value(args, flag)
        if value is not None and value != "1" and not is_group_member(args):
            _set_flag(args, flag, "1")
            notes.append(f"{flag} {value} -> 1 ({why})")
    host = _flag_value(args, "--host")
    if host in (None, WILDCARD_ADDRESS, "", "::"):
        _set_flag(args, "--host", pod_ip)
        notes.append(f"--host {pod_ip} (the pod IP: a pod's wildcard address)")
    return VllmServe(args=args, substitutions=notes)


def served_model_names(serve_args: Sequence[str]) -> list[str]:
    names = _flag_values(serve_args, "--served-model-name")
    return names or ([serve_args[0]] if serve_args else [])


def simulator_args(serve_args: Sequence[str], pod_ip: str) -> list[str]:
    """Arguments of ``argosy-vllm-sim`` standing in for ``vllm serve`` (names, port, max length,
    and what SIGTERM does: ``--shutdown-timeout``)."""
    argv = ["--host", pod_ip, "--port", _flag_value(serve_args, "--port") or "8000"]
    for name in served_model_names(serve_args):
        argv += ["--model", name]
    for flag in ("--max-model-len", "--shutdown-timeout"):
        value = _flag_value(serve_args, flag)
        if value:
            argv += [flag, value]
    if is_group_member(serve_args):
        return [*argv, *_simulator_group_args(serve_args)]
    return argv


def is_group_member(serve_args: Sequence[str]) -> bool:
    """True for one member of a replica that spans nodes (``--nnodes`` above 1)."""
    nnodes = _flag_value(serve_args, "--nnodes")
    return nnodes is not None and nnodes.isdigit() and int(nnodes) > 1


def _simulator_group_args(serve_args: Sequence[str]) -> list[str]:
    """A group's leader waits for its members on the master port; a headless member holds a
    connection to it instead of serving HTTP (what vLLM's torch.distributed ranks do)."""
    address = _flag_value(serve_args, "--master-addr")
    port = _flag_value(serve_args, "--master-port") or DEFAULT_MASTER_PORT
    if "--headless" in serve_args:
        if not address:
            raise ContainerConfigError("a headless group member needs --master-addr (its leader)")
        return ["--headless", "--leader", f"{address}:{port}"]
    return ["--group-size", str(_flag_value(serve_args, "--nnodes")), "--group-port", port]


def choose_backend(
    pod_annotations: Mapping[str, str],
    owner_annotations: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    default: str = DEFAULT_BACKEND,
) -> Backend:
    """Real vLLM or the simulator for a vLLM pod: the pod's annotation, else its LLMDeployment's,
    else its namespace's label, else the sandbox default."""
    for source, where in (
        (pod_annotations, "pod annotation"),
        (owner_annotations, "LLMDeployment annotation"),
        (namespace_labels, "namespace label"),
    ):
        value = source.get(BACKEND_KEY)
        if value is None:
            continue
        if value not in BACKENDS:
            raise ContainerConfigError(f"{where} {BACKEND_KEY}={value!r}: use one of {', '.join(BACKENDS)}")
        return _backend(value)
    if default not in BACKENDS:
        raise ContainerConfigError(f"sandbox default {BACKEND_KEY}={default!r}: use one of {', '.join(BACKENDS)}")
    return _backend(default)


def _backend(value: str) -> Backend:
    return "real" if value == "real" else "none" if value == "none" else "simulator"


# -- the vLLM image's shell scripts (replicas that span nodes) ------------------------------------

# The programs a script of the vLLM image may call by name; the runner puts stand-ins for them first
# on the container's PATH (image_tools).
IMAGE_TOOLS = ("vllm", "python3")
_SHELLS = ("sh", "bash")
# What the `vllm` stand-in reads (image_vllm.py): set by the runner on the container's environment.
IMAGE_BACKEND_ENV = "ARGOSY_SANDBOX_VLLM_BACKEND"
IMAGE_POD_IP_ENV = "ARGOSY_SANDBOX_POD_IP"
IMAGE_MODEL_DIR_ENV = "ARGOSY_SANDBOX_MODEL_DIR"
IMAGE_VLLM_COMMAND_ENV = "ARGOSY_SANDBOX_VLLM_COMMAND"
IMAGE_SIMULATOR_ENV = "ARGOSY_SANDBOX_SIMULATOR"
# NCCL and Gloo open their sockets on these interfaces; pods here share the loopback interface.
SOCKET_IFNAME_VARIABLES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
SANDBOX_INTERFACE = "lo"
CLUSTER_DOMAIN = "cluster.local"
# A name under a cluster DNS zone: <...>.svc or <...>.svc.cluster.local.
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_CLUSTER_NAME = re.compile(rf"(?<![-.a-z0-9])(?:{_LABEL}\.)+svc(?:\.{re.escape(CLUSTER_DOMAIN)})?(?![-.a-z0-9])")


def is_shell_script(argv: Sequence[str]) -> bool:
    """``sh -c SCRIPT [NAME ARGS...]`` (what a group's pods run)."""
    return len(argv) >= 3 and argv[0].rsplit("/", 1)[-1] in _SHELLS and argv[1] == "-c"


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_dns_records(pods: Sequence[Mapping[str, Any]], services: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The pod names cluster DNS would answer: ``<hostname>.<subdomain>.<ns>.svc[.cluster.local]`` -> pod IP.

    As Kubernetes' DNS specification has it: a pod with ``spec.hostname`` and ``spec.subdomain``
    (a StatefulSet's pods) has a name when a headless Service of that name in its namespace
    selects it, and is Ready or the Service publishes not-ready addresses.
    """
    headless = {
        (str(meta.get("namespace", "")), str(meta.get("name", ""))): spec
        for service in services
        for meta, spec in [(service.get("metadata") or {}, service.get("spec") or {})]
        if spec.get("clusterIP") == "None"
    }
    records: dict[str, str] = {}
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        namespace, hostname, subdomain = str(meta.get("namespace", "")), spec.get("hostname"), spec.get("subdomain")
        service = headless.get((namespace, str(subdomain)))
        ip = status.get("podIP")
        if not (hostname and service is not None and ip) or meta.get("deletionTimestamp"):
            continue
        if not _selects(service.get("selector") or {}, meta.get("labels") or {}):
            continue
        if not (service.get("publishNotReadyAddresses") or _pod_ready(pod)):
            continue
        name = f"{hostname}.{subdomain}.{namespace}.svc"
        records[name] = records[f"{name}.{CLUSTER_DOMAIN}"] = str(ip)
    return records


class NameNotResolved(ContainerConfigError):
    """A cluster DNS name in the container's command or environment has no address (yet)."""


def resolve_cluster_names(text: str, records: Mapping[str, str]) -> str:
    """Every cluster DNS name in ``text`` replaced by its address (the sandbox has no cluster DNS).

    A name without a record raises NameNotResolved rather than reaching this machine's resolver:
    the container fails to start and is retried with backoff, as a process whose lookup fails is.
    """
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(0)
        if name not in records:
            missing.append(name)
            return name
        return records[name]

    resolved = _CLUSTER_NAME.sub(replace, text)
    if missing:
        raise NameNotResolved(
            f"cannot resolve {', '.join(sorted(set(missing)))}: the sandbox resolves the names of pods "
            "behind a headless Service once they have an IP (see docs/sandbox.md)")
    return resolved


def resolve_command(command: Sequence[str], records: Mapping[str, str]) -> list[str] | None:
    """An exec probe's or hook's command with cluster names resolved as at the container's start;
    None when a name has no address (the command fails, as its lookup would)."""
    try:
        return [resolve_cluster_names(part, records) for part in command]
    except NameNotResolved:
        return None


@dataclasses.dataclass(frozen=True)
class ScriptLaunch:
    argv: list[str]
    env: dict[str, str]
    notes: list[str]
    names: dict[str, str]
    """The cluster names resolved for this start (exec probes and hooks resolve with them too)."""


def script_launch(argv: Sequence[str], env: Mapping[str, str], records: Mapping[str, str]) -> ScriptLaunch:
    """A vLLM image's shell script as written, with what stands in for cluster DNS and the pod network:
    cluster names resolved to pod IPs in argv and env, and NCCL's and Gloo's socket interface the
    loopback interface the pods share."""
    resolved_argv = [resolve_cluster_names(part, records) for part in argv]
    resolved_env = {name: resolve_cluster_names(value, records) for name, value in env.items()}
    notes = ["the vLLM image's shell script runs as written; `vllm` and `python3` on its PATH are the sandbox's"]
    names = sorted({m.group(0) for part in [*argv, *env.values()] for m in _CLUSTER_NAME.finditer(part)})
    notes += [f"{name} -> {records[name]} (the sandbox has no cluster DNS)" for name in names]
    for variable in SOCKET_IFNAME_VARIABLES:
        value = resolved_env.get(variable)
        if value is not None and value != SANDBOX_INTERFACE:
            resolved_env[variable] = SANDBOX_INTERFACE
            notes.append(f"{variable} {value} -> {SANDBOX_INTERFACE} (pods share this machine's loopback interface)")
    return ScriptLaunch(argv=resolved_argv, env=resolved_env, notes=notes, names=dict(records))


@dataclasses.dataclass(frozen=True)
class ImageVllm:
    """What the sandbox's `vllm` program (image_vllm.py) stands in with, for one container."""

    backend: Backend
    pod_ip: str
    simulator: str
    """The argosy-vllm-sim executable."""
    model_dir: str = ""
    vllm_command: tuple[str, ...] = ()
    """The CPU runtime's `vllm` argv prefix (real backend)."""

    def env(self) -> dict[str, str]:
        return {
            IMAGE_BACKEND_ENV: self.backend,
            IMAGE_POD_IP_ENV: self.pod_ip,
            IMAGE_SIMULATOR_ENV: self.simulator,
            IMAGE_MODEL_DIR_ENV: self.model_dir,
            IMAGE_VLLM_COMMAND_ENV: json.dumps(list(self.vllm_command)),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImageVllm:
        try:
            return cls(
                backend=_backend(env[IMAGE_BACKEND_ENV]), pod_ip=env[IMAGE_POD_IP_ENV],
                simulator=env[IMAGE_SIMULATOR_ENV], model_dir=env.get(IMAGE_MODEL_DIR_ENV, ""),
                vllm_command=tuple(json.loads(env.get(IMAGE_VLLM_COMMAND_ENV) or "[]")),
            )
        except KeyError as missing:
            raise ContainerConfigError(
                f"the sandbox's vllm runs only inside a sandbox pod ({missing} not set)") from None


def image_tools(python3: str, sandbox_python: str) -> dict[str, str]:
    """The stand-ins for the vLLM image's programs: file name -> shell script."""
    return {
        "vllm": f'#!/bin/sh\nexec {shlex.quote(sandbox_python)} -m argosy_sandbox.image_vllm "$@"\n',
        "python3": f'#!/bin/sh\nexec {shlex.quote(python3)} "$@"\n',
    }


def image_vllm_exec(argv: Sequence[str], image: ImageVllm) -> VllmServe:
    """What the image's ``vllm ARGS`` runs: the CPU runtime's vLLM on the stand-in model, or the simulator.

    ``args`` is the full argv to exec (program first)."""
    serve = list(argv[1:]) if argv and argv[0] == "serve" else None
    if image.backend == "simulator":
        if serve is None:
            raise ContainerConfigError(
                f"the vLLM simulator stands in for `vllm serve` only, not `vllm {' '.join(argv)}`")
        note = f"the vLLM simulator stands in for `vllm serve` ({BACKEND_KEY}=simulator)"
        return VllmServe(args=[image.simulator, *simulator_args(serve, image.pod_ip)], substitutions=[note])
    if not image.vllm_command:
        raise ContainerConfigError("the vLLM CPU runtime's command is not set")
    if serve is None:
        return VllmServe(args=[*image.vllm_command, *argv], substitutions=[])
    real = vllm_serve_args(serve, image.pod_ip, image.model_dir)
    notes = ["vLLM's CPU build runs this `vllm serve`", *real.substitutions]
    return VllmServe(args=[*image.vllm_command, "serve", *real.args], substitutions=notes)


# -- Argosy's own images -------------------------------------------------------------------------

def bind_to_pod_ip(argv: Sequence[str], pod_ip: str) -> list[str]:
    """``--host=0.0.0.0`` style arguments listen on the pod IP (a pod's wildcard address)."""
    return [arg.replace(WILDCARD_ADDRESS, pod_ip) if arg.endswith(WILDCARD_ADDRESS) else arg for arg in argv]


def argosy_env(kind: ImageKind, pod_ip: str, kubeconfig: str) -> dict[str, str]:
    """What stands in for the pod's ServiceAccount mount and network namespace."""
    env = {"KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
    if kind == "argosy-gateway":
        env["ARGOSY_GATEWAY_KUBECONFIG"] = kubeconfig
    if kind == "argosy-operator":
        env["ARGOSY_OPERATOR_METRICS_HOST"] = pod_ip
    return env


def token_kubeconfig(server: str, ca_data: str, token: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": user}}],
        "current-context": "sandbox",
    }


# -- probes ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Probe:
    kind: Literal["httpGet", "tcpSocket", "exec", "grpc"]
    host: str
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def _port(value: Any, container: Mapping[str, Any]) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    for port in container.get("ports") or []:
        if port.get("name") == text:
            return int(port["containerPort"])
    raise ContainerConfigError(f"probe port {text!r} is not a named port of container {container.get('name')!r}")


def parse_probe(spec: Mapping[str, Any] | None, container: Mapping[str, Any], pod_ip: str) -> Probe | None:
    if not spec:
        return None
    timing = {
        "initial_delay": float(spec.get("initialDelaySeconds", 0)),
        "period": float(spec.get("periodSeconds", 10)),
        "timeout": float(spec.get("timeoutSeconds", 1)),
        "success_threshold": int(spec.get("successThreshold", 1)),
        "failure_threshold": int(spec.get("failureThreshold", 3)),
    }
    if "httpGet" in spec:
        get = spec["httpGet"]
        headers = tuple((str(h["name"]), str(h["value"])) for h in get.get("httpHeaders") or [])
        return Probe("httpGet", str(get.get("host") or pod_ip), _port(get["port"], container),
                     path=str(get.get("path") or "/"), scheme=str(get.get("scheme") or "HTTP"),
                     headers=headers, **timing)  # type: ignore[arg-type]
    if "tcpSocket" in spec:
        sock = spec["tcpSocket"]
        return Probe("tcpSocket", str(sock.get("host") or pod_ip), _port(sock["port"], container),
                     **timing)  # type: ignore[arg-type]
    if "exec" in spec:
        return Probe("exec", pod_ip, 0, command=tuple(str(c) for c in spec["exec"].get("command") or ()),
                     **timing)  # type: ignore[arg-type]
    if "grpc" in spec:
        return Probe("grpc", pod_ip, int(spec["grpc"]["port"]), **timing)  # type: ignore[arg-type]
    raise ContainerConfigError(f"probe {sorted(spec)} has no handler the sandbox knows")


# -- termination (a pod with a deletionTimestamp) ---------------------------------------------

# The API's default for spec.terminationGracePeriodSeconds.
DEFAULT_TERMINATION_GRACE_SECONDS = 30
# The kubelet's minimumGracePeriodInSeconds: after a preStop hook, a container still gets this long
# between SIGTERM and SIGKILL, however long the hook took.
MINIMUM_STOP_GRACE_SECONDS = 2
_LOOPBACK = re.compile(r"(?<![\w.])(127\.0\.0\.1|localhost)(?![\w.])")


@dataclasses.dataclass(frozen=True)
class PreStopHook:
    """A container's lifecycle.preStop handler, ready to run."""

    action: Literal["exec", "httpGet", "sleep"]
    probe: Probe | None = None
    """exec and httpGet run like a probe of that kind, with the grace period as their timeout."""
    seconds: float = 0.0
    """The sleep action's length (at most the grace period)."""

    def describe(self) -> str:
        if self.probe is None:
            return f"sleep {self.seconds:g}s"
        if self.action == "exec":
            return "exec " + " ".join(self.probe.command)[:120]
        return f"httpGet {self.probe.scheme.lower()}://{self.probe.host}:{self.probe.port}{self.probe.path}"


def termination_grace_seconds(pod: Mapping[str, Any]) -> int:
    """How long the pod's containers get from the start of their preStop hooks to SIGKILL.

    The delete call's grace (metadata.deletionGracePeriodSeconds) when the API server set one,
    else spec.terminationGracePeriodSeconds, else the API's default of 30 s.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    for value in (metadata.get("deletionGracePeriodSeconds"), spec.get("terminationGracePeriodSeconds")):
        if value is not None:
            return max(0, int(value))
    return DEFAULT_TERMINATION_GRACE_SECONDS


def pod_loopback(text: str, pod_ip: str) -> str:
    """``127.0.0.1`` and ``localhost`` in a command run inside the pod name the pod's own address.

    A container's loopback is its pod's network namespace; here every pod shares the machine's,
    and the pod's servers listen on the pod IP.
    """
    return _LOOPBACK.sub(pod_ip, text)


def pre_stop_hook(container: Mapping[str, Any], pod_ip: str, grace_seconds: float) -> PreStopHook | None:
    """The container's preStop hook, or None when it has none (or only a tcpSocket one, which the
    kubelet accepts for compatibility and never runs)."""
    handler = (container.get("lifecycle") or {}).get("preStop")
    if not handler or set(handler) == {"tcpSocket"}:
        return None
    if "sleep" in handler:
        seconds = float((handler["sleep"] or {}).get("seconds", 0))
        return PreStopHook("sleep", seconds=max(0.0, min(seconds, grace_seconds)))
    if "exec" not in handler and "httpGet" not in handler:
        raise ContainerConfigError(f"preStop {sorted(handler)} has no handler the sandbox knows")
    probe = parse_probe(handler, container, pod_ip)
    assert probe is not None
    probe = dataclasses.replace(
        probe, timeout=float(grace_seconds), command=tuple(pod_loopback(part, pod_ip) for part in probe.command)
    )
    return PreStopHook("exec" if probe.kind == "exec" else "httpGet", probe=probe)


def stop_grace_after_hook(grace_seconds: float, hook_seconds: float) -> float:
    """Seconds between SIGTERM and SIGKILL: what the preStop hook left of the grace period, and at
    least the kubelet's minimum."""
    return max(float(MINIMUM_STOP_GRACE_SECONDS), grace_seconds - hook_seconds)


# -- restarts ----------------------------------------------------------------------------------

def restart_delay(consecutive_crashes: int) -> float:
    """Seconds before the next start: doubling from 1 s, capped at 20 s (the kubelet's 10 s..5 min, shortened)."""
    if consecutive_crashes <= 0:
        return 0.0
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** (consecutive_crashes - 1)))


# -- status ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ContainerState:
    """One container as the runner sees it; rendered into a containerStatuses entry."""

    name: str
    image: str
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    running_since: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    last_exit_code: int | None = None
    last_reason: str | None = None
    last_started: str | None = None
    last_finished: str | None = None
    pid: int | None = None


def container_status(state: ContainerState) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": state.name,
        "image": state.image,
        "imageID": "",
        "ready": state.ready,
        "started": state.started,
        "restartCount": state.restart_count,
    }
    if state.pid is not None:
        entry["containerID"] = f"sandbox://{state.pid}"
    if state.running_since is not None:
        entry["state"] = {"running": {"startedAt": state.running_since}}
    else:
        waiting: dict[str, str] = {"reason": state.waiting_reason or "ContainerCreating"}
        if state.waiting_message:
            waiting["message"] = state.waiting_message
        entry["state"] = {"waiting": waiting}
    if state.last_exit_code is not None:
        entry["lastState"] = {"terminated": {
            "exitCode": state.last_exit_code,
            "reason": state.last_reason or ("Completed" if state.last_exit_code == 0 else "Error"),
            "startedAt": state.last_started,
            "finishedAt": state.last_finished,
        }}
    return entry


def pod_status_patch(
    containers: Sequence[ContainerState], now: str, previous_conditions: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A strategic-merge patch of the pod's status: Ready/ContainersReady and containerStatuses.

    lastTransitionTime moves only when a condition's status changes.
    """
    ready = bool(containers) and all(c.ready for c in containers)
    before = {str(c.get("type")): c for c in previous_conditions}
    conditions = []
    for kind in ("ContainersReady", "Ready"):
        status = "True" if ready else "False"
        old = before.get(kind) or {}
        condition: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastTransitionTime": old.get("lastTransitionTime") if old.get("status") == status else now,
        }
        if not ready:
            condition["reason"] = "ContainersNotReady"
            unready = sorted(c.name for c in containers if not c.ready)
            condition["message"] = f"containers with unready status: [{' '.join(unready)}]"
        else:
            condition["reason"] = None
            condition["message"] = None
        conditions.append(condition)
    return {"status": {"conditions": conditions, "containerStatuses": [container_status(c) for c in containers]}}


# -- logs --------------------------------------------------------------------------------------

def cri_log_line(timestamp: str, stream: str, line: bytes) -> bytes:
    """One line in the CRI log format the kubelet writes and kwok's log server reads."""
    body = line.rstrip(b"\n")
    return f"{timestamp} {stream} F ".encode() + body + b"\n"


def logs_object(pod: PodFacts, files: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """A kwok ``Logs`` object telling kwok's log server where each container's log file is."""
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Logs",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid}],
        },
        "spec": {"logs": [
            {"containers": [name], "logsFile": current, "previousLogsFile": previous, "follow": True}
            for name, (current, previous) in sorted(files.items())
        ]},
    }


LOGS_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "logs.kwok.x-k8s.io"},
    "spec": {
        "group": "kwok.x-k8s.io",
        "names": {"kind": "Logs", "listKind": "LogsList", "plural": "logs", "singular": "logs"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1alpha1",
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}


# -- kwok stages -------------------------------------------------------------------------------

OWNED_EXPRESSION = f"[.spec.containers.[].image | test({json.dumps(KNOWN_IMAGES_REGEX)})] | any"

# Pods the runner owns start Running but not Ready: the runner's probes decide readiness.
_STARTING_TEMPLATE = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: ContainersNotReady
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: ContainersNotReady
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: false
  restartCount: 0
  state:
    waiting:
      reason: ContainerCreating
{{ end }}
{{ with NodeIPWith .spec.nodeName }}
hostIP: {{ . | Quote }}
{{ end }}
{{ $uid := or .metadata.uid "" }}{{ $name := or .metadata.name "" }}{{ $ns := or .metadata.namespace "" }}
{{ with PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) $uid $name $ns }}
podIP: {{ . | Quote }}
podIPs:
- ip: {{ . | Quote }}
{{ end }}
phase: Running
startTime: {{ $now | Quote }}
"""


def kwok_pod_delete_stage(stock_pod_delete: Mapping[str, Any]) -> dict[str, Any]:
    """kwok's pod-delete stage (remove the object as soon as it has a deletionTimestamp), limited to
    pods the runner does not own. The runner's pods go as a kubelet lets them go: preStop hooks,
    SIGTERM, the grace period, then the runner deletes the object with grace 0."""
    stage: dict[str, Any] = json.loads(json.dumps(stock_pod_delete))
    stage["spec"]["selector"]["matchExpressions"].append(
        {"key": OWNED_EXPRESSION, "operator": "NotIn", "values": ["true"]}
    )
    return stage


def kwok_pod_stages(stock_pod_ready: Mapping[str, Any]) -> list[dict[str, Any]]:
    """kwok's own pod-ready stage, limited to pods the runner does not own, plus a pod-start
    stage for the runner's pods (an IP and Running, never Ready: readiness is the runner's)."""
    others = json.loads(json.dumps(stock_pod_ready))
    others["spec"]["selector"]["matchExpressions"].append(
        {"key": OWNED_EXPRESSION, "operator": "NotIn", "values": ["true"]}
    )
    owned_selector = json.loads(json.dumps(stock_pod_ready["spec"]["selector"]))
    owned_selector["matchExpressions"].append({"key": OWNED_EXPRESSION, "operator": "In", "values": ["true"]})
    owned = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "pod-start-for-runner"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": owned_selector,
            "next": {"statusTemplate": _STARTING_TEMPLATE},
        },
    }
    return [others, owned]
