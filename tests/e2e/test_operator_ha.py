"""The operator survives what production throws at it: a killed leader, a restarted API server.

Two `argosy-operator run --leader-elect` processes share one Lease: only the holder
reconciles. Killing it mid-rollout must hand the work to the standby within 15 s and
leave every LLMDeployment converged with exactly its children (none duplicated, none
lost). Separately, an API server restarted mid-rollout must not leave anything behind;
that test runs on a sandbox of its own, so restarting its API server disturbs no other test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argosy_operator import crd as crdgen
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.pools import GpuSpec, NodePool
from test_operator import Cluster, Operator, container_of, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

TAKEOVER_LIMIT = 15.0
MODEL = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}}
NAMES = tuple(f"ha-{i}" for i in range(4))


def elected(kubeconfig: Path, namespace: str, log_dir: Path, identity: str) -> Operator:
    """An operator replica that campaigns for the Lease `argosy-operator` in the test namespace."""
    return Operator(kubeconfig, namespace, log_dir / f"{identity}.log",
                    extra_args=("--leader-elect", "--lease-namespace", namespace),
                    env={"POD_NAME": identity})


def holder(cluster: Cluster) -> str:
    lease = cluster.get("lease", "argosy-operator") or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def metric(operator: Operator, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in operator.metrics().splitlines()
               if line.startswith(name) and not line.startswith("#"))


def children(cluster: Cluster, kind: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kind, "-l", f"argosy.dev/deployment={name}", "-o", "json").stdout
    return [o for o in json.loads(out)["items"] if not o["metadata"].get("deletionTimestamp")]


def converged(cluster: Cluster, name: str, arg: str, replicas: int) -> bool:
    """Ready on the current spec, and exactly one Deployment, one Service and `replicas` pods, all current."""
    ready = cluster.condition(name, "Ready")
    lld = cluster.get("llmdeployment", name) or {}
    if not ready or ready["status"] != "True" or (lld.get("status") or {}).get("readyReplicas") != replicas:
        return False
    deployments, services = children(cluster, "deployments", name), children(cluster, "services", name)
    pods = children(cluster, "pods", name)
    uid = lld["metadata"]["uid"]
    return (len(deployments) == 1 and len(services) == 1 and len(pods) == replicas
            and all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in deployments + services)
            and arg in container_of(deployments[0])["args"]
            and all(arg in container_of(p)["args"] for p in pods))


def wait_converged(cluster: Cluster, names: tuple[str, ...], arg: str, replicas: int = 1,
                   timeout: float = 90.0) -> None:
    for name in names:
        wait_for(f"{name} to converge on {arg}", lambda n=name: converged(cluster, n, arg, replicas), timeout)


def roll_out(cluster: Cluster, names: tuple[str, ...], arg: str, replicas: int = 1) -> None:
    for name in names:
        cluster.apply(name, {**MODEL, "replicas": replicas, "engine": {"args": [arg]}})


@pytest.fixture
def operators(crd: None, kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[dict[str, Operator]]:
    started: dict[str, Operator] = {}
    yield started
    for operator in started.values():
        operator.stop()


def test_the_standby_takes_over_a_killed_leader_mid_rollout(
        operators: dict[str, Operator], kubeconfig: Path, namespace: str, cluster: Cluster, tmp_path: Path) -> None:
    operators["a"] = elected(kubeconfig, namespace, tmp_path, "op-a")
    operators["a"].start()
    wait_for("op-a to hold the Lease", lambda: holder(cluster).startswith("op-a_"))
    operators["b"] = elected(kubeconfig, namespace, tmp_path, "op-b")
    operators["b"].start()

    roll_out(cluster, NAMES, "--enable-prefix-caching")
    wait_converged(cluster, NAMES, "--enable-prefix-caching")
    # The standby watched all along but reconciled and wrote nothing.
    standby = operators["b"]
    assert metric(standby, "argosy_operator_leader") == 0
    assert metric(standby, "argosy_operator_reconciles_total") == 0
    assert metric(standby, "argosy_operator_child_writes_total") == 0
    assert metric(operators["a"], "argosy_operator_leader") == 1

    roll_out(cluster, NAMES, "--enable-chunked-prefill")
    wait_for("the rollout to start", lambda: any(
        (d := cluster.get("deployment", n)) and "--enable-chunked-prefill" in container_of(d)["args"] for n in NAMES))
    killed = time.monotonic()
    operators["a"].stop(signal.SIGKILL)  # no graceful release: the Lease must expire
    wait_for("op-b to take the Lease", lambda: holder(cluster).startswith("op-b_"), timeout=TAKEOVER_LIMIT + 10)
    took = time.monotonic() - killed
    assert took <= TAKEOVER_LIMIT, f"the standby took {took:.1f} s to take over"
    assert metric(standby, "argosy_operator_leader") == 1
    wait_converged(cluster, NAMES, "--enable-chunked-prefill")

    # A clean shutdown releases the Lease: the other replica need not wait for it to expire.
    operators["a"] = elected(kubeconfig, namespace, tmp_path, "op-a")
    operators["a"].start()
    stopped = time.monotonic()
    standby.stop(signal.SIGTERM)
    wait_for("op-a to take the released Lease", lambda: holder(cluster).startswith("op-a_"), timeout=10)
    assert time.monotonic() - stopped <= 10
    roll_out(cluster, NAMES[:1], "--max-num-seqs=8")
    wait_converged(cluster, NAMES[:1], "--max-num-seqs=8")


@pytest.fixture
def own_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    pools = (NodePool("h100", 2, cpu="192", memory="2Ti", gpu=GpuSpec("NVIDIA-H100-80GB-HBM3", 81559, 8)),)
    state = tmp_path_factory.mktemp("apiserver-restart")
    other = Sandbox(state=state / "sandbox", pools=pools, report=lambda message: None)
    crd_file = state / "crd.yaml"
    crd_file.write_text(crdgen.render_manifest())
    try:
        other.up()
        other.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_file))
        other.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.argosy.dev", "--timeout=60s")
        yield other
    finally:
        other.down()


@pytest.mark.apiserver_restart
def test_every_model_converges_after_the_api_server_restarts_mid_rollout(
        own_sandbox: Sandbox, tmp_path: Path) -> None:
    namespace = "restart"
    own_sandbox.kubectl("create", "namespace", namespace)
    # Pods are counted, not served: the sandbox's pod runner marks them Ready without a process.
    own_sandbox.kubectl("label", "namespace", namespace, "sandbox.argosy.dev/vllm=none")
    cluster = Cluster(own_sandbox, namespace)
    # Leader election on, so the Lease's renewal through the outage is exercised as well.
    operator = elected(own_sandbox.kubeconfig, namespace, tmp_path, "op-only")
    operator.start()
    try:
        roll_out(cluster, NAMES, "--enable-prefix-caching", replicas=2)
        wait_converged(cluster, NAMES, "--enable-prefix-caching", replicas=2)

        roll_out(cluster, NAMES, "--enable-chunked-prefill", replicas=2)
        wait_for("the rollout to start", lambda: any(
            (d := cluster.get("deployment", n)) and "--enable-chunked-prefill" in container_of(d)["args"]
            for n in NAMES))
        apiserver = int(own_sandbox.pid_path("kube-apiserver").read_text())
        ports = own_sandbox.load_ports()
        os.kill(apiserver, signal.SIGKILL)
        wait_for("the API server to go", lambda: not own_sandbox._is_ours(apiserver), timeout=10)
        own_sandbox.up()  # starts it again on the same port and data; the rest kept running
        # The operator read the kubeconfig once: on another port it could never reconnect.
        assert own_sandbox.load_ports() == ports, "the restarted API server moved to another port"

        wait_converged(cluster, NAMES, "--enable-chunked-prefill", replicas=2, timeout=120)
        assert operator.proc is not None and operator.proc.poll() is None, "the operator died with the API server"
        assert holder(cluster).startswith("op-only_")
    finally:
        operator.stop()
