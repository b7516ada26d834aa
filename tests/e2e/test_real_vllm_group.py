"""A replica that spans two nodes, served by real vLLM on the sandbox: kubectl apply to streamed answers.

The operator and the gateway run as processes of this checkout; the sandbox's pod runner runs both
pods of the group with their own `/bin/sh -c` scripts (group_builders.mp_script), the image's `vllm`
being vLLM's CPU build on the stand-in model (docs/sandbox.md). A 14.8B-parameter model (inline
facts) does not fit one 24 GB L4, so the planner makes one replica of two pods on two L4 nodes,
tensor 1 x pipeline 2, with vLLM's multiprocessing executor: the leader serves the API, the worker
runs `vllm serve ... --headless` and holds the second pipeline stage.

The engine compiles with dynamo's eager backend instead of enforceEager: vLLM 0.32's CPU worker
skips its warm-up run in eager mode, and that run allocates the buffers a later pipeline stage
receives its input into, so eager mode fails the first request on stage 1 (docs/sandbox.md).

One group serves the whole test (each member takes ~4 GB and a minute or two to start here): it is
started once, restarted by killing the worker's process, and again by deleting the worker's pod.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from argosy_sandbox import chart
from argosy_sandbox import kubelet_plan as plan
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.podrunner import wait_for
from test_gateway_k8s import GatewayProcess, operator_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800), pytest.mark.usefixtures("crd")]

MODEL = "qwen-14b"
GROUP = f"{MODEL}-g0"
START_TIMEOUT_S = 600
# config.json facts of a Qwen2.5-14B-shaped model: 27.5 GiB of bf16 weights, more than one L4 holds.
FACTS = {
    "hiddenSize": 5120, "numHiddenLayers": 48, "numAttentionHeads": 40, "numKeyValueHeads": 8,
    "intermediateSize": 13824, "vocabSize": 152064, "maxPositionEmbeddings": 32768,
}
LLD = {
    "apiVersion": "argosy.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": MODEL},
    "spec": {
        "model": {"uri": "hf://Qwen/Qwen2.5-14B-Instruct", "servedModelNames": [MODEL], "facts": FACTS},
        "replicas": 1,
        "gpu": {"count": "auto", "products": ["NVIDIA-L4"]},
        "engine": {
            "maxModelLen": 512,
            "distributedExecutor": "mp",
            "args": ["--compilation-config", json.dumps({"mode": 2, "backend": "eager"})],
        },
    },
}


def _members(sandbox: Sandbox, namespace: str) -> list[dict[str, Any]]:
    pods = [p for p in chart.pods(sandbox, namespace, f"argosy.dev/group={GROUP}")
            if not p["metadata"].get("deletionTimestamp")]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def _lld(sandbox: Sandbox, namespace: str) -> dict[str, Any]:
    return dict(json.loads(sandbox.kubectl("get", "lld", MODEL, "-n", namespace, "-o", "json").stdout))


def _group_ready(sandbox: Sandbox, namespace: str, not_uids: set[str]) -> list[dict[str, Any]] | None:
    """Both members, new (none of `not_uids`), Ready; and the group Ready in status."""
    members = _members(sandbox, namespace)
    if len(members) != 2 or {m["metadata"]["uid"] for m in members} & not_uids:
        return None
    if not all(chart.is_ready(m) for m in members):
        return None
    groups = (_lld(sandbox, namespace).get("status") or {}).get("groups") or []
    return members if groups and groups[0].get("ready") else None


def _wait_for_group(sandbox: Sandbox, namespace: str, operator_log: Path, not_uids: set[str]) -> list[dict[str, Any]]:
    started = time.monotonic()
    found: list[dict[str, Any]] | None = None

    def ready() -> bool:
        nonlocal found
        found = _group_ready(sandbox, namespace, not_uids)
        return found is not None

    if not wait_for(ready, START_TIMEOUT_S, interval=2):
        logs = "".join(
            f"\n--- {m['metadata']['name']}:\n"
            + sandbox.kubectl("logs", "-n", namespace, m["metadata"]["name"], "--tail=40", check=False).stdout
            for m in _members(sandbox, namespace))
        raise AssertionError(f"the group was not Ready in {START_TIMEOUT_S} s\n"
                             f"{operator_log.read_text()[-3000:]}{logs}")
    print(f"group Ready {time.monotonic() - started:.0f} s after it was (re)started")
    assert found is not None
    return found


def _stream(gateway: GatewayProcess, leader: dict[str, Any]) -> str:
    """A chat answer streamed through the gateway with the OpenAI SDK; asserts the leader served it."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True)
        assert raw.headers["x-argosy-endpoint"] == f"{leader['status']['podIP']}:8000"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text.strip(), "the group streamed nothing"
    return text


@pytest.fixture
def real_namespace(sandbox: Sandbox, namespace: str) -> Iterator[str]:
    sandbox.kubectl("label", "namespace", namespace, f"{plan.BACKEND_KEY}=real")
    yield namespace
    # The members' processes go with the namespace; delete the model first so nothing is restarted.
    sandbox.kubectl("delete", "lld", MODEL, "-n", namespace, "--wait=false", check=False)


def test_a_pipeline_across_two_l4_nodes_serves_through_its_leader_and_restarts_as_a_group(
    sandbox: Sandbox, kubeconfig: Path, real_namespace: str, tmp_path: Path
) -> None:
    namespace = real_namespace
    gateway = GatewayProcess(kubeconfig, namespace, tmp_path / "gateway.log")
    try:
        with operator_process(kubeconfig, namespace, tmp_path / "operator.log") as operator_log:
            sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(LLD))
            leader, worker = _wait_for_group(sandbox, namespace, operator_log, set())

            placement = _lld(sandbox, namespace)["status"]["placement"]
            assert (placement["tensorParallelSize"], placement["pipelineParallelSize"],
                    placement["podsPerReplica"], placement["gpuProduct"]) == (1, 2, 2, "NVIDIA-L4")
            assert leader["spec"]["nodeName"] != worker["spec"]["nodeName"]
            assert leader["metadata"]["labels"]["argosy.dev/role"] == "leader"
            assert worker["metadata"]["labels"]["argosy.dev/role"] == "worker"

            # Each pod's own command ran, and its process is vLLM: the worker's `vllm serve ... --headless`.
            leader_ip = leader["status"]["podIP"]
            processes = {}
            for pod in (leader, worker):
                assert pod["spec"]["containers"][0]["command"][:2] == ["/bin/sh", "-c"]
                pid = chart.container_pid(pod)
                assert pid is not None
                processes[pod["metadata"]["name"]] = (pid, chart.cmdline(pid))
            worker_pid, worker_cmd = processes[f"{GROUP}-1"]
            _, leader_cmd = processes[f"{GROUP}-0"]
            for cmd in (leader_cmd, worker_cmd):
                assert cmd[3] == "serve" and cmd[2].endswith("vllm_launcher.py")
                joined = " ".join(cmd)
                assert "--pipeline-parallel-size 2" in joined and "--nnodes 2" in joined
                assert f"--master-addr {leader_ip}" in joined  # the leader's stable name, resolved
                assert "--distributed-executor-backend mp" in joined
            assert worker_cmd[-5:-2] == ["--node-rank", "1", "--headless"]
            assert worker_cmd[-2:] == ["--host", worker["status"]["podIP"]]
            assert "--headless" not in leader_cmd and "--node-rank 0" in " ".join(leader_cmd)

            assert wait_for(lambda: gateway.models().get(MODEL, {}).get("readyEndpoints") == 1, 30)
            print(f"answer: {_stream(gateway, leader)!r}")

            # The worker's process dies: the whole group is restarted and answers again.
            os.kill(worker_pid, signal.SIGKILL)
            killed = {leader["metadata"]["uid"], worker["metadata"]["uid"]}
            leader, worker = _wait_for_group(sandbox, namespace, operator_log, killed)
            (entry,) = _lld(sandbox, namespace)["status"]["groups"]
            assert entry["restarts"] >= 1 and entry["lastRestart"]["reason"] == "MemberRestarted"
            assert wait_for(lambda: gateway.models().get(MODEL, {}).get("readyEndpoints") == 1, 30)
            print(f"answer after the worker's process was killed: {_stream(gateway, leader)!r}")

            # kubectl delete of the worker pod: the same.
            sandbox.kubectl("delete", "pod", worker["metadata"]["name"], "-n", namespace, "--wait=false")
            deleted = {leader["metadata"]["uid"], worker["metadata"]["uid"]}
            leader, worker = _wait_for_group(sandbox, namespace, operator_log, deleted)
            (entry,) = _lld(sandbox, namespace)["status"]["groups"]
            assert entry["restarts"] >= 2 and entry["lastRestart"]["reason"] in ("MemberLost", "MemberReplaced")
            assert wait_for(lambda: gateway.models().get(MODEL, {}).get("readyEndpoints") == 1, 30)
            print(f"answer after the worker pod was deleted: {_stream(gateway, leader)!r}")
            events = json.loads(sandbox.kubectl("get", "events", "-n", namespace, "-o", "json",
                                                "--field-selector", "reason=GroupRestarted").stdout)
            assert len(events["items"]) >= 1
    finally:
        gateway.stop()
