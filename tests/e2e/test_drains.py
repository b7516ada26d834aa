"""Drains that lose nothing: streams in flight on a pod that a scale-down or a rollout removes all
end normally, as the OpenAI SDK sees them through the gateway; and on the leader of a multi-node
group that a scale-down removes with its worker.

The operator and the gateway run as local processes; the sandbox's pod runner serves each vLLM pod
with the simulator and stops a deleted pod as a kubelet does (the pod's preStop hook, SIGTERM, the
grace period). The simulator aborts what is in flight on SIGTERM, as vLLM does by default, so a
stream survives only if the drain (the gateway dropping the pod, the hook waiting for vLLM's
in-flight requests) works.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from test_gateway_k8s import FACTS, GatewayProcess
from test_operator import Cluster, operator, wait_for  # noqa: F401 (operator: the fixture every test here uses)
from test_real_vllm_group import FACTS as FACTS_14B  # 27.5 GiB of bf16 weights: more than one L4 holds

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420), pytest.mark.usefixtures("crd", "operator")]

MODEL = "drained"
ITL_MS = 200
MAX_TOKENS = 60  # 60 x 200 ms: every stream lasts 12 s, well past the hook's first 5 s


def drained(replicas: int, **engine: Any) -> dict[str, Any]:
    return {
        "model": {"uri": f"hf://example/{MODEL}", "servedModelNames": [MODEL], "facts": FACTS},
        "replicas": replicas,
        "gpu": {"count": 1},
        "engine": {"maxModelLen": 4096, "terminationGracePeriodSeconds": 60,
                   "env": [{"name": "ARGOSY_VLLM_SIM_ITL_MS", "value": str(ITL_MS)}], **engine},
    }


def grouped(replicas: int) -> dict[str, Any]:
    """Replicas of two pods each on the sandbox's L4 nodes (tensor 1 x pipeline 2, vLLM's mp executor)."""
    spec = drained(replicas)
    spec["model"]["facts"] = FACTS_14B
    spec["gpu"] = {"count": "auto", "products": ["NVIDIA-L4"]}
    spec["engine"].update(maxModelLen=512, distributedExecutor="mp")
    return spec


@dataclass
class Outcome:
    endpoint: str
    done: bool  # the stream's last event was `data: [DONE]`
    finish_reason: str | None
    completion_tokens: int | None
    content_chunks: int
    ended: float


def stream_once(client: openai.OpenAI, index: int, started: threading.Semaphore) -> Outcome:
    """One streamed chat completion through the SDK, read event by event as the client sees it."""
    prompt = f"stream {index} {secrets.token_hex(4)}"
    done, reason, tokens, chunks = False, None, None, 0
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
    ) as response:
        endpoint = response.headers.get("x-argosy-endpoint", "")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if done:  # anything after [DONE] is a broken stream
                done = False
                break
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if choice["delta"].get("content"):
                    chunks += 1
                    if chunks == 1:
                        started.release()
                reason = choice.get("finish_reason") or reason
    return Outcome(endpoint, done, reason, tokens, chunks, time.monotonic())


class PodWatch:
    """Samples the model's pods every 0.2 s: when each got its deletionTimestamp and when it was gone."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ips: dict[str, str] = {}  # pod name -> pod IP
        self.deleting: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        out = self.cluster.kubectl("get", "pods", "-l", f"argosy.dev/deployment={MODEL}", "-o", "json").stdout
        now = time.monotonic()
        present = set()
        for pod in json.loads(out)["items"]:
            name = pod["metadata"]["name"]
            present.add(name)
            if pod["status"].get("podIP"):
                self.ips[name] = pod["status"]["podIP"]
            if pod["metadata"].get("deletionTimestamp"):
                self.deleting.setdefault(name, now)
        for name in set(self.ips) - present:
            self.gone.setdefault(name, now)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def __enter__(self) -> PodWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def gateway(kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    # No retries: a request the gateway sent to a pod going away would fail, not be retried elsewhere.
    process = GatewayProcess(kubeconfig, namespace, tmp_path / "gateway.log", extra_env={"ARGOSY_GATEWAY_RETRIES": "0"})
    try:
        assert wait_for("the gateway to be ready", lambda: process.get("/readyz")[0] == 200, 90)
        yield process
    finally:
        process.stop()


def streams_through_a_change(cluster: Cluster, gateway: GatewayProcess, count: int,
                             change: dict[str, Any]) -> tuple[list[Outcome], PodWatch, float]:
    """`count` streams in flight (each has its first token), then `kubectl patch` of the spec with `change`;
    (what each stream saw, the pod watch, when the change was made)."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = threading.Semaphore(0)
    with PodWatch(cluster) as watch, ThreadPoolExecutor(count) as pool:
        futures: list[Future[Outcome]] = [pool.submit(stream_once, client, i, started) for i in range(count)]
        for _ in range(count):
            assert started.acquire(timeout=60), "not every stream got its first token"
        assert not any(f.done() for f in futures)
        cluster.kubectl("patch", "llmdeployment", MODEL, "--type=merge", "-p", json.dumps({"spec": change}))
        changed = time.monotonic()
        outcomes = [f.result() for f in futures]  # raises what a failed request raised
        wait_for("the removed pods to be gone", lambda: watch.deleting and set(watch.deleting) <= set(watch.gone), 90)
    return outcomes, watch, changed


def assert_every_stream_completed(outcomes: list[Outcome]) -> None:
    broken = [o for o in outcomes if not (o.done and o.finish_reason == "length" and o.completion_tokens == MAX_TOKENS
                                          and o.content_chunks == MAX_TOKENS)]
    assert broken == [], broken


def report(what: str, outcomes: list[Outcome], watch: PodWatch, changed: float, removed: list[str]) -> None:
    last_end = max(o.ended for o in outcomes)
    for name in removed:
        print(f"{what}: pod {name} marked for deletion {watch.deleting[name] - changed:.1f} s after the change, "
              f"gone {watch.gone[name] - last_end:+.1f} s after the last stream ended")


def test_a_scale_down_finishes_the_streams_of_the_pod_it_removes(cluster: Cluster, gateway: GatewayProcess) -> None:
    cluster.apply(MODEL, drained(replicas=2))
    cluster.wait_ready(MODEL, 2)
    wait_for("two endpoints in the gateway", lambda: gateway.models().get(MODEL, {}).get("readyEndpoints") == 2, 30)

    outcomes, watch, changed = streams_through_a_change(cluster, gateway, 100, {"replicas": 1})
    assert_every_stream_completed(outcomes)
    [removed] = watch.deleting
    on_removed = [o for o in outcomes if o.endpoint == f"{watch.ips[removed]}:8000"]
    print(f"scale-down 2 -> 1: {len(on_removed)} of 100 streams were on the removed pod, all ended with [DONE]")
    assert len(on_removed) >= 40  # the gateway spreads by requests in flight: about half
    report("scale-down", outcomes, watch, changed, [removed])
    # The pod stayed until its last stream had ended, and went soon after (the hook polls each second).
    assert watch.gone[removed] >= max(o.ended for o in on_removed) - 0.5
    assert watch.gone[removed] - max(o.ended for o in on_removed) < 10
    assert len(cluster.pods(MODEL)) == 1


def test_a_rollout_finishes_the_streams_of_the_pod_it_replaces(cluster: Cluster, gateway: GatewayProcess) -> None:
    cluster.apply(MODEL, drained(replicas=1))
    cluster.wait_ready(MODEL, 1)
    [old] = cluster.pods(MODEL)
    wait_for("the endpoint in the gateway", lambda: gateway.models().get(MODEL, {}).get("readyEndpoints") == 1, 30)

    # A new engine setting changes the pod template: the Deployment replaces the pod.
    env = [{"name": "ARGOSY_VLLM_SIM_ITL_MS", "value": str(ITL_MS)}, {"name": "ROLLED", "value": "1"}]
    outcomes, watch, changed = streams_through_a_change(cluster, gateway, 50, {"engine": {"env": env}})
    assert_every_stream_completed(outcomes)
    assert list(watch.deleting) == [old["metadata"]["name"]]
    assert {o.endpoint for o in outcomes} == {f"{old['status']['podIP']}:8000"}
    print("rollout: 50 of 50 streams were on the replaced pod, all ended with [DONE]")
    report("rollout", outcomes, watch, changed, list(watch.deleting))
    assert watch.gone[old["metadata"]["name"]] >= max(o.ended for o in outcomes) - 0.5
    new = wait_for("the new pod Ready", lambda: cluster.wait_ready(MODEL, 1) and cluster.pods(MODEL), 120)
    assert new[0]["metadata"]["name"] != old["metadata"]["name"]


def test_a_scale_down_finishes_the_streams_of_the_group_it_removes(cluster: Cluster, gateway: GatewayProcess) -> None:
    """Two groups of two pods (a leader serving, a headless worker holding the second pipeline stage) on
    the four L4 nodes; scaling to one group deletes both pods of a group at once. The leader's hook waits
    for its own streams, the worker's for the leader's: a worker gone first would end the leader's group."""
    cluster.apply(MODEL, grouped(replicas=2))

    def two_groups_ready() -> bool:
        status = (cluster.get("llmdeployment", MODEL) or {}).get("status") or {}
        groups = status.get("groups") or []
        return (len(groups) == 2 and all(g["ready"] for g in groups) and len(cluster.pods(MODEL)) == 4
                and gateway.models().get(MODEL, {}).get("readyEndpoints") == 2)

    wait_for("two groups ready, two leaders in the gateway", two_groups_ready, 120)
    placement = (cluster.get("llmdeployment", MODEL) or {})["status"]["placement"]
    parallel = (placement["tensorParallelSize"], placement["pipelineParallelSize"], placement["podsPerReplica"])
    assert parallel == (1, 2, 2)

    outcomes, watch, changed = streams_through_a_change(cluster, gateway, 40, {"replicas": 1})
    assert_every_stream_completed(outcomes)
    leader, worker = f"{MODEL}-g1-0", f"{MODEL}-g1-1"
    assert set(watch.deleting) == {leader, worker}  # the whole second group, nothing of the first
    on_removed = [o for o in outcomes if o.endpoint == f"{watch.ips[leader]}:8000"]
    print(f"group scale-down 2 -> 1: {len(on_removed)} of 40 streams were on the removed group's leader, "
          "all ended with [DONE]")
    assert len(on_removed) >= 12  # the gateway spreads by requests in flight: about half
    report("group scale-down", outcomes, watch, changed, [leader, worker])
    # Both members stayed until the leader's last stream had ended.
    last_on_removed = max(o.ended for o in on_removed)
    assert min(watch.gone[leader], watch.gone[worker]) >= last_on_removed - 0.5
    assert watch.gone[leader] - last_on_removed < 10
    pods = sorted(p["metadata"]["name"] for p in cluster.pods(MODEL))
    assert pods == [f"{MODEL}-g0-0", f"{MODEL}-g0-1"]
    assert gateway.models()[MODEL]["readyEndpoints"] == 1
