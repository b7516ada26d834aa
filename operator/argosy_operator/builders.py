"""Desired child objects of one LLMDeployment, as plain dicts (pure: no I/O, no kopf).

Each builder takes one frozen `ServerInputs` and returns the object exactly as it is
sent to server-side apply. Two rules keep the drift check in diffplan.py honest:
builders never emit None or empty lists/maps (the API server drops them, so they
would never compare equal), and quantities are written in canonical form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from argosy_operator import api
from argosy_operator.settings import API_VERSION, FIELD_MANAGER, KIND

SERVER_PORT = 8000
PORT_NAME = "http"
CONTAINER_NAME = "vllm"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MODEL_MOUNT_PATH = "/mnt/models"
# Quantization methods vLLM still serves but refuses without --allow-deprecated-quantization.
DEPRECATED_QUANTIZATIONS = frozenset({"fbgemm_fp8"})
CHAT_TEMPLATE_DIR = "/etc/argosy/chat-template"
CHAT_TEMPLATE_FILE = "template.jinja"
CHAT_TEMPLATE_KEY = "chat-template.jinja"
"""The key of the ConfigMap the operator writes for an inline template."""

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_DEPLOYMENT = "argosy.dev/deployment"
LABEL_ROLE = "argosy.dev/role"
ANNOTATION_SERVED_MODEL_NAMES = "argosy.dev/served-model-names"
ANNOTATION_CHAT_TEMPLATE_HASH = "argosy.dev/chat-template-hash"
ROLE_SERVER = "server"
ANNOTATION_BACKEND_KEY_ID = "argosy.dev/backend-key-id"
"""On each serving pod (and its template): the id of the backend key it was started with."""
BACKEND_KEY_ENV = "VLLM_API_KEY"

# Probe timings. /health answers only once the weights are loaded and the engine is
# up, which for a 405B model pulled from the hub can take well over ten minutes.
PROBE_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 240  # 240 x 10 s = 40 minutes before the kubelet gives up.
# A deadline longer than the startup probe, so the Deployment reports a stalled rollout
# only after a pod had every chance to load.
PROGRESS_DEADLINE_SECONDS = 3600

# Drains (spec.engine.terminationGracePeriodSeconds). The gateway drops a pod from its route
# table when the pod gets its deletionTimestamp; the preStop hook first waits this long for
# every gateway (and Service proxy) to have seen that, then until vLLM reports no running and
# no waiting request. vLLM itself aborts what is left on SIGTERM (its --shutdown-timeout
# defaults to 0), so the hook's wait is what lets streams finish. It stops this long before
# the grace period ends, leaving vLLM time to exit before the kubelet's SIGKILL.
DRAIN_START_SECONDS = 5
DRAIN_EXIT_SECONDS = 5


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class ChatTemplateMount:
    """A chat template in a ConfigMap key, mounted read-only and passed as --chat-template."""

    config_map: str
    key: str
    content_hash: str
    """Hash of the template text: a pod template annotation, so an edited template rolls the pods."""


def backend_key_secret_name(name: str) -> str:
    """The Secret holding an LLMDeployment's backend keys (backendkey.py)."""
    return f"{name}-backend-key"


def backend_key_entry(key_id: str) -> str:
    return f"key-{key_id}"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where vLLM loads the weights from, resolved from spec.model.uri."""

    model_arg: str
    """The positional argument of `vllm serve`."""
    pvc_claim: str | None = None
    """Set for pvc:// URIs: the claim mounted read-only at MODEL_MOUNT_PATH."""
    load_format: str | None = None
    """A --load-format the source needs unless the user chose one."""
    revision_applies: bool = False


def model_source(uri: str) -> ModelSource:
    """Map a model URI to vLLM's model argument.

    hf://org/repo      -> `org/repo` (downloaded by vLLM; --revision applies)
    pvc://claim/path   -> `/mnt/models/path` with the claim mounted read-only
    s3://bucket/path   -> passed through; vLLM streams it with the Run:ai model streamer
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest.strip("/"):
        raise ValueError(f"model URI {uri!r} has no scheme://path form")
    rest = rest.strip("/")
    if scheme == "hf":
        return ModelSource(model_arg=rest, revision_applies=True)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        mounted = f"{MODEL_MOUNT_PATH}/{path}" if path else MODEL_MOUNT_PATH
        return ModelSource(model_arg=mounted, pvc_claim=claim)
    if scheme == "s3":
        return ModelSource(model_arg=f"s3://{rest}", load_format="runai_streamer")
    raise ValueError(f"model URI scheme {scheme!r} is not one of hf://, pvc://, s3://")


@dataclasses.dataclass(frozen=True)
class ServerInputs:
    """Everything the builders need to render the serving workload of one LLMDeployment."""

    name: str
    namespace: str
    owner_uid: str
    model_uri: str
    served_model_names: tuple[str, ...]
    replicas: int
    image: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int | None
    """None: vLLM's default, the model's own context length."""
    gpu_memory_utilization: float
    gpu_product: str | None = None
    revision: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    extra_args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    """Kubernetes EnvVar objects (camelCase), appended after the operator's own."""
    hf_token_secret: SecretKeyRef | None = None
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    tokenizer_mode: str | None = None
    tokenizer_revision: str | None = None
    chat_template: ChatTemplateMount | None = None
    generation_override: tuple[tuple[str, float | int], ...] = ()
    """--override-generation-config entries, vLLM's names."""
    termination_grace_period_seconds: int = api.DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS
    pods_per_replica: int = 1
    """More than one: the replica is a group of pods on as many nodes (group_builders.py)."""
    backend_key_id: str | None = None
    """The backend key the pods start with (VLLM_API_KEY from the entry key-<id> of the Secret
    <name>-backend-key); None: vLLM accepts any caller."""
    max_surge: int | str = 0
    max_unavailable: int | str = 1
    """spec.rollout: the Deployment's rollingUpdate (a number of pods or a percentage string)."""

    @property
    def gpus_per_pod(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size // self.pods_per_replica


def selector_labels(name: str, role: str = ROLE_SERVER) -> dict[str, str]:
    """The labels that select the serving pods (Deployment selector, Service, scale).

    `role` is `leader` for replicas that span nodes: one serving pod per group.
    """
    return {LABEL_DEPLOYMENT: name, LABEL_ROLE: role}


def label_selector(name: str, role: str = ROLE_SERVER) -> str:
    """`status.selector` of the LLMDeployment: what `kubectl scale` and an HPA count."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name, role).items())


def child_labels(name: str, role: str = ROLE_SERVER) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: FIELD_MANAGER,
        LABEL_NAME: "vllm",
        LABEL_INSTANCE: name,
        LABEL_DEPLOYMENT: name,
        LABEL_ROLE: role,
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(inputs: ServerInputs) -> dict[str, Any]:
    return {
        "name": inputs.name,
        "namespace": inputs.namespace,
        "labels": child_labels(inputs.name),
        "ownerReferences": [owner_reference(inputs.name, inputs.owner_uid)],
    }


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_args(inputs: ServerInputs, source: ModelSource) -> list[str]:
    """Arguments after `vllm serve`: the model, the placement, the engine settings, pass-through."""
    args: list[str] = [source.model_arg, "--served-model-name", *inputs.served_model_names]
    if source.revision_applies and inputs.revision:
        args += ["--revision", inputs.revision]
    args += [
        "--tensor-parallel-size", str(inputs.tensor_parallel_size),
        "--pipeline-parallel-size", str(inputs.pipeline_parallel_size),
    ]
    if inputs.max_model_len is not None:
        args += ["--max-model-len", str(inputs.max_model_len)]
    args += [
        "--gpu-memory-utilization", _format_fraction(inputs.gpu_memory_utilization),
        "--port", str(SERVER_PORT),
    ]
    # "auto" is vLLM's own default for both; leaving it out keeps the command readable.
    if inputs.dtype and inputs.dtype != "auto":
        args += ["--dtype", inputs.dtype]
    if inputs.quantization:
        args += ["--quantization", inputs.quantization]
        if inputs.quantization in DEPRECATED_QUANTIZATIONS and not _has_flag(
            inputs.extra_args, "--allow-deprecated-quantization"
        ):
            args.append("--allow-deprecated-quantization")
    if inputs.kv_cache_dtype and inputs.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", inputs.kv_cache_dtype]
    if inputs.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(inputs.max_num_batched_tokens)]
    if inputs.enforce_eager:
        args.append("--enforce-eager")
    if inputs.trust_remote_code:
        args.append("--trust-remote-code")
    if inputs.tokenizer:
        args += ["--tokenizer", inputs.tokenizer]
    if inputs.tokenizer_mode and inputs.tokenizer_mode != "auto":
        args += ["--tokenizer-mode", inputs.tokenizer_mode]
    if inputs.tokenizer_revision:
        args += ["--tokenizer-revision", inputs.tokenizer_revision]
    if inputs.chat_template is not None:
        args += ["--chat-template", f"{CHAT_TEMPLATE_DIR}/{CHAT_TEMPLATE_FILE}"]
    if inputs.generation_override:
        overrides = json.dumps(dict(inputs.generation_override), sort_keys=True, separators=(",", ":"))
        args += ["--override-generation-config", overrides]
    if source.load_format and not _has_flag(inputs.extra_args, "--load-format"):
        args += ["--load-format", source.load_format]
    args += list(inputs.extra_args)
    return args


def _format_fraction(value: float) -> str:
    # repr-free and stable: 0.9 -> "0.9", 0.95 -> "0.95", 1.0 -> "1.0"
    text = f"{value:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _env(inputs: ServerInputs) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if inputs.hf_token_secret is not None:
        env.append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {
                "name": inputs.hf_token_secret.name, "key": inputs.hf_token_secret.key,
            }},
        })
    if inputs.backend_key_id is not None:
        env.append({
            "name": BACKEND_KEY_ENV,
            "valueFrom": {"secretKeyRef": {
                "name": backend_key_secret_name(inputs.name), "key": backend_key_entry(inputs.backend_key_id),
            }},
        })
    own = {e["name"] for e in env}
    # A user variable with the same name as ours would make the list key ambiguous
    # for server-side apply; ours wins and the user's is dropped.
    env += [dict(e) for e in inputs.env if e.get("name") not in own]
    return env


def _http_get() -> dict[str, Any]:
    return {"path": "/health", "port": PORT_NAME, "scheme": "HTTP"}


def drain_command(
    grace_seconds: int, port: int = SERVER_PORT, start_seconds: float = DRAIN_START_SECONDS, host: str = "127.0.0.1"
) -> list[str]:
    """The serving container's preStop hook: wait until vLLM has no request left (bounded).

    Python, because the vLLM image has it and no curl; it reads vLLM's own /metrics (at
    ``host``: the pod's own vLLM, or a multi-node group's leader for its workers). An
    unreachable server ends the wait: nothing is left to drain there.
    """
    budget = max(1, grace_seconds - DRAIN_EXIT_SECONDS)
    script = (
        "import time, urllib.request\n"
        f"deadline = time.monotonic() + {budget}\n"
        f"time.sleep({min(start_seconds, budget):g})\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        page = urllib.request.urlopen('http://{host}:{port}/metrics', timeout=5).read()\n"
        "    except OSError:\n"
        "        break\n"
        "    busy = sum(float(line.rsplit(None, 1)[-1]) for line in page.decode().splitlines()\n"
        "               if line.startswith(('vllm:num_requests_running', 'vllm:num_requests_waiting')))\n"
        "    if busy == 0:\n"
        "        break\n"
        "    time.sleep(1)\n"
    )
    return ["python3", "-c", script]


def _container(inputs: ServerInputs, source: ModelSource) -> dict[str, Any]:
    gpus = str(inputs.gpus_per_pod)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": inputs.image,
        "command": ["vllm", "serve"],
        "args": vllm_args(inputs, source),
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        # Extended resources must have requests equal to limits; set both so the pod
        # reads the same in `kubectl describe` as in the scheduler's view.
        "resources": {"requests": {GPU_RESOURCE: gpus}, "limits": {GPU_RESOURCE: gpus}},
        "startupProbe": {
            "httpGet": _http_get(),
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": STARTUP_FAILURE_THRESHOLD,
        },
        "readinessProbe": {
            "httpGet": _http_get(),
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # Generous: a server saturated with long prompts answers /health late, and a
        # restart costs a full model load.
        "livenessProbe": {
            "httpGet": _http_get(),
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 5,
        },
        "lifecycle": {"preStop": {"exec": {"command": drain_command(inputs.termination_grace_period_seconds)}}},
    }
    env = _env(inputs)
    if env:
        container["env"] = env
    mounts: list[dict[str, Any]] = []
    if inputs.gpus_per_pod > 1:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if source.pvc_claim:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT_PATH, "readOnly": True})
    if inputs.chat_template is not None:
        mounts.append({"name": "chat-template", "mountPath": CHAT_TEMPLATE_DIR, "readOnly": True})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _volumes(inputs: ServerInputs, source: ModelSource) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = []
    if inputs.gpus_per_pod > 1:
        # NCCL exchanges tensors between the tensor-parallel workers through shared
        # memory; the container runtime's default 64 MiB /dev/shm makes it fail.
        # No sizeLimit: a limit that is too small evicts a serving pod, and the pages
        # count against the pod's memory either way.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if source.pvc_claim:
        volumes.append({
            "name": "model",
            "persistentVolumeClaim": {"claimName": source.pvc_claim, "readOnly": True},
        })
    if inputs.chat_template is not None:
        volumes.append({"name": "chat-template", "configMap": {
            "name": inputs.chat_template.config_map,
            "items": [{"key": inputs.chat_template.key, "path": CHAT_TEMPLATE_FILE}],
        }})
    return volumes


def _node_selector(inputs: ServerInputs) -> dict[str, str]:
    selector = dict(inputs.node_selector)
    if inputs.gpu_product:
        # The placement was sized for this product's memory; a user selector must not
        # move the pods to a different GPU.
        selector[GPU_PRODUCT_LABEL] = inputs.gpu_product
    return selector


def _tolerations(inputs: ServerInputs) -> list[dict[str, Any]]:
    gpu = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    return [gpu, *(dict(t) for t in inputs.tolerations if dict(t) != gpu)]


def pod_annotations(inputs: ServerInputs) -> dict[str, str]:
    annotations = {
        ANNOTATION_SERVED_MODEL_NAMES: json.dumps(list(inputs.served_model_names)),
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    if inputs.chat_template is not None:
        # vLLM reads the template once at startup; a new hash makes the Deployment roll.
        annotations[ANNOTATION_CHAT_TEMPLATE_HASH] = inputs.chat_template.content_hash
    if inputs.backend_key_id is not None:
        # The gateway sends each pod the key this names; a new key rolls the pods.
        annotations[ANNOTATION_BACKEND_KEY_ID] = inputs.backend_key_id
    return annotations


def chat_template_config_map_name(name: str) -> str:
    """The ConfigMap holding an inline chat template (ConfigMap names may be DNS subdomains)."""
    return f"{name}-chat-template"


def build_chat_template_config_map(name: str, namespace: str, owner_uid: str, template: str) -> dict[str, Any]:
    """The ConfigMap the operator owns for `spec.engine.chatTemplate.inline`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": chat_template_config_map_name(name),
            "namespace": namespace,
            "labels": child_labels(name),
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "data": {CHAT_TEMPLATE_KEY: template},
    }


def serving_pod_spec(inputs: ServerInputs, source: ModelSource) -> dict[str, Any]:
    """The pod spec of a vLLM server: one container, the GPU product's nodes, volumes."""
    pod_spec: dict[str, Any] = {
        "containers": [_container(inputs, source)],
        "tolerations": _tolerations(inputs),
        # Service links inject <SERVICE>_PORT variables; a Service called "vllm" would
        # set VLLM_PORT=tcp://..., which vLLM reads as its own setting and crashes on.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": inputs.termination_grace_period_seconds,
    }
    node_selector = _node_selector(inputs)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    volumes = _volumes(inputs, source)
    if volumes:
        pod_spec["volumes"] = volumes
    if inputs.priority_class_name:
        pod_spec["priorityClassName"] = inputs.priority_class_name
    return pod_spec


def build_deployment(inputs: ServerInputs) -> dict[str, Any]:
    """The apps/v1 Deployment whose pods each serve one replica on one node."""
    pod_spec = serving_pod_spec(inputs, model_source(inputs.model_uri))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(inputs),
        "spec": {
            "replicas": inputs.replicas,
            "selector": {"matchLabels": selector_labels(inputs.name)},
            # By default (spec.rollout) no surge: GPUs are the scarce resource, and a surge pod
            # needs a free GPU set that a busy cluster usually does not have, so the rollout
            # would hang with a Pending pod. One replica at a time instead; with one replica
            # that is a short outage unless the user grants a surge.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": inputs.max_surge, "maxUnavailable": inputs.max_unavailable},
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            "template": {
                "metadata": {
                    "labels": child_labels(inputs.name),
                    "annotations": pod_annotations(inputs),
                },
                "spec": pod_spec,
            },
        },
    }


_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def service_name(name: str) -> str:
    """The Service's name: the LLMDeployment's name when it is a valid DNS-1035 label.

    LLMDeployment names may contain dots ("llama-3.1-8b") or start with a digit; Service
    names may not. Such names get dashes, a letter prefix when needed, and a short hash
    of the original so that "a.b" and "a-b" never share a Service.
    """
    if len(name) <= 63 and _DNS_LABEL.match(name):
        return name
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"llm-{cleaned}".rstrip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{cleaned[:56].rstrip('-')}-{digest}"


def build_service(name: str, namespace: str, owner_uid: str, role: str = ROLE_SERVER) -> dict[str, Any]:
    """A ClusterIP Service in front of all serving pods (the gateway itself uses pod IPs)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": namespace,
            "labels": child_labels(name, role),
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name, role),
            "ports": [{"name": PORT_NAME, "port": SERVER_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
