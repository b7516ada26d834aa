"""Desired objects of a replica that spans nodes: one StatefulSet and one headless Service per group (pure).

A group is one vLLM replica on `pods_per_replica` nodes. Its StatefulSet runs one pod
per node (ordinal 0 is the leader, the others workers) with `podManagementPolicy:
Parallel` (the leader only becomes Ready once every worker has joined, so ordered
start-up would wait forever) and `updateStrategy: OnDelete` (groups.py decides when a
group is replaced: vLLM cannot swap one member of a running group). The headless
Service gives every pod a stable name; it publishes not-ready addresses because the
workers must reach the leader before anything is Ready.

Every pod runs the same command: a short shell script that reads its node rank from
the StatefulSet's pod-index label (downward API) and starts the leader's or a
worker's process. The pod template carries `argosy.dev/role: worker`; the operator
labels ordinal 0 `leader` and gives it the served-model-names annotation
(`leader_pod_patch`), so the gateway routes to leaders only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections.abc import Sequence
from typing import Any, Literal

from argosy_operator import programs
from argosy_operator.builders import (
    ANNOTATION_SERVED_MODEL_NAMES,
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    PORT_NAME,
    PROBE_PERIOD_SECONDS,
    ROLE_SERVER,
    SERVER_PORT,
    STARTUP_FAILURE_THRESHOLD,
    ServerInputs,
    build_deployment,
    build_service,
    child_labels,
    drain_command,
    model_source,
    owner_reference,
    pod_annotations,
    service_name,
    serving_pod_spec,
    vllm_args,
)

Executor = Literal["mp", "ray"]
EXECUTORS: tuple[Executor, ...] = ("mp", "ray")

ROLE_LEADER = "leader"
ROLE_WORKER = "worker"
LABEL_GROUP = "argosy.dev/group"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"

# torch.distributed's customary store port on the leader (`--master-port`).
MASTER_PORT = 29500
NODE_RANK_ENV = "ARGOSY_NODE_RANK"
# Interfaces NCCL and Gloo open their sockets on. eth0 is the pod network's interface
# under the common CNIs; a cluster with a dedicated fabric (RoCE, a Multus network)
# names its own in engine.env, which wins.
DEFAULT_SOCKET_IFNAME = "eth0"
RAY_WAIT_TIMEOUT_SECONDS = 900
# A group name leaves room for "-<ordinal>" and the StatefulSet's revision-hash label
# ("<name>-<10 chars>") within 63 characters.
GROUP_NAME_MAX = 50


@dataclasses.dataclass(frozen=True)
class RayPorts:
    """The fixed ports a Ray node listens on (named so that NetworkPolicies can allow them)."""

    gcs: int = 6379
    dashboard_agent: int = 52365


@dataclasses.dataclass(frozen=True)
class GroupInputs:
    """One group: the replica's server inputs, which replica it is, and how vLLM runs across its pods."""

    server: ServerInputs
    index: int
    executor: Executor = "mp"
    master_port: int = MASTER_PORT
    ray_ports: RayPorts = RayPorts()
    ray_wait_timeout_seconds: int = RAY_WAIT_TIMEOUT_SECONDS

    @property
    def pods(self) -> int:
        return self.server.pods_per_replica

    @property
    def name(self) -> str:
        return group_name(self.server.name, self.index)

    @property
    def leader_address(self) -> str:
        return leader_dns_name(self.name, self.server.namespace)


def group_name(deployment: str, index: int) -> str:
    """The StatefulSet (and headless Service) name of group `index`: `<name>-g<index>`."""
    base = service_name(deployment)
    suffix = f"-g{index}"
    if len(base) + len(suffix) > GROUP_NAME_MAX:
        digest = hashlib.sha256(deployment.encode()).hexdigest()[:6]
        base = f"{base[: GROUP_NAME_MAX - len(suffix) - 7].rstrip('-')}-{digest}"
    return base + suffix


def leader_dns_name(group: str, namespace: str) -> str:
    """The leader pod's stable name through the group's headless Service."""
    return f"{group}-0.{group}.{namespace}.svc"


def group_selector(deployment: str, group: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: deployment, LABEL_GROUP: group}


def _labels(inputs: GroupInputs, role: str) -> dict[str, str]:
    return {**child_labels(inputs.server.name, role), LABEL_GROUP: inputs.name}


def _metadata(inputs: GroupInputs) -> dict[str, Any]:
    server = inputs.server
    return {
        "name": inputs.name,
        "namespace": server.namespace,
        # The group's own objects are labelled like its leader: they exist to reach it.
        "labels": _labels(inputs, ROLE_LEADER),
        "ownerReferences": [owner_reference(server.name, server.owner_uid)],
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def group_args(inputs: GroupInputs) -> list[str]:
    """`vllm serve` arguments shared by every member (the script adds the rank-specific ones)."""
    args = vllm_args(inputs.server, model_source(inputs.server.model_uri))
    if inputs.executor == "mp":
        args += [
            "--nnodes", str(inputs.pods),
            "--master-addr", inputs.leader_address,
            "--master-port", str(inputs.master_port),
        ]
    return [*args, "--distributed-executor-backend", inputs.executor]


def mp_script() -> str:
    """Every member: `vllm serve ARGS --node-rank R`, workers also `--headless` (no API server)."""
    return "\n".join([
        f'rank="${{{NODE_RANK_ENV}:?the pod-index label is missing: Kubernetes 1.28 or later is needed}}"',
        'if [ "$rank" = 0 ]; then',
        '  exec vllm serve "$@" --node-rank 0',
        "fi",
        'exec vllm serve "$@" --node-rank "$rank" --headless',
    ])


def ray_script(inputs: GroupInputs) -> str:
    """Leader: Ray head, wait for every GPU, then vLLM on Ray. Workers: a Ray node that joins the head."""
    ports = inputs.ray_ports
    gpus = inputs.server.gpus_per_pod
    # The agent port may be moved per pod (ARGOSY_RAY_AGENT_PORT in engine.env) for hosts
    # where several Ray nodes share one network namespace, as in tests.
    common = (
        f"--dashboard-agent-listen-port=${{ARGOSY_RAY_AGENT_PORT:-{ports.dashboard_agent}}} "
        f'--num-gpus={gpus} --node-ip-address="$VLLM_HOST_IP" --disable-usage-stats'
    )
    head = (
        f"ray start --head --port={ports.gcs} --include-dashboard=false {common}"
    )
    worker = f"exec ray start --address={inputs.leader_address}:{ports.gcs} {common} --block"
    workers = " ".join(
        f"--worker {shlex.quote(f'{inputs.name}-{ordinal}.{inputs.name}.{inputs.server.namespace}.svc')}"
        for ordinal in range(1, inputs.pods)
    )
    wait = (
        f"python3 - --gpus {gpus * inputs.pods} --nodes {inputs.pods} "
        f"--timeout {inputs.ray_wait_timeout_seconds} {workers} <<'ARGOSY_RAY_WAIT'"
    )
    return "\n".join([
        f'rank="${{{NODE_RANK_ENV}:?the pod-index label is missing: Kubernetes 1.28 or later is needed}}"',
        'if [ "$rank" != 0 ]; then',
        f"  {worker}",
        "fi",
        "set -e",
        head,
        f'export RAY_ADDRESS="$VLLM_HOST_IP:{ports.gcs}"',
        wait,
        programs.source("ray_wait").rstrip("\n"),
        "ARGOSY_RAY_WAIT",
        'exec vllm serve "$@"',
    ])


def _group_env(inputs: GroupInputs, user_env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    own = [
        _field_env("VLLM_HOST_IP", "status.podIP"),
        _field_env(NODE_RANK_ENV, f"metadata.labels['{POD_INDEX_LABEL}']"),
    ]
    given = {e.get("name") for e in user_env}
    defaults = [
        {"name": var, "value": DEFAULT_SOCKET_IFNAME}
        for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
        if var not in given
    ]
    own_names = {e["name"] for e in own}
    return own + defaults + [e for e in user_env if e.get("name") not in own_names]


def _container(inputs: GroupInputs, pod_spec: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod_spec["containers"][0]
    script = mp_script() if inputs.executor == "mp" else ray_script(inputs)
    container["command"] = ["/bin/sh", "-c", script, "argosy-group"]
    container["args"] = group_args(inputs)
    container["env"] = _group_env(inputs, list(container.get("env") or []))
    # One template serves the leader and the workers, so every probe is a script that
    # branches on the rank: the leader is checked on vLLM's /health as a single-node server
    # is; a headless worker, which has no HTTP listener, on its connection to the leader
    # (programs/connected.py). A worker's liveness is its process: it is the container's
    # main process, so the container ends when it does.
    container["startupProbe"] = {
        "exec": {"command": ["/bin/sh", "-c", _probe_script(inputs, workers_checked=True)]},
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": 5,
        "failureThreshold": STARTUP_FAILURE_THRESHOLD,
    }
    container["readinessProbe"] = {
        "exec": {"command": ["/bin/sh", "-c", _probe_script(inputs, workers_checked=True)]},
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    container["livenessProbe"] = {
        "exec": {"command": ["/bin/sh", "-c", _probe_script(inputs, workers_checked=False)]},
        "periodSeconds": 30,
        "timeoutSeconds": 10,
        "failureThreshold": 5,
    }
    container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", _drain_script(inputs)]}}}
    mounts = [m for m in container.get("volumeMounts") or () if m["name"] != "dshm"]
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts]
    return container


def _drain_script(inputs: GroupInputs) -> str:
    """preStop of a group member. The leader waits for its own vLLM's requests in flight, as a
    single-node server does; a worker for the leader's: the leader computes with its workers, so
    a worker that stopped first would fail those requests (the whole group is deleted at once)."""
    grace = inputs.server.termination_grace_period_seconds
    leader = shlex.join(drain_command(grace))
    worker = shlex.join(drain_command(grace, host=inputs.leader_address))
    return f'if [ "${NODE_RANK_ENV}" = 0 ]; then exec {leader}; fi\nexec {worker}'


def _probe_script(inputs: GroupInputs, *, workers_checked: bool) -> str:
    """Leader: vLLM's /health answers 200. Worker: connected to the leader, or (liveness) nothing to check."""
    port = inputs.master_port if inputs.executor == "mp" else inputs.ray_ports.gcs
    # The pod's own address (vLLM listens on all of them): in the sandbox, where pods share
    # the loopback network, 127.0.0.1 would be some other pod.
    health = (
        "import os, sys, urllib.request\n"
        f'url = "http://" + os.environ["VLLM_HOST_IP"] + ":{SERVER_PORT}/health"\n'
        "sys.exit(urllib.request.urlopen(url, timeout=4).status != 200)"
    )
    worker = f"exec python3 -c {shlex.quote(programs.source('connected'))} {port}" if workers_checked else "exit 0"
    return "\n".join([
        f'if [ "${NODE_RANK_ENV}" = 0 ]; then exec python3 -c {shlex.quote(health)}; fi',
        worker,
    ])


def build_group_statefulset(inputs: GroupInputs) -> dict[str, Any]:
    """The StatefulSet of one group: `pods` pods on distinct nodes of one GPU product."""
    server = inputs.server
    pod_spec = serving_pod_spec(server, model_source(server.model_uri))
    pod_spec["containers"] = [_container(inputs, pod_spec)]
    volumes = [v for v in pod_spec.get("volumes") or () if v["name"] != "dshm"]
    # NCCL and Gloo exchange tensors through shared memory between the ranks of a node; the
    # container runtime's default 64 MiB /dev/shm makes them fail. No sizeLimit: a limit
    # that is too small evicts a serving pod.
    pod_spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes]
    pod_spec["affinity"] = {
        "podAntiAffinity": {
            # One member per node: the group's ranks are laid out one node each.
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": group_selector(server.name, inputs.name)},
                "topologyKey": HOSTNAME_TOPOLOGY,
            }],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(inputs),
        "spec": {
            "replicas": inputs.pods,
            "serviceName": inputs.name,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": group_selector(server.name, inputs.name)},
            "template": {
                "metadata": {
                    "labels": _labels(inputs, ROLE_WORKER),
                    # A single-node server's annotations but the served names: those mark the
                    # leader only (leader_metadata).
                    "annotations": {k: v for k, v in pod_annotations(server).items()
                                    if k != ANNOTATION_SERVED_MODEL_NAMES},
                },
                "spec": pod_spec,
            },
        },
    }


def build_group_service(inputs: GroupInputs) -> dict[str, Any]:
    """The headless Service that gives the group's pods stable DNS names (`<group>-<ordinal>.<group>`)."""
    ports = [{"name": PORT_NAME, "port": SERVER_PORT, "targetPort": SERVER_PORT, "protocol": "TCP"}]
    if inputs.executor == "mp":
        ports.append({"name": "dist", "port": inputs.master_port, "targetPort": inputs.master_port, "protocol": "TCP"})
    else:
        ports.append({"name": "ray-gcs", "port": inputs.ray_ports.gcs, "targetPort": inputs.ray_ports.gcs,
                      "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(inputs),
        "spec": {
            "clusterIP": "None",
            # Workers resolve the leader before anything in the group is Ready.
            "publishNotReadyAddresses": True,
            "selector": group_selector(inputs.server.name, inputs.name),
            "ports": ports,
        },
    }


def build_groups(server: ServerInputs, executor: Executor = "mp") -> list[dict[str, Any]]:
    """The StatefulSet and headless Service of every replica of `server` (server.replicas groups)."""
    objects: list[dict[str, Any]] = []
    for index in range(server.replicas):
        inputs = GroupInputs(server=server, index=index, executor=executor)
        objects += [build_group_statefulset(inputs), build_group_service(inputs)]
    return objects


def build_workload(server: ServerInputs, executor: Executor = "mp") -> list[dict[str, Any]]:
    """Every serving child of a placement: a Deployment and its Service, or one group per replica
    and a Service in front of the leaders."""
    if server.pods_per_replica > 1:
        service = build_service(server.name, server.namespace, server.owner_uid, role=ROLE_LEADER)
        return [*build_groups(server, executor), service]
    return [build_deployment(server), build_service(server.name, server.namespace, server.owner_uid)]


def serving_role(pods_per_replica: int) -> str:
    """The role of the pods that serve requests (and that `status.selector` counts)."""
    return ROLE_LEADER if pods_per_replica > 1 else ROLE_SERVER


def leader_pod_name(group: str) -> str:
    return f"{group}-0"


def leader_metadata(served_model_names: Sequence[str]) -> dict[str, Any]:
    """What the operator sets on a group's ordinal-0 pod: the leader role and the served names."""
    return {
        "labels": {LABEL_ROLE: ROLE_LEADER},
        "annotations": {ANNOTATION_SERVED_MODEL_NAMES: json.dumps(list(served_model_names))},
    }


def leader_pod_patch(server: ServerInputs, group: str) -> dict[str, Any]:
    """The merge patch that makes a group's ordinal-0 pod its leader."""
    return {"metadata": {"name": leader_pod_name(group), **leader_metadata(server.served_model_names)}}
