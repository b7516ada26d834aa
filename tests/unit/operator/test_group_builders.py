"""A replica that spans nodes, as a platform engineer reads it in `kubectl get sts,svc,pod -o yaml`.

The group's scripts are run for real with /bin/sh (a stand-in `vllm` on PATH records the
command line), and the worker's readiness probe against real TCP connections: what the
kubelet would execute.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argosy_operator import group_builders as gb
from argosy_operator.builders import ServerInputs
from argosy_operator.programs import connected, ray_wait

SERVER = ServerInputs(
    name="llama-405b",
    namespace="team-a",
    owner_uid="0b5c1f0e-1111-4222-8333-444455556666",
    model_uri="hf://meta-llama/Llama-3.1-405B-Instruct",
    served_model_names=("llama-405b", "llama-big"),
    replicas=2,
    image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=8,
    pipeline_parallel_size=2,
    max_model_len=8192,
    gpu_memory_utilization=0.9,
    gpu_product="NVIDIA-H100-80GB-HBM3",
    pods_per_replica=2,
)


def _objects(executor: gb.Executor, server: ServerInputs = SERVER) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in gb.build_groups(server, executor)}


def _container(sts: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("executor", gb.EXECUTORS)
def test_one_statefulset_and_one_headless_service_per_replica(executor: gb.Executor) -> None:
    objects = _objects(executor)
    assert sorted(objects) == [
        ("Service", "llama-405b-g0"),
        ("Service", "llama-405b-g1"),
        ("StatefulSet", "llama-405b-g0"),
        ("StatefulSet", "llama-405b-g1"),
    ]
    sts = objects[("StatefulSet", "llama-405b-g1")]
    spec = sts["spec"]
    assert spec["replicas"] == 2 and spec["serviceName"] == "llama-405b-g1"
    # The operator replaces groups; ordered start would wait for a leader that waits for its workers.
    assert spec["updateStrategy"] == {"type": "OnDelete"} and spec["podManagementPolicy"] == "Parallel"
    selector = {"argosy.dev/deployment": "llama-405b", "argosy.dev/group": "llama-405b-g1"}
    assert spec["selector"]["matchLabels"] == selector
    owner = sts["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMDeployment", SERVER.owner_uid, True)

    service = objects[("Service", "llama-405b-g1")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]


@pytest.mark.parametrize("executor", gb.EXECUTORS)
def test_one_pod_per_node_of_one_gpu_product_each_with_the_whole_node(executor: gb.Executor) -> None:
    sts = _objects(executor)[("StatefulSet", "llama-405b-g0")]
    pod = sts["spec"]["template"]["spec"]
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    resources = _container(sts)["resources"]
    assert resources == {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in _container(sts)["volumeMounts"]


@pytest.mark.parametrize("executor", gb.EXECUTORS)
def test_the_template_is_a_worker_and_only_the_leader_patch_makes_a_routable_leader(executor: gb.Executor) -> None:
    sts = _objects(executor)[("StatefulSet", "llama-405b-g0")]
    template = sts["spec"]["template"]["metadata"]
    assert template["labels"]["argosy.dev/role"] == "worker"
    assert "argosy.dev/served-model-names" not in template.get("annotations", {})
    patch = gb.leader_pod_patch(SERVER, "llama-405b-g0")
    assert patch["metadata"]["name"] == "llama-405b-g0-0"
    assert gb.leader_metadata(SERVER.served_model_names).items() <= patch["metadata"].items()
    assert patch["metadata"]["labels"] == {"argosy.dev/role": "leader"}
    assert json.loads(patch["metadata"]["annotations"]["argosy.dev/served-model-names"]) == ["llama-405b", "llama-big"]


def test_every_pod_gets_its_ip_rank_and_socket_interfaces_and_the_user_may_override_them() -> None:
    env = _env(_container(_objects("mp")[("StatefulSet", "llama-405b-g0")]))
    assert env["VLLM_HOST_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert env["ARGOSY_NODE_RANK"] == {
        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["GLOO_SOCKET_IFNAME"] == "eth0"
    custom = dataclasses.replace(SERVER, env=({"name": "NCCL_SOCKET_IFNAME", "value": "net1"},
                                              {"name": "VLLM_HOST_IP", "value": "1.2.3.4"}))
    container = _container(_objects("mp", custom)[("StatefulSet", "llama-405b-g0")])
    names = [e["name"] for e in container["env"]]
    assert names.count("NCCL_SOCKET_IFNAME") == 1 and names.count("VLLM_HOST_IP") == 1
    overridden = _env(container)
    assert overridden["NCCL_SOCKET_IFNAME"] == "net1" and overridden["GLOO_SOCKET_IFNAME"] == "eth0"
    assert overridden["VLLM_HOST_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}


@pytest.fixture
def fake_vllm(tmp_path: Path) -> Iterator[Path]:
    """A `vllm` on PATH that writes its argv (one argument per line) to $RECORD."""
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    yield script.parent


def _run_member(container: dict[str, Any], rank: str, bin_dir: Path, record: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGOSY_NODE_RANK": rank, "VLLM_HOST_IP": "127.0.0.9",
           "RECORD": str(record)}
    return subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True,
                          timeout=30)


def test_mp_leader_and_worker_commands(fake_vllm: Path, tmp_path: Path) -> None:
    container = _container(_objects("mp")[("StatefulSet", "llama-405b-g1")])
    leader, worker = tmp_path / "leader", tmp_path / "worker"
    assert _run_member(container, "0", fake_vllm, leader).returncode == 0
    assert _run_member(container, "1", fake_vllm, worker).returncode == 0
    lead = leader.read_text().split("\n")[:-1]
    work = worker.read_text().split("\n")[:-1]
    assert lead[:2] == ["serve", "meta-llama/Llama-3.1-405B-Instruct"]
    joined = " ".join(lead)
    for flags in ("--tensor-parallel-size 8", "--pipeline-parallel-size 2", "--nnodes 2", "--node-rank 0",
                  "--master-addr llama-405b-g1-0.llama-405b-g1.team-a.svc", "--master-port 29500",
                  "--distributed-executor-backend mp"):
        assert flags in joined
    assert "--headless" not in lead
    assert work == [*lead[: lead.index("--node-rank")], "--node-rank", "1", "--headless"]


def test_a_member_without_its_rank_refuses_to_start(fake_vllm: Path, tmp_path: Path) -> None:
    container = _container(_objects("mp")[("StatefulSet", "llama-405b-g0")])
    env = {"PATH": f"{fake_vllm}:{os.environ['PATH']}", "RECORD": str(tmp_path / "x")}
    result = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0 and "pod-index label is missing" in result.stderr
    assert not (tmp_path / "x").exists()


def test_ray_commands_start_a_head_wait_for_the_gpus_then_serve_on_ray() -> None:
    container = _container(_objects("ray")[("StatefulSet", "llama-405b-g0")])
    script = container["command"][2]
    assert "ray start --head --port=6379" in script and "--num-gpus=8" in script
    assert "python3 - --gpus 16 --nodes 2 --timeout 900 --worker llama-405b-g0-1.llama-405b-g0.team-a.svc" in script
    assert "exec ray start --address=llama-405b-g0-0.llama-405b-g0.team-a.svc:6379" in script and "--block" in script
    assert "--disable-usage-stats" in script
    # The wait program is the packaged file, rendered whole.
    assert "def shortfall(" in script and "# argosy_operator/programs/ray_wait.py" in script
    args = container["args"]
    assert args[-2:] == ["--distributed-executor-backend", "ray"]
    assert "--nnodes" not in args and "--master-addr" not in args


@pytest.mark.parametrize("executor", gb.EXECUTORS)
def test_probes_check_the_leaders_health_and_the_workers_connection(executor: gb.Executor) -> None:
    container = _container(_objects(executor)[("StatefulSet", "llama-405b-g0")])
    port = "29500" if executor == "mp" else "6379"
    readiness = container["readinessProbe"]["exec"]["command"][2]
    assert 'os.environ["VLLM_HOST_IP"] + ":8000/health"' in readiness and readiness.rstrip().endswith(port)
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 2400
    liveness = container["livenessProbe"]["exec"]["command"][2]
    assert "connected" not in liveness and liveness.endswith("exit 0")


def _probe(command: list[str], rank: str, host: str = "127.0.0.1") -> int:
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "ARGOSY_NODE_RANK": rank,
           "VLLM_HOST_IP": host}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def _readiness(port: int) -> list[str]:
    inputs = gb.GroupInputs(server=SERVER, index=0, executor="mp", master_port=port)
    probe = gb.build_group_statefulset(inputs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    command: list[str] = probe["exec"]["command"]
    return command


def test_worker_readiness_follows_its_connection_to_the_leader() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        argv = _readiness(port)
        assert _probe(argv, "1") == 1  # not connected yet
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                assert _probe(argv, "1") == 0


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_leader_readiness_is_vllms_health_on_the_pods_own_address() -> None:
    host = f"127.0.{random.randint(100, 250)}.{random.randint(2, 250)}"
    argv = _readiness(29500)
    assert _probe(argv, "0", host) != 0  # nothing listens there yet
    server = http.server.HTTPServer((host, 8000), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _probe(argv, "0", host) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_connected_reads_established_remote_ports() -> None:
    table = [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1",
        "   1: 0900007F:D431 0100007F:732C 01 00000000:00000000 00:00000000 00000000     0        0 2",
        "   2: 0900007F:D432 0100007F:18EB 06 00000000:00000000 00:00000000 00000000     0        0 3",
    ]
    assert connected.established_remote_ports(table) == {0x732C}  # listening and TIME_WAIT rows do not count


def test_ray_wait_names_what_is_missing() -> None:
    nodes = ray_wait.alive_nodes([
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {"GPU": 8.0, "CPU": 64.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.6", "Resources": {"GPU": 8.0}},
    ])
    gap = ray_wait.shortfall(nodes, 2, 16, ["g-1.g.ns.svc"], {"g-1.g.ns.svc": "10.0.0.6"}.get)
    assert gap and (gap.nodes, gap.gpus, gap.missing_workers) == (1, 8.0, ("g-1.g.ns.svc",))
    text = ray_wait.describe(nodes, 2, 16, gap)
    assert "8 of 16 GPUs on 1 of 2 nodes" in text and "g-1.g.ns.svc" in text and "10.0.0.5 (8 GPUs)" in text
    assert not ray_wait.shortfall([*nodes, ray_wait.NodeView("10.0.0.6", 8.0)], 2, 16)


def test_long_names_keep_group_names_within_kubernetes_limits() -> None:
    long = "a" * 63
    names = {gb.group_name(long, i) for i in range(3)} | {gb.group_name(long[:-1] + "b", 0)}
    assert len(names) == 4
    assert all(len(n) <= gb.GROUP_NAME_MAX for n in names)
    assert gb.group_name("llama-3.1-405b", 0).startswith("llama-3-1-405b-")
