"""The autoscaler loop's reading and writing helpers: real /metrics pages in, API bodies out.

The loop itself runs against the sandbox in tests/e2e/test_autoscaling.py; here one look
runs on the operator's caches with a recording client.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from argosy_gateway.metrics import GatewayMetrics
from argosy_gateway.routetable import EMPTY_TABLE
from argosy_gateway.settings import GatewaySettings
from argosy_gateway.wake import Waker
from argosy_operator import autoscaler
from argosy_operator.api import AutoscalingStatus
from argosy_operator.autoscaling_loop import (
    AutoscalingLoop,
    LoopSettings,
    Snapshot,
    event_for,
    is_serving,
    parse_held,
    parse_selector,
    parse_vllm_metrics,
    restored_state,
    served_names,
    status_patch,
)
from argosy_operator.settings import OperatorSettings
from argosy_vllm_sim.server import SimConfig, SimServer
from prometheus_client import CollectorRegistry, generate_latest


async def test_running_waiting_and_finished_are_read_from_a_vllm_metrics_page() -> None:
    config = SimConfig(models=("m",), port=0, ttft_ms=0, itl_ms=100, max_num_seqs=2)
    async with SimServer(config) as server, aiohttp.ClientSession() as http:
        body = {"model": "m", "prompt": "hello", "max_tokens": 8}

        async def complete() -> int:
            async with http.post(f"{server.url}/v1/completions", json=body) as response:
                await response.read()
                return response.status

        await complete()  # one finished request
        busy = [asyncio.create_task(complete()) for _ in range(5)]
        await asyncio.sleep(0.3)
        async with http.get(f"{server.url}/metrics") as response:
            page = await response.text()
        assert await asyncio.gather(*busy) == [200] * 5
    running, waiting, finished = parse_vllm_metrics(page)
    assert (running, waiting, finished) == (2, 3, 1)


def test_a_page_without_the_finished_counter_says_unknown() -> None:
    page = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\"} 4.0\n"
    assert parse_vllm_metrics(page) == (4, 0, None)


async def test_held_requests_are_read_from_the_gateways_metrics_page() -> None:
    metrics = GatewayMetrics()
    waker = Waker(GatewaySettings(), metrics.registry, lambda: EMPTY_TABLE)
    waker.held_gauge.labels("llama-8b").inc(3)
    waker.held_gauge.labels("qwen").inc(1)
    waker.held_gauge.labels("qwen").dec(1)
    assert parse_held(generate_latest(metrics.registry).decode()) == {"llama-8b": 3, "qwen": 0}


def test_status_round_trips_through_the_api_model() -> None:
    state = autoscaler.State(desired_replicas=3, last_active=1_800_000_123.7,
                             recommendations=((1_800_000_000.2, 1), (1_800_000_100.9, 3)))
    decision = autoscaler.Decision(3, 1, "ScaledUp", "replicas 1 -> 3: ...", 42, 3, state)
    patch = status_patch(decision, last_scale_time=1_800_000_100.0)
    written = patch["status"]["autoscaling"]
    assert written["lastScaleTime"] == "2027-01-15T08:01:40Z"
    parsed = AutoscalingStatus.model_validate(written)
    restored = restored_state(parsed)
    assert restored.desired_replicas == 3
    assert restored.last_active == 1_800_000_123
    assert restored.recommendations == ((1_800_000_000, 1), (1_800_000_100, 3))
    assert restored_state(None) == autoscaler.State()


def test_the_event_names_the_llmdeployment_and_carries_the_numbers() -> None:
    body = {"metadata": {"namespace": "team-a", "name": "llama", "uid": "u-1", "resourceVersion": "7"}}
    decision = autoscaler.Decision(2, 1, "ScaledUp", "replicas 1 -> 2: in flight 30", 30, 2, autoscaler.State())
    event = event_for(body, decision, now=datetime(2026, 12, 1, tzinfo=UTC).timestamp()).to_dict()
    assert event["involvedObject"] == {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
                                       "name": "llama", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7"}
    assert (event["reason"], event["type"]) == ("ScaledUp", "Normal")
    assert event["message"] == "replicas 1 -> 2: in flight 30"
    assert event["metadata"] == {"generateName": "llama.", "namespace": "team-a"}


def test_served_names_follow_status_then_spec_then_the_name() -> None:
    assert served_names({"metadata": {"name": "a"}, "status": {"servedModelNames": ["x"]}}) == ["x"]
    assert served_names({"metadata": {"name": "a"}, "spec": {"model": {"servedModelNames": ["y"]}}}) == ["y"]
    assert served_names({"metadata": {"name": "a"}}) == ["a"]


def test_loop_settings_come_from_the_environment_and_bad_ones_fail_at_start() -> None:
    settings = LoopSettings.from_env({
        "ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS": "2",
        "ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_METRICS": "http://127.0.0.1:1/metrics, http://127.0.0.1:2/metrics",
        "ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_SELECTOR": "app.kubernetes.io/component=gateway",
    })
    assert settings.interval_seconds == 2
    assert settings.gateway_metrics_urls == ("http://127.0.0.1:1/metrics", "http://127.0.0.1:2/metrics")
    assert parse_selector(settings.gateway_selector) == {"app.kubernetes.io/component": "gateway"}
    assert LoopSettings.from_env({}).interval_seconds == 15
    with pytest.raises(ValueError, match="only key=value"):
        LoopSettings.from_env({"ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_SELECTOR": "app in (a,b)"})
    with pytest.raises(ValueError, match="must be positive"):
        LoopSettings.from_env({"ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS": "0"})


class _RecordingClient:
    """Stands in for the operator's lightkube client: records writes, refuses to LIST."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, dict[str, Any]]] = []

    async def patch(self, resource: Any, name: str, body: dict[str, Any], **_: Any) -> None:
        self.writes.append((resource.__name__, name, body))

    async def create(self, body: Any) -> None:
        self.writes.append(("Event", "", body.to_dict()))

    def list(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("the autoscaler listed from the API server although the caches were given")

    async def close(self) -> None:
        return None


def _autoscaled(name: str, enabled: bool) -> dict[str, Any]:
    return {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": "7"},
            "spec": {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "replicas": 1,
                     "autoscaling": {"enabled": enabled, "minReplicas": 2, "maxReplicas": 4}}}


async def test_a_look_decides_from_the_operator_caches_without_listing() -> None:
    client = _RecordingClient()
    snapshots: list[Snapshot | None] = [None, ([_autoscaled("m", True), _autoscaled("off", False)], {("ns", "m"): []})]
    loop = AutoscalingLoop(OperatorSettings(), LoopSettings(), CollectorRegistry(), client=client,
                           snapshot=lambda: snapshots[0])
    await loop.look()  # caches not synced yet: no decision on a partial view
    assert client.writes == []
    snapshots.pop(0)
    await loop.look()
    # Only the autoscaled object, raised to its minimum, against the cached resourceVersion;
    # then its Event and status.autoscaling.
    assert [w[:2] for w in client.writes] == [("LLMDeploymentScale", "m"), ("Event", ""),
                                              ("LLMDeploymentStatus", "m")]
    assert client.writes[0][2] == {"spec": {"replicas": 2}, "metadata": {"resourceVersion": "7"}}


def test_only_servers_and_group_leaders_are_read_for_load() -> None:
    def pod(role: str, managed_by: str = "argosy-operator") -> dict[str, Any]:
        return {"metadata": {"labels": {"app.kubernetes.io/managed-by": managed_by, "argosy.dev/role": role}}}

    assert [is_serving(p) for p in (pod("server"), pod("leader"), pod("worker"), pod("server", "someone"))] == [
        True, True, False, False]
