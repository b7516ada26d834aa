"""Backends that die, clients that leave: the gateway retries, reports and never hangs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest

from .conftest import GatewayFactory
from .harness import free_port, write_routes

pytestmark = pytest.mark.timeout(60)


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


async def test_backend_killed_under_load_costs_no_client_failure(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    doomed = spawn_sim(["model-x"], itl_ms=20)
    survivor = spawn_sim(["model-x"], itl_ms=20)
    write_routes(tmp_path / "routes.yaml", {"model-x": [doomed.url, survivor.url]})
    gateway = await gateway_factory()

    async with client(gateway.url) as sdk:

        async def one(index: int) -> str:
            await asyncio.sleep(index * 0.01)
            raw = await sdk.completions.with_raw_response.create(model="model-x", prompt="x", max_tokens=10)
            assert raw.parse().choices[0].text
            return raw.headers["x-argosy-endpoint"]

        requests = [asyncio.create_task(one(i)) for i in range(60)]
        await asyncio.sleep(0.15)  # some requests are running on both backends now
        doomed.kill()
        answered_by = Counter(await asyncio.gather(*requests))  # any exception fails the test

    assert answered_by[survivor.address] > answered_by[doomed.address]
    metrics = gateway.runtime.metrics.render().decode()
    assert 'argosy_gateway_retries_total{model="model-x"}' in metrics
    # The dead endpoint was ejected, so later requests do not even try it.
    assert f'argosy_gateway_endpoint_ejections_total{{endpoint="{doomed.address}"}} 1.0' in metrics


async def test_connection_refused_endpoint_is_retried_elsewhere(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    live = spawn_sim(["model-x"])
    dead_url = f"http://127.0.0.1:{free_port()}"
    write_routes(tmp_path / "routes.yaml", {"model-x": [dead_url, live.url]}, policies={"model-x": "round-robin"})
    gateway = await gateway_factory()
    async with client(gateway.url) as sdk:
        for _ in range(6):
            raw = await sdk.completions.with_raw_response.create(model="model-x", prompt="x", max_tokens=1)
            assert raw.headers["x-argosy-endpoint"] == live.address


async def test_every_endpoint_down_is_502(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    write_routes(tmp_path / "routes.yaml", {"model-x": [f"http://127.0.0.1:{free_port()}"]})
    gateway = await gateway_factory()
    async with client(gateway.url) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.completions.create(model="model-x", prompt="x", max_tokens=1)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_failed"  # type: ignore[index]


async def test_stream_whose_backend_dies_ends_with_an_error_event(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    backend = spawn_sim(["model-x"], itl_ms=50)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory()
    body = {"model": "model-x", "prompt": "x", "max_tokens": 1000, "stream": True}
    events: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/completions", json=body) as response:
        assert response.status == 200
        async with asyncio.timeout(10):  # "never hangs"
            async for line in response.content:
                if line.startswith(b"data: "):
                    events.append(line)
                    if len(events) == 3:
                        backend.kill()
    assert len(events) > 3
    assert events[-1].startswith(b'data: {"error": {')
    assert b'"type": "upstream_error"' in events[-1]


async def test_sdk_sees_the_cut_stream_as_an_error_not_a_hang(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    backend = spawn_sim(["model-x"], itl_ms=50)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory()
    async with client(gateway.url) as sdk:
        stream = await sdk.chat.completions.create(
            model="model-x", messages=[{"role": "user", "content": "x"}], max_tokens=1000, stream=True
        )
        received = 0
        with pytest.raises(openai.APIError, match="model server failed during the stream"):
            async with asyncio.timeout(10):
                async for _chunk in stream:
                    received += 1
                    if received == 3:
                        backend.kill()
    assert received >= 3


async def test_client_disconnect_stops_the_upstream_request_within_one_second(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    backend = spawn_sim(["model-x"], itl_ms=50)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory()
    body = {"model": "model-x", "prompt": "x", "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(gateway.url + "/v1/completions", json=body)
        await response.content.readline()
        assert await backend.ametric("vllm:num_requests_running") == 1
        response.close()  # the client goes away mid-stream
    left_at = time.monotonic()
    while await backend.ametric("vllm:num_requests_running") != 0:
        assert time.monotonic() - left_at < 1.0, "the upstream request outlived the client by over 1 s"
        await asyncio.sleep(0.05)
    for _ in range(20):
        if not gateway.runtime.outstanding:
            break
        await asyncio.sleep(0.05)
    assert gateway.runtime.outstanding == {}


async def test_client_disconnect_during_a_non_streamed_request_stops_upstream(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    backend = spawn_sim(["model-x"], itl_ms=50)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory()
    body = {"model": "model-x", "prompt": "x", "max_tokens": 1000}
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(gateway.url + "/v1/completions", json=body))
        for _ in range(40):
            if await backend.ametric("vllm:num_requests_running") == 1:
                break
            await asyncio.sleep(0.05)
        assert await backend.ametric("vllm:num_requests_running") == 1
        request.cancel()
    left_at = time.monotonic()
    while await backend.ametric("vllm:num_requests_running") != 0:
        assert time.monotonic() - left_at < 1.0, "the upstream request outlived the client by over 1 s"
        await asyncio.sleep(0.05)


async def test_slow_first_byte_times_out_with_504(gateway_factory: GatewayFactory, spawn_sim, tmp_path) -> None:
    backend = spawn_sim(["model-x"], ttft_ms=3000)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory(first_byte_timeout_seconds=0.3)
    async with client(gateway.url) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.completions.create(model="model-x", prompt="x", max_tokens=1)
    assert caught.value.status_code == 504


async def test_silent_stream_is_cut_with_a_timeout_event(gateway_factory: GatewayFactory, spawn_sim, tmp_path) -> None:
    backend = spawn_sim(["model-x"], itl_ms=5000)
    write_routes(tmp_path / "routes.yaml", {"model-x": [backend.url]})
    gateway = await gateway_factory(chunk_timeout_seconds=0.5)
    body = {"model": "model-x", "prompt": "x", "max_tokens": 5, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/completions", json=body) as response:
        assert response.status == 200
        async with asyncio.timeout(4):
            payload = await response.read()
    last_event = payload.strip().split(b"\n\n")[-1]
    assert last_event.startswith(b'data: {"error": {')
    assert b'"code": "upstream_timeout"' in last_event
