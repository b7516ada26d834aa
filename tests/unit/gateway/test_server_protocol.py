"""Conformance of the client-facing protocol (argosy_gateway/server.py) on a real socket.

uvicorn serves small ASGI apps with ``GatewayHttpProtocol``; a raw socket client checks the
bytes a client gets: framing (length, chunked, HEAD, 204), keep-alive and pipelining, close
semantics, a response head sent before a slow body, 100-continue and the errors uvicorn
answers for a broken app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from argosy_gateway.server import HTTP_PROTOCOL
from argosy_sandbox.cluster import free_port

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(app: App, **options: Any) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HTTP_PROTOCOL, lifespan="off", log_level="critical", **options
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
