"""Scale from zero in the gateway: requests for a sleeping model are held, the model is woken once.

The route tables are published the way discovery publishes them; the scale patch is the one
piece replaced (tests/e2e/test_autoscaling.py sends the real one to the sandbox's API server).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import openai
import pytest
from argosy_gateway.routetable import DeploymentRef, ModelRoute, RouteTable

from .conftest import GatewayFactory
from .harness import RunningGateway, Simulator

MODEL = "sleepy"


def table(endpoints: tuple[str, ...], replicas: int, *, autoscaling: bool = True, version: str = "1") -> RouteTable:
    ref = DeploymentRef("team-a", MODEL, replicas=replicas, autoscaling=autoscaling, resource_version=version)
    return RouteTable.build([ModelRoute(MODEL, endpoints, deployment=ref)])


class FakeScale:
    """Stands in for `patch llmdeployments/scale`: records the calls; the 'operator' makes a pod later."""

    def __init__(self, gateway: RunningGateway, sim: Simulator, start_after: float) -> None:
        self.calls: list[DeploymentRef] = []
        self._gateway = gateway
        self._sim = sim
        self._start_after = start_after

    async def __call__(self, ref: DeploymentRef) -> bool:
        self.calls.append(ref)
        runtime = self._gateway.runtime
        runtime.publish(table((), 1, version="2"))  # the watch shows replicas 1, no pod yet
        loop = asyncio.get_running_loop()
        loop.call_later(self._start_after, runtime.publish, table((self._sim.url,), 1, version="3"))
        return True


class RecordingPatch:
    """A scale patch that records its calls and never makes a pod (the model never starts)."""

    def __init__(self) -> None:
        self.calls: list[DeploymentRef] = []

    async def __call__(self, ref: DeploymentRef) -> bool:
        self.calls.append(ref)
        return True


def client(gateway: RunningGateway, timeout: float = 30) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def held_metric(text: str) -> float:
    match = re.search(rf'^argosy_gateway_requests_held{{model="{MODEL}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def ask(sdk: openai.AsyncOpenAI, stream: bool) -> str:
    messages = [{"role": "user", "content": "wake up"}]
    if not stream:
        response = await sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        return response.choices[0].finish_reason or ""
    chunks = await sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True)  # type: ignore[arg-type]
    reasons = [c.choices[0].finish_reason async for c in chunks if c.choices and c.choices[0].finish_reason]
    return reasons[-1] if reasons else ""


async def sleeping_gateway(gateway_factory: GatewayFactory, **overrides: object) -> RunningGateway:
    gateway: RunningGateway = await gateway_factory(wait_loaded=False, static_config=None, **overrides)
    gateway.runtime.publish(table((), 0))
    return gateway


async def test_twenty_requests_half_streaming_wake_the_model_once_and_all_are_answered(
    gateway_factory: GatewayFactory, spawn_sim: Callable[..., Simulator]
) -> None:
    sim = spawn_sim([MODEL])
    gateway = await sleeping_gateway(gateway_factory)
    fake = FakeScale(gateway, sim, start_after=1.0)
    gateway.runtime.wake.patch_scale = fake

    async with client(gateway) as sdk, httpx.AsyncClient(base_url=gateway.url) as http:
        requests = [asyncio.create_task(ask(sdk, stream=i % 2 == 0)) for i in range(20)]
        await asyncio.sleep(0.6)
        during = (await http.get("/metrics")).text
        models = (await http.get("/v1/models")).json()["data"]
        results = await asyncio.gather(*requests, return_exceptions=True)
        after = (await http.get("/metrics")).text

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r in ("stop", "length") for r in results), results
    assert len(fake.calls) == 1 and fake.calls[0].resource_version == "1"
    assert held_metric(during) == 20
    assert held_metric(after) == 0
    assert 'argosy_gateway_wakeups_total{model="sleepy",result="patched"} 1.0' in after
    assert 'argosy_gateway_held_seconds_count{model="sleepy",outcome="ready"} 20.0' in after
    # While waking, the model is listed as known and not ready (replicas 1, no pod yet).
    assert models[0]["id"] == MODEL and models[0]["argosy"]["ready"] is False


async def test_a_sleeping_model_is_listed_as_scaled_to_zero(gateway_factory: GatewayFactory) -> None:
    gateway = await sleeping_gateway(gateway_factory)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        entry = (await http.get(f"/v1/models/{MODEL}")).json()
    assert entry["argosy"]["scaledToZero"] is True and entry["argosy"]["ready"] is False


async def test_past_the_wake_timeout_the_request_gets_503_with_retry_after(gateway_factory: GatewayFactory) -> None:
    gateway = await sleeping_gateway(gateway_factory, wake_timeout_seconds=0.5, retry_after_seconds=3)
    gateway.runtime.wake.patch_scale = never_starts = RecordingPatch()
    async with client(gateway) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(sdk, stream=True)
    error = caught.value
    assert error.status_code == 503
    assert error.response.headers["retry-after"] == "3"
    assert error.response.json()["error"]["code"] == "model_starting"
    assert len(never_starts.calls) == 1


async def test_past_the_queue_bound_requests_get_503_at_once(
    gateway_factory: GatewayFactory, spawn_sim: Callable[..., Simulator]
) -> None:
    sim = spawn_sim([MODEL])
    gateway = await sleeping_gateway(gateway_factory, wake_queue_length=2)
    gateway.runtime.wake.patch_scale = FakeScale(gateway, sim, start_after=2.0)
    async with client(gateway) as sdk:
        held = [asyncio.create_task(ask(sdk, stream=False)) for _ in range(2)]
        await asyncio.sleep(0.3)
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(sdk, stream=False)
        assert caught.value.status_code == 503
        assert caught.value.response.json()["error"]["code"] == "wake_queue_full"
        assert "retry-after" in caught.value.response.headers
        answered = await asyncio.gather(*held)
    assert all(reason in ("stop", "length") for reason in answered), answered


async def test_a_model_without_autoscaling_is_not_woken_and_answers_503(gateway_factory: GatewayFactory) -> None:
    gateway: RunningGateway = await gateway_factory(wait_loaded=False, static_config=None)
    gateway.runtime.publish(table((), 0, autoscaling=False))
    gateway.runtime.wake.patch_scale = patch = RecordingPatch()
    async with client(gateway) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(sdk, stream=False)
    assert caught.value.status_code == 503
    assert caught.value.response.json()["error"]["code"] == "no_ready_replica"
    assert patch.calls == []


async def test_a_client_that_gives_up_while_held_leaves_the_queue(gateway_factory: GatewayFactory) -> None:
    gateway = await sleeping_gateway(gateway_factory)
    gateway.runtime.wake.patch_scale = RecordingPatch()
    async with client(gateway, timeout=0.5) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await ask(sdk, stream=True)
    for _ in range(50):
        if gateway.runtime.wake.held(MODEL) == 0:
            break
        await asyncio.sleep(0.05)
    assert gateway.runtime.wake.held(MODEL) == 0


def test_discovery_tells_the_route_which_llmdeployment_to_wake() -> None:
    from argosy_gateway.discovery.cluster import ClusterState

    state = ClusterState()
    body = {
        "metadata": {"namespace": "team-a", "name": "llama", "resourceVersion": "42"},
        "spec": {"model": {"servedModelNames": ["llama-8b"]}, "replicas": 0,
                 "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 2}},
    }
    assert state.apply_deployment_event("ADDED", body)
    route = state.route_table("least-outstanding").get("llama-8b")
    assert route is not None and route.scaled_to_zero
    assert route.deployment == DeploymentRef("team-a", "llama", replicas=0, autoscaling=True, resource_version="42")
    # The scale changing is a change of the state (a new table is published).
    woken = {**body, "metadata": {**body["metadata"], "resourceVersion": "43"}, "spec": {**body["spec"], "replicas": 1}}
    assert state.apply_deployment_event("MODIFIED", woken)
    route = state.route_table("least-outstanding").get("llama-8b")
    assert route is not None and not route.scaled_to_zero and route.deployment is not None
    assert route.deployment.replicas == 1


async def test_a_model_whose_autoscaling_was_turned_off_while_waking_is_served_normally(
    gateway_factory: GatewayFactory, spawn_sim: Callable[..., Simulator]
) -> None:
    sim = spawn_sim([MODEL])
    gateway = await sleeping_gateway(gateway_factory, wake_timeout_seconds=0.3)
    gateway.runtime.wake.patch_scale = RecordingPatch()
    async with client(gateway) as sdk:
        with pytest.raises(openai.InternalServerError):
            await ask(sdk, stream=False)  # held, timed out: the model stays "waking"
        gateway.runtime.publish(table((sim.url,), 1, autoscaling=False))
        assert await ask(sdk, stream=True) in ("stop", "length")
