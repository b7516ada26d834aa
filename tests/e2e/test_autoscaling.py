"""Autoscaling and scale from zero on the sandbox: operator and gateways as local processes, the
sandbox's pod runner serving each vLLM pod with the simulator, the OpenAI SDK as the client.

Windows are seconds here (spec.autoscaling takes them from the LLMDeployment), and the
operator looks every second (ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from test_gateway_k8s import FACTS, GatewayProcess
from test_operator import Cluster, Operator, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

MODEL = "sleepy"


def autoscaled(target: int, **windows: int) -> dict[str, Any]:
    return {
        "model": {"uri": f"hf://example/{MODEL}", "servedModelNames": [MODEL], "facts": FACTS},
        "replicas": 0,
        "gpu": {"count": 1},
        # 20 ms per token (the sandbox's simulator reads it from the pod's env): a 100-token answer
        # takes 2 s, long enough to be seen in flight.
        "engine": {"maxModelLen": 4096, "env": [{"name": "ARGOSY_VLLM_SIM_ITL_MS", "value": "20"}]},
        "autoscaling": {
            "enabled": True,
            "minReplicas": 0,
            "maxReplicas": 3,
            "targetInFlightPerReplica": target,
            "scaleUpWindowSeconds": windows.get("up", 2),
            "scaleDownWindowSeconds": windows.get("down", 8),
            "scaleToZeroAfterSeconds": windows.get("zero", 12),
        },
    }


class ReplicaWatch:
    """Samples spec.replicas every 0.2 s in a thread: what a scale sequence really was."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.seen: list[int] = []
        self.changes: list[tuple[float, int]] = []  # (monotonic time, replicas)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        obj = self.cluster.get("llmdeployment", self.name)
        if obj is not None:
            replicas = int(obj["spec"].get("replicas", 0))
            if not self.seen or self.seen[-1] != replicas:
                self.seen.append(replicas)
                self.changes.append((time.monotonic(), replicas))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def __enter__(self) -> ReplicaWatch:
        self._sample()  # the state before anything is sent
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    """One client per gateway, shared by the threads (made before the burst, so requests arrive together)."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, stream: bool, max_tokens: int = 8) -> tuple[str, float]:
    """One chat request; (finish reason, seconds until the answer was complete)."""
    started = time.monotonic()
    messages = [{"role": "user", "content": "wake up"}]
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                                                stream=True)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        reason = reasons[-1] if reasons else ""
    else:
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
        reason = response.choices[0].finish_reason or ""
    return reason, time.monotonic() - started


def events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    return [e for e in json.loads(out)["items"] if e.get("source", {}).get("component") == "argosy-operator"
            and e["reason"] in ("ScaledUp", "ScaledDown", "ScaledToZero")]


@pytest.fixture
def gateways(kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        for i in range(2):
            # Two retries, not one: should a just-added endpoint refuse connections (a sandbox whose
            # pods turn Ready before their server listens), a request still finds a listening one.
            process = GatewayProcess(kubeconfig, namespace, tmp_path / f"gateway-{i}.log",
                                     extra_env={"ARGOSY_GATEWAY_RETRIES": "2"})
            started.append(process)
        for process in started:
            assert wait_for("a gateway to be ready", lambda p=process: p.get("/readyz")[0] == 200, 90)
        yield started
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def autoscaling_operator(
    crd: None, kubeconfig: Path, namespace: str, tmp_path: Path, gateways: list[GatewayProcess]
) -> Iterator[Operator]:
    env = {
        "ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS": "1",
        "ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_METRICS": ",".join(f"{g.url}/metrics" for g in gateways),
    }
    operator = Operator(kubeconfig, namespace, tmp_path / "operator.log", env=env)
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


@pytest.fixture
def cluster(sandbox: Any, namespace: str) -> Cluster:
    return Cluster(sandbox, namespace)


def asleep(gateway: GatewayProcess) -> Callable[[], bool]:
    return lambda: gateway.models().get(MODEL, {}).get("scaledToZero") is True


def test_scale_from_zero_up_down_and_back_to_zero(
    cluster: Cluster, gateways: list[GatewayProcess], autoscaling_operator: Operator
) -> None:
    gateway = gateways[0]
    # Target 25: the 20 first requests fit one replica, so the wake-up must be exactly 0 -> 1.
    cluster.apply(MODEL, autoscaled(target=25, down=6, zero=15))
    assert wait_for("the model listed as scaled to zero", asleep(gateway), 30)

    clients = [sdk(g) for g in gateways]
    with ReplicaWatch(cluster, MODEL) as watch, ThreadPoolExecutor(20) as pool:
        first_sent = time.monotonic()
        results = list(pool.map(lambda i: ask(clients[0], stream=i % 2 == 0), range(20)))
    print(f"scale from zero: first request to its answer {min(t for _, t in results):.2f} s, "
          f"slowest of 20 {max(t for _, t in results):.2f} s (sent at t=0, {time.monotonic() - first_sent:.2f} s all)")
    assert [reason for reason, _ in results] == ["length"] * 20
    assert watch.seen == [0, 1], watch.seen
    assert metric(gateway.url, "argosy_gateway_requests", model=MODEL, status="503") == 0
    # One write woke it: the gateway's patch, or the autoscaler's when it read the held requests first
    # (the gateway's patch then meets a changed resourceVersion: 409, and it backs off).
    woken = sum(metric(g.url, "argosy_gateway_wakeups_total", model=MODEL, result="patched") for g in gateways)
    assert woken <= 1

    # Load: 12 requests always in flight at target 4 -> 3 replicas.
    cluster.kubectl("patch", "llmdeployment", MODEL, "--type=merge",
                    "-p", json.dumps({"spec": {"autoscaling": {"targetInFlightPerReplica": 4}}}))
    stop = threading.Event()
    failures: list[str] = []
    refused: list[openai.InternalServerError] = []

    def keep_busy(i: int) -> None:
        while not stop.is_set():
            try:
                reason, _ = ask(clients[i % 2], stream=i % 2 == 0, max_tokens=100)
            except openai.InternalServerError as error:
                if error.status_code != 502 or "Cannot connect" not in str(error):
                    raise
                refused.append(error)
                continue
            if reason != "length":
                failures.append(reason)

    with ReplicaWatch(cluster, MODEL) as after, ThreadPoolExecutor(12) as pool:
        load_started = time.monotonic()
        busy = [pool.submit(keep_busy, i) for i in range(12)]
        try:
            wait_for("3 ready replicas under load", lambda: gateway.models()[MODEL]["readyEndpoints"] == 3, 60)
            print(f"under load: 3 replicas {time.monotonic() - load_started:.1f} s after the load started")
        finally:
            stop.set()
            pool.shutdown(wait=True)  # the last requests finish: the load has stopped
            load_stopped = time.monotonic()
        assert failures == []
        # No 503 and no upstream failure; connections refused by a Ready pod are counted apart
        # and printed (the pod runner reports readiness from the pod's probes: expect none).
        assert [f.exception() for f in busy] == [None] * 12
        print(f"under load: {len(refused)} requests met a Ready pod that was not listening yet")
        assert refused == [], refused
        # Idle: fewer replicas after the down-window (6 s), none after 15 s without traffic.
        wait_for("replicas back to 0", lambda: after.seen[-1] == 0, 90)
    first_drop = next(t for t, r in after.changes if t > load_stopped and r < 3) - load_stopped
    zero_at = next(t for t, r in after.changes if r == 0) - load_stopped
    print(f"after the load: replicas {after.seen}; first drop at {first_drop:.1f} s, zero at {zero_at:.1f} s")
    assert max(after.seen) == 3 and after.seen[-1] == 0, after.seen
    assert first_drop >= 6 - 1.5  # not before the down-window (less a look and a sample of jitter)
    assert zero_at >= 15 - 1.5
    assert wait_for("the model listed as scaled to zero again", asleep(gateway), 30)

    reasons = [e["reason"] for e in events(cluster, MODEL)]
    assert "ScaledUp" in reasons and "ScaledDown" in reasons and "ScaledToZero" in reasons, reasons
    assert any(e["reason"] == "ScaledUp" and "-> 3" in e["message"] and "target 4/replica" in e["message"]
               and "in flight" in e["message"] for e in events(cluster, MODEL)), events(cluster, MODEL)
    status = (cluster.get("llmdeployment", MODEL) or {})["status"]["autoscaling"]
    assert status["desiredReplicas"] == 0 and status["recommendations"]
    assert metric(f"http://127.0.0.1:{autoscaling_operator.port}", "argosy_operator_autoscaler_decisions_total",
                  llmdeployment=MODEL, reason="ScaledToZero") >= 1


def test_two_gateways_waking_one_model_at_once_make_one_scale_up(
    cluster: Cluster, gateways: list[GatewayProcess], autoscaling_operator: Operator
) -> None:
    cluster.apply(MODEL, autoscaled(target=50))
    for gateway in gateways:
        assert wait_for("the model listed as scaled to zero", asleep(gateway), 30)
    barrier = threading.Barrier(16)
    clients = [sdk(g) for g in gateways]

    def at_once(i: int) -> tuple[str, float]:
        barrier.wait()
        return ask(clients[i % 2], stream=i % 2 == 1)

    with ReplicaWatch(cluster, MODEL) as watch, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(at_once, range(16)))
    assert [reason for reason, _ in results] == ["length"] * 16
    assert watch.seen == [0, 1], watch.seen
    patched = [metric(g.url, "argosy_gateway_wakeups_total", model=MODEL, result="patched") for g in gateways]
    # One write woke it (the autoscaler may have been first, from the held requests it reads).
    assert sum(patched) <= 1, patched
    print(f"two gateways: wake-up patches {patched}, slowest answer {max(t for _, t in results):.2f} s")
