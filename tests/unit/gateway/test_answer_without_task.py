"""Requests answered without a task: the proxy's ``run_now`` and the upstream connection's callbacks.

Once a keep-alive connection to an endpoint is idle, a non-streamed request is parsed, routed,
written to the model server and answered from callbacks (proxy.py, ``_Answering``). Each test
here warms the pool first, so that is the path its request takes, then checks one way the
answer can arrive or the request can leave that path for a task: a body in several reads, a
502 retried elsewhere or passed on, a stream (asked for, or sent unasked), a first-byte
timeout, a connection cut mid-body, and a client that leaves before the answer. A fresh
gateway's first requests (no idle connection) take the task path, which the other gateway
tests cover.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import GatewayFactory
from .harness import free_port, write_routes
from .test_server_protocol import saved_garbage

pytestmark = pytest.mark.timeout(60)
MODEL = "model-x"
ANSWER = json.dumps(
    {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}]}
).encode()


class Backend:
    """A model server whose answer the request's prompt chooses (ok, split, cut, slow, hang, stream)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[str] = []
        self.aborted = 0
        self.fail_next = 0  # answer this many requests with a 502
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode = (await request.json()).get("prompt", "ok")
        self.seen.append(mode)
        if self.fail_next:
            self.fail_next -= 1
            return web.json_response({"error": "busy replica"}, status=502, headers={"Retry-After": "3"})
        if mode == "slow":
            await asyncio.sleep(2)
        if mode == "hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.aborted += 1
                raise
        if mode == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index in range(5):
                await response.write(b'data: {"n": %d}\n\n' % index)
                await asyncio.sleep(0.01)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if mode in ("split", "cut"):
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(ANSWER)
            await response.prepare(request)
            await response.write(ANSWER[:10])
            await asyncio.sleep(0.2)
            if mode == "cut":
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(ANSWER[10:])
            await response.write_eof()
            return response
        return web.Response(body=ANSWER, content_type="application/json")


@pytest.fixture
async def backends() -> Any:
    started: list[Backend] = []

    async def start(count: int) -> list[Backend]:
        for _ in range(count):
            backend = Backend()
            await backend.start()
            started.append(backend)
        return started[-count:]

    yield start
    for backend in started:
        await backend.stop()


def metric(gateway: Any, line_start: str) -> float:
    for line in gateway.runtime.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post(http: aiohttp.ClientSession, gateway: Any, prompt: str, **extra: Any) -> tuple[int, bytes, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, **extra}
    async with http.post(gateway.url + "/v1/completions", json=body) as response:
        return response.status, await response.read(), response.headers


async def warmed(gateway_factory: GatewayFactory, tmp_path: Path, urls: list[str], **settings: Any) -> Any:
    """A gateway with one idle keep-alive connection to each endpoint."""
    write_routes(tmp_path / "routes.yaml", {MODEL: urls}, policies={MODEL: "round-robin"})
    gateway = await gateway_factory(**settings)
    async with aiohttp.ClientSession() as http:
        for _ in urls:
            assert (await post(http, gateway, "ok"))[0] == 200
    assert gateway.runtime.upstream.open_connections == len(urls)
    return gateway


async def test_a_whole_answer_in_several_reads_is_passed_on_and_its_connection_kept(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url])
    async with aiohttp.ClientSession() as http:
        status, body, headers = await post(http, gateway, "split")
        assert (status, body) == (200, ANSWER)
        assert headers["Content-Length"] == str(len(ANSWER))
        assert headers["X-Argosy-Endpoint"] == f"127.0.0.1:{backend.port}"
        assert (await post(http, gateway, "ok"))[:2] == (200, ANSWER)
    assert gateway.runtime.upstream.open_connections == 1  # the same connection throughout
    assert metric(gateway, f'argosy_gateway_requests_total{{model="{MODEL}",status="200"}}') == 3


async def test_a_502_on_a_kept_connection_is_retried_on_another_endpoint_or_passed_on(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    first, second = await backends(2)
    gateway = await warmed(gateway_factory, tmp_path, [first.url, second.url])
    first.fail_next = 1
    async with aiohttp.ClientSession() as http:
        results = [await post(http, gateway, "ok") for _ in range(2)]
        assert [status for status, _, _ in results] == [200, 200]
        assert metric(gateway, f'argosy_gateway_retries_total{{model="{MODEL}"}}') == 1
        assert len(first.seen) + len(second.seen) == 2 + 2 + 1  # the warm-up, the two, the retry
        # With no other endpoint left to try, the model server's own answer goes back unchanged.
        first.fail_next = second.fail_next = 1
        status, body, headers = await post(http, gateway, "ok")
        assert status == 502 and json.loads(body) == {"error": "busy replica"}
        assert headers["Retry-After"] == "3"
    assert gateway.runtime.outstanding == {}


async def test_a_stream_on_a_kept_connection_is_passed_on_whole(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url])
    events = b"".join(b'data: {"n": %d}\n\n' % i for i in range(5)) + b"data: [DONE]\n\n"
    async with aiohttp.ClientSession() as http:
        # Asked for: handed to a task before it is written. Not asked for, but what the model
        # server sends: handed over when its headers say so.
        for extra in ({"stream": True}, {}):
            status, body, headers = await post(http, gateway, "stream", **extra)
            assert status == 200 and headers["Content-Type"] == "text/event-stream"
            assert body == events
    assert gateway.runtime.outstanding == {}


async def test_a_silent_model_server_on_a_kept_connection_times_out_with_504(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url], first_byte_timeout_seconds=0.3)
    async with aiohttp.ClientSession() as http:
        began = time.monotonic()
        status, body, _ = await post(http, gateway, "slow")
        assert status == 504 and time.monotonic() - began < 1.5
        assert b"within 0.3 s" in body
    errors = f'argosy_gateway_upstream_errors_total{{endpoint="127.0.0.1:{backend.port}",model="{MODEL}"'
    assert metric(gateway, errors + ',reason="timeout"}') == 1
    assert gateway.runtime.outstanding == {}


async def test_a_connection_cut_mid_answer_is_a_502_and_is_not_reused(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url])
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post(http, gateway, "cut")
        assert status == 502 and b"closed the connection" in body
        assert (await post(http, gateway, "ok"))[:2] == (200, ANSWER)  # on a new connection
    assert gateway.runtime.outstanding == {}


async def test_a_client_leaving_before_the_answer_stops_the_upstream_request(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url])
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(post(http, gateway, "hang"))
        for _ in range(200):
            if "hang" in backend.seen:
                break
            await asyncio.sleep(0.01)
        request.cancel()
    left_at = time.monotonic()
    while not backend.aborted:
        assert time.monotonic() - left_at < 1.0, "the upstream request outlived the client by over 1 s"
        await asyncio.sleep(0.02)
    for _ in range(50):
        if metric(gateway, f'argosy_gateway_requests_total{{model="{MODEL}",status="499"}}'):
            break
        await asyncio.sleep(0.02)
    assert metric(gateway, f'argosy_gateway_requests_total{{model="{MODEL}",status="499"}}') == 1
    assert metric(gateway, f'argosy_gateway_client_disconnects_total{{model="{MODEL}"}}') == 1
    assert gateway.runtime.outstanding == {}


async def test_answered_requests_leave_nothing_for_the_garbage_collector(
    gateway_factory: GatewayFactory, backends: Any, tmp_path: Path
) -> None:
    (backend,) = await backends(1)
    gateway = await warmed(gateway_factory, tmp_path, [backend.url])
    body = json.dumps({"model": MODEL, "prompt": "ok"}).encode()
    raw = b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)

    async def one() -> None:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(length) == ANSWER

    await one()
    with saved_garbage() as garbage:
        for _ in range(50):
            await one()
    writer.close()
    assert [type(o).__name__ for o in garbage if type(o).__module__.startswith("argosy_gateway")] == []
