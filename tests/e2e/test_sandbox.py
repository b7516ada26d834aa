"""The sandbox behaves like a small GPU cluster: pools, scheduling, pod IPs, the pod runner, GC, lifecycle."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from argosy_sandbox.cluster import Sandbox, allocate_pod_cidr
from argosy_sandbox.podrunner import wait_for
from argosy_sandbox.pools import DEFAULT_POOLS, GpuSpec, NodePool

pytestmark = pytest.mark.e2e


def gpu_deployment(name: str, gpus: int) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        "containers": [
                            {"name": "main", "image": "example.invalid/none",
                             "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
                        ],
                    },
                },
            },
        }
    )


def pods(sandbox: Sandbox, namespace: str, selector: str) -> list[dict]:
    listing = sandbox.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    return json.loads(listing.stdout)["items"]


def node_labels(sandbox: Sandbox, name: str) -> dict[str, str]:
    return json.loads(sandbox.kubectl("get", "node", name, "-o", "json").stdout)["metadata"]["labels"]


def test_every_pool_is_ready_with_gpu_labels_and_allocatable(sandbox: Sandbox) -> None:
    nodes = json.loads(sandbox.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {node["metadata"]["name"]: node for node in nodes}
    for pool in DEFAULT_POOLS:
        for index in range(pool.nodes):
            node = by_name[f"{pool.name}-{index}"]
            ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
            assert ready and ready[0]["status"] == "True", node["metadata"]["name"]
            labels = node["metadata"]["labels"]
            if pool.gpu is None:
                assert "nvidia.com/gpu" not in node["status"]["allocatable"]
                continue
            assert labels["nvidia.com/gpu.product"] == pool.gpu.product
            assert labels["nvidia.com/gpu.memory"] == str(pool.gpu.memory_mib)
            assert labels["nvidia.com/gpu.count"] == str(pool.gpu.count)
            assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(pool.gpu.count)
            assert node["status"]["allocatable"]["cpu"] and node["status"]["allocatable"]["memory"]


def test_eight_gpus_land_on_an_eight_gpu_node(sandbox: Sandbox, namespace: str) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("eight", 8))
    assert wait_for(lambda: any(p["spec"].get("nodeName") for p in pods(sandbox, namespace, "app=eight")), 30)
    node = pods(sandbox, namespace, "app=eight")[0]["spec"]["nodeName"]
    assert node_labels(sandbox, node)["nvidia.com/gpu.product"] in {
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-A100-SXM4-40GB",
    }


def test_nine_gpus_stay_pending_with_failed_scheduling(sandbox: Sandbox, namespace: str) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("nine", 9))

    def failed_scheduling() -> bool:
        events = json.loads(sandbox.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return any(event["reason"] == "FailedScheduling" for event in events)

    assert wait_for(failed_scheduling, 30)
    [pod] = pods(sandbox, namespace, "app=nine")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def vllm_deployment(name: str, args: list[str], **container: object) -> str:
    """A Deployment of the vLLM image; the sandbox's pod runner serves it with the simulator (the default)."""
    spec = {
        "name": "vllm", "image": "vllm/vllm-openai:v0.32.0", "command": ["vllm", "serve"], "args": args,
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": [{"name": "SERVED", "value": name}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        **container,
    }
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [spec]}}},
    })


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_the_pod_runner_runs_a_pods_container_on_its_loopback_ip(sandbox: Sandbox, namespace: str) -> None:
    # $(SERVED) is expanded from the container's env, as the kubelet does it.
    sandbox.kubectl("apply", "-n", namespace, "-f", "-",
                    input=vllm_deployment("served", ["org/model", "--served-model-name", "$(SERVED)"]))
    assert wait_for(lambda: any(ready(p) for p in pods(sandbox, namespace, "app=served")), 30), pods(
        sandbox, namespace, "app=served")
    [pod] = pods(sandbox, namespace, "app=served")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.0.0/8")
    [status] = pod["status"]["containerStatuses"]
    assert status["ready"] and status["started"] and "running" in status["state"]

    def models() -> list[str]:
        try:
            with urllib.request.urlopen(f"http://{ip}:8000/v1/models", timeout=1) as response:
                return [entry["id"] for entry in json.loads(response.read())["data"]]
        except OSError:
            return []

    assert models() == ["served"]
    # kubectl logs reaches the container's output through kwok.
    logs = sandbox.kubectl("logs", "-n", namespace, pod["metadata"]["name"], check=False)
    assert logs.returncode == 0, logs.stderr
    assert "simulator stands in" in logs.stdout
    # The pod goes away: so does its process.
    sandbox.kubectl("scale", "deployment/served", "-n", namespace, "--replicas=0")
    assert wait_for(lambda: not models(), 20)


def test_a_crashing_container_is_restarted_with_backoff_and_counted(sandbox: Sandbox, namespace: str) -> None:
    # The simulator refuses a port that is not a number and exits: the runner restarts it and counts.
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=vllm_deployment("crashing", ["m", "--port", "eighty"]))

    def restarts() -> int:
        found = pods(sandbox, namespace, "app=crashing")
        statuses = found[0]["status"].get("containerStatuses") if found else None
        return int(statuses[0].get("restartCount", 0)) if statuses else 0

    assert wait_for(lambda: restarts() >= 2, 30)
    [pod] = pods(sandbox, namespace, "app=crashing")
    [status] = pod["status"]["containerStatuses"]
    assert not ready(pod) and not status["ready"]
    assert status["lastState"]["terminated"]["exitCode"] != 0
    previous = sandbox.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "--previous", check=False)
    assert "eighty" in previous.stdout, previous.stderr


def test_deleting_a_deployment_garbage_collects_its_pods(sandbox: Sandbox, namespace: str) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("collected", 1))
    assert wait_for(lambda: len(pods(sandbox, namespace, "app=collected")) == 1, 30)
    sandbox.kubectl("delete", "deployment", "collected", "-n", namespace, "--wait=false")
    assert wait_for(lambda: not pods(sandbox, namespace, "app=collected"), 30)


def test_second_sandbox_recovers_from_a_crash_reports_taken_ports_and_stops_cleanly(tmp_path: Path) -> None:
    """A separate, one-node sandbox, so the shared one is not disturbed."""
    messages: list[str] = []
    pools = (NodePool("gpu", 1, cpu="8", memory="32Gi", gpu=GpuSpec("NVIDIA-L4", 23034, 1)),)
    other = Sandbox(state=tmp_path / "sandbox", pools=pools, report=messages.append)
    try:
        other.up()
        assert other.is_up()
        assert "argosy-sandbox" in other.kubectl("config", "current-context").stdout
        # Its pods get IPs of their own: two sandboxes' pod runners never bind the same address.
        assert other.pod_cidr != allocate_pod_cidr(Sandbox().state)

        # Up again: nothing restarts.
        messages.clear()
        other.up()
        assert sum("already running" in message for message in messages) == len(Sandbox.COMPONENTS)

        # Crash the apiserver hard; its pid file goes stale. Up repairs it.
        apiserver_pid = int(other.pid_path("kube-apiserver").read_text())
        os.kill(apiserver_pid, signal.SIGKILL)
        assert wait_for(lambda: not Path(f"/proc/{apiserver_pid}").exists() or not other._is_ours(apiserver_pid), 10)
        other.up()
        assert other.is_up()
        assert other.kubectl("get", "node", "gpu-0").returncode == 0

        # A recorded port taken by someone else is reported and replaced, never shared.
        other.down()
        ports = other.load_ports()
        assert ports is not None
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", ports.kwok))
            squatter.listen()
            messages.clear()
            other.up()
        assert any(f"port {ports.kwok}" in message and "in use" in message for message in messages)
        assert other.load_ports().kwok != ports.kwok
    finally:
        other.down()
    time.sleep(0.5)
    assert other.orphan_pids() == []
    assert all(status.state == "stopped" for status in other.status())
