"""The protocol's ``run_now`` for direct routes (argosy_gateway/server.py), on a real socket.

A direct route with ``run_now`` gets the request's cycle, synchronously, once the body is
complete, and may answer from there without a task (the gateway's proxy paths do). Checked
here: when it is called and when the ASGI call is used instead (large bodies, 100-continue),
pipelining, clients that leave mid-body or before the answer, and nothing left for the garbage
collector.
"""

from __future__ import annotations

import asyncio
from typing import Any

from argosy_gateway.server import ANSWER_EXTENSION
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from .test_server_protocol import Routed, echo, read_response, request, saved_garbage, serving


class AnswersNow:
    """A direct route that answers from ``run_now`` ("now:" + body) and from ``__call__`` ("task:" + body)."""

    def __init__(self) -> None:
        self.lost: list[bytes] = []
        self.disconnects = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        scope["extensions"][ANSWER_EXTENSION](200, [(b"content-length", b"%d" % (len(body) + 5))], b"task:" + body)

    def run_now(self, cycle: Any) -> None:
        body = cycle.take_body()
        if body.startswith(b"wait"):  # answered later, or never if the client leaves first
            cycle.client_lost(lambda: self.lost.append(body))
            asyncio.get_running_loop().call_later(0.3, self._answer, cycle, body)
            return
        self._answer(cycle, body)

    def _answer(self, cycle: Any, body: bytes) -> None:
        cycle.answer(200, [(b"content-length", b"%d" % (len(body) + 4))], b"now:" + body)


async def test_a_direct_route_answers_from_run_now_once_the_body_is_complete() -> None:
    app = AnswersNow()
    async with serving(Routed(echo, {b"/now": app})) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for payload in (b"one", b"two"):  # keep-alive: one connection
            writer.write(request(path="/now", body=payload))
            assert (await read_response(reader))[2] == b"now:" + payload
        # A small chunked body, in two writes: answered when its last chunk arrives.
        writer.write(b"POST /now HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.05)
        writer.write(b"2\r\nde\r\n0\r\n\r\n")
        assert (await read_response(reader))[2] == b"now:abcde"
        # Larger than uvicorn's read buffer: the ASGI call, which gets all of it.
        large = b"L" * 200_000
        writer.write(request(path="/now", body=large))
        assert (await read_response(reader))[2] == b"task:" + large
        # Expect: 100-continue waits for the application to read: the ASGI call too.
        writer.write(b"POST /now HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"cont")
        assert (await read_response(reader))[2] == b"task:cont"
        # Pipelined requests are answered in order, whichever way each one takes.
        writer.write(b"".join(request(path="/now", body=b"p%d" % i) for i in range(3)))
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert [b.split(b":", 1)[1] for b in bodies] == [b"p0", b"p1", b"p2"]
        # Connection: close, answered from run_now: the answer, then the end of the connection.
        writer.write(request(path="/now", body=b"last", extra="Connection: close\r\n"))
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and body == b"now:last" and headers[b"connection"] == b"close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_a_client_leaving_mid_body_or_before_a_run_now_answer_is_seen_once() -> None:
    app = AnswersNow()
    async with serving(Routed(echo, {b"/now": app})) as port:
        # Half a body, then gone: the application hears of it through ASGI (and can count it).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /now HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf")
        await asyncio.sleep(0.05)
        writer.close()
        for _ in range(100):
            if app.disconnects:
                break
            await asyncio.sleep(0.01)
        assert app.disconnects == 1
        # Gone while run_now's answer is pending: its client_lost callback, once, and no answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/now", body=b"wait-1"))
        await asyncio.sleep(0.05)
        writer.close()
        await asyncio.sleep(0.5)  # past the answer's time
        assert app.lost == [b"wait-1"]
        # Answered before it leaves: no callback.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/now", body=b"wait-2"))
        assert (await read_response(reader))[2] == b"now:wait-2"
        writer.close()
        await asyncio.sleep(0.1)
        assert app.lost == [b"wait-1"]


async def test_requests_answered_from_run_now_leave_nothing_for_the_garbage_collector() -> None:
    async with serving(Routed(echo, {b"/now": AnswersNow()})) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(path="/now", body=b"warm"))
        await read_response(reader)
        with saved_garbage() as garbage:
            for index in range(50):
                writer.write(request(path="/now", body=b"%d" % index))
                assert (await read_response(reader))[2] == b"now:%d" % index
        writer.close()
    assert [o for o in garbage if isinstance(o, RequestResponseCycle)] == []
