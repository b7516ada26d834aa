"""Conformance of the client-facing protocol (argosy_gateway/server.py) on a real socket.

uvicorn serves small ASGI apps with ``GatewayHttpProtocol``; a raw socket client checks the
bytes a client gets: framing (length, chunked, HEAD, 204), keep-alive and pipelining, close
semantics, a response head sent before a slow body, 100-continue and the errors uvicorn
answers for a broken app. Every test runs three times: through the app's ASGI dispatch; with
the app offered as a direct route for every POST (``direct_routes``), whose request cycle is
the protocol's own; and as a direct route with ``run_now`` (the way the gateway's proxy paths
are served), which gets the request's cycle once its body is complete and here hands it over
to the app in a task at once (test_server_run_now.py answers from ``run_now`` itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvicorn
from argosy_gateway.server import ANSWER_EXTENSION, CLIENT_LOST_EXTENSION, HTTP_PROTOCOL
from argosy_sandbox.cluster import free_port
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
_ROUTE = ["asgi"]  # how serving() offers its app: "asgi", or "direct" / "now" for every POST


@pytest.fixture(autouse=True, params=["asgi", "direct", "now"])
def route(request: pytest.FixtureRequest) -> Iterator[str]:
    _ROUTE[0] = request.param
    yield request.param
    _ROUTE[0] = "asgi"


class _EveryPath(dict[bytes, App]):
    """direct_routes that offer one app for every request target."""

    def __init__(self, app: App) -> None:
        super().__init__({b"/": app})
        self.app = app

    def get(self, key: bytes, default: Any = None) -> App:  # type: ignore[override]
        return self.app


class Routed:
    """An app whose POSTs the protocol may send to ``direct_routes`` instead of ``__call__``."""

    def __init__(self, app: App, direct_routes: dict[bytes, App]) -> None:
        self.app = app
        self.direct_routes = direct_routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class HandsOver:
    """A direct route with ``run_now`` that hands every request to ``app`` in a task."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.handed_over = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def run_now(self, cycle: Any) -> None:
        self.handed_over += 1
        cycle.hand_over(self.app)


@contextlib.asynccontextmanager
async def serving(app: App, **options: Any) -> AsyncIterator[int]:
    if _ROUTE[0] == "direct" and not isinstance(app, Routed):
        app = Routed(app, _EveryPath(app))
    elif _ROUTE[0] == "now" and not isinstance(app, Routed):
        app = Routed(app, _EveryPath(HandsOver(app)))
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=HTTP_PROTOCOL,
        lifespan="off",
        log_level="critical",
        proxy_headers=False,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def saved_garbage() -> Iterator[list[object]]:
    """What the block leaves for the garbage collector (the list is filled when it ends)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[object] = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response: status line, headers (lower-case names), body (chunked decoded)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    if b"content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), 5)
    elif headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[:-2], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status, headers, body


def request(method: str = "POST", path: str = "/", body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the request body (read to the end) with a Content-Length."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"%s %s:%s" % (scope["method"].encode(), scope["path"].encode(), body)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def test_keep_alive_answers_several_requests_on_one_connection() -> None:
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in range(3):
            writer.write(request(path=f"/r{index}", body=b"x" * index))
            status, headers, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert body == b"POST /r%d:%s" % (index, b"x" * index)
            assert headers[b"content-type"] == b"text/plain" and b"connection" not in headers
        writer.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(request(path=f"/p{i}", body=b"%d" % i) for i in range(4)))
        bodies = [(await read_response(reader))[2] for _ in range(4)]
        assert bodies == [b"POST /p%d:%d" % (i, i) for i in range(4)]
        writer.close()


async def test_a_large_body_in_several_reads_arrives_whole() -> None:
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 4096  # 1 MiB: many reads, flow control
        writer.write(request(body=payload))
        _, _, body = await read_response(reader)
        assert body == b"POST /:" + payload
        writer.close()


async def test_http_1_0_and_connection_close_end_the_connection_after_the_answer() -> None:
    async with serving(echo) as port:
        for raw in (
            b"POST /a HTTP/1.0\r\nContent-Length: 1\r\n\r\nz",
            request(path="/b", body=b"z", extra="Connection: close\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            _, headers, body = await read_response(reader)
            assert headers[b"connection"] == b"close" and body.endswith(b":z")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()


async def test_a_stream_is_chunked_and_its_head_is_not_held_for_a_slow_first_chunk() -> None:
    release = asyncio.Event()

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await release.wait()  # the client must see the head meanwhile
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with serving(stream) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked\r\n" in head
        release.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert rest == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
        writer.close()


async def test_head_requests_and_204_answers_carry_no_body() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["method"] == "HEAD":
            headers = [(b"content-length", b"5")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"hello"})
        else:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"content-length: 5\r\n" in head  # the length it would have, and no body bytes
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert second.startswith(b"HTTP/1.1 204 No Content\r\n") and b"transfer-encoding" not in second
        writer.close()


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        _, _, body = await read_response(reader)
        assert body == b"POST /c:body"
        writer.close()


async def test_a_failing_app_gets_a_500_and_a_wrong_length_closes_the_connection() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/raise":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"short"})

    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/raise"))
        status, _, body = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and body == b"Internal Server Error"
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/short"))
        data = await asyncio.wait_for(reader.read(), 5)  # read to the end: the server closes
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"short")
        writer.close()


async def test_an_invalid_header_from_the_app_is_refused() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-bad", b"a\r\nb: c")]})
        await send({"type": "http.response.body", "body": b""})

    async with serving(app) as port:
        for _ in range(2):  # refused every time, not once and then remembered as checked
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request())
            # The connection is dropped (as uvicorn does): nothing of the injected header reaches the client.
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()


async def test_an_idle_connection_is_closed_after_the_keep_alive_time_and_a_busy_one_is_not() -> None:
    """One keep-alive timer per connection: idle time counts from the last answer."""
    async with serving(echo, timeout_keep_alive=1) as port:
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        idle_writer.write(request(body=b"idle"))
        assert (await read_response(idle_reader))[2] == b"POST /:idle"
        answered = loop.time()
        for index in range(4):  # 2.4 s of requests 0.6 s apart: never idle for 1 s
            busy_writer.write(request(body=b"%d" % index))
            assert (await read_response(busy_reader))[2] == b"POST /:%d" % index
            await asyncio.sleep(0.6)
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed long since
        busy_writer.write(request(body=b"still"))
        assert (await read_response(busy_reader))[2] == b"POST /:still"
        assert loop.time() - answered > 2.0
        busy_reader2 = await asyncio.wait_for(busy_reader.read(), 3)  # and it closes once idle
        assert busy_reader2 == b""
        busy_writer.close()
        idle_writer.close()


async def test_only_an_exact_post_to_a_direct_route_skips_the_apps_own_dispatch(route: str) -> None:
    seen: list[str] = []

    def answering(name: str) -> App:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            seen.append(f"{name} {scope['method']} {scope['path']} {scope['query_string'].decode()}")
            await echo(scope, receive, send)

        return app

    routed = Routed(answering("app"), {b"/direct": answering("direct")})
    async with serving(routed) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for method, target in (("POST", "/direct"), ("POST", "/direct?x=1"), ("GET", "/direct"), ("POST", "/other")):
            writer.write(request(method, target, b"b" if method == "POST" else b""))
            status, _, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK" and body.startswith(f"{method} ".encode())
        writer.close()
    assert seen == ["direct POST /direct ", "app POST /direct x=1", "app GET /direct ", "app POST /other "]


async def test_the_client_lost_callback_is_called_once_if_the_client_leaves_before_the_answer() -> None:
    lost: list[str] = []
    registered, gone = asyncio.Event(), asyncio.Event()

    def record(name: str) -> None:
        lost.append(name)
        gone.set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        client_lost = scope["extensions"][CLIENT_LOST_EXTENSION]
        if scope["path"] == "/wait":
            client_lost(lambda: record("wait"))
            registered.set()
            await asyncio.wait_for(gone.wait(), 10)
            return
        client_lost(lambda: record("answered"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/answered"))
        assert (await read_response(reader))[2] == b"ok"
        writer.close()  # after the answer: not a lost client
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/wait"))
        await asyncio.wait_for(registered.wait(), 5)
        writer.close()
        await asyncio.wait_for(gone.wait(), 5)
        await asyncio.sleep(0.1)  # and only once
        assert lost == ["wait"]


async def test_an_answer_in_one_call_is_one_response_and_cannot_follow_a_started_one() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        answer = scope["extensions"][ANSWER_EXTENSION]
        if scope["path"] == "/twice":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
            answer(200, [(b"content-length", b"1")], b"x")  # refused: the app fails, the connection ends
        answer(201, [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))], body)

    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for payload in (b"one", b"two!"):
            writer.write(request(body=payload))
            status, headers, body = await read_response(reader)
            assert status == b"HTTP/1.1 201 Created" and body == payload
            assert headers[b"content-length"] == b"%d" % len(payload)
        writer.write(request(path="/twice", body=b"z"))
        data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
        assert b"201" not in data and data.count(b"HTTP/1.1") <= 1  # never a second answer
        writer.close()


async def test_answered_requests_leave_nothing_for_the_garbage_collector() -> None:
    """Each request's cycle is freed when its app returns, not by a collection (a loop stall)."""
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(body=b"warm"))
        await read_response(reader)
        with saved_garbage() as garbage:
            for index in range(50):
                writer.write(request(body=b"%d" % index))
                assert (await read_response(reader))[2] == b"POST /:%d" % index
            await asyncio.sleep(0.05)  # the last app's task has returned
        writer.close()
    assert [o for o in garbage if isinstance(o, RequestResponseCycle)] == []
