"""Conformance suite of the gateway's own HTTP/1.1 upstream client (argosy_gateway.upstream).

Each test runs a scripted HTTP server on a real 127.0.0.1 socket (asyncio streams, no HTTP
library in between) so the bytes on the wire are exactly the ones a model server could send:
chunked bodies, keep-alive reuse and expiry, servers that close or half-close, large headers,
interim 100 Continue responses, connection limits and flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import MappingProxyType

import aiohttp
import pytest
from argosy_gateway.upstream import (
    MAX_HEADER_BYTES,
    PooledUpstream,
    UpstreamBrokenError,
    UpstreamConnectError,
)
from argosy_sandbox.cluster import free_port

from .conftest import GatewayFactory
from .harness import Simulator, write_routes

Handler = Callable[["Peer"], Awaitable[None]]
JSON = {"Content-Type": "application/json"}


class Peer:
    """One accepted connection: read requests off it, write raw bytes to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        self.reader = reader
        self.writer = writer
        self.index = index  # 0 for the server's first connection, 1 for the second, ...

    async def request(self) -> tuple[bytes, dict[str, str], bytes]:
        """The next request: its request line, headers (lower-case names) and body."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        line, *header_lines = head[:-4].split(b"\r\n")
        headers = {}
        for raw in header_lines:
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return line, headers, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class ScriptedServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = 0
        self.port = free_port()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer, self.connections)
        self.connections += 1
        try:
            await self.handler(peer)
            # The script is done: wait for the client to close (or reuse and be refused).
            if not writer.is_closing() and await reader.read() == b"":
                self.closed_by_client += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


@contextlib.asynccontextmanager
async def client(**options: float) -> AsyncIterator[PooledUpstream]:
    upstream = PooledUpstream(**options)  # type: ignore[arg-type]
    try:
        yield upstream
    finally:
        await upstream.close()


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def serve_forever_ok(peer: Peer) -> None:
    """Answer every request on the connection with its own body, keep-alive."""
    while True:
        try:
            _, _, body = await peer.request()
        except asyncio.IncompleteReadError:
            return
        await peer.send(response(body, "Content-Type: application/json"))


async def test_request_framing_host_length_and_exact_body_bytes() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []

    async def handler(peer: Peer) -> None:
        seen.append(await peer.request())
        await peer.send(response(b"{}"))

    body = '{"model": "m", "prompt": "h\u00e9llo \\u0000"}'.encode()
    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", body, {"Content-Type": "application/json"})
        assert (reply.status, await reply.read()) == (200, b"{}")
        reply.release()
    line, headers, received = seen[0]
    assert line == b"POST /v1/completions HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["content-type"] == "application/json"
    assert received == body


async def test_each_request_carries_exactly_its_own_headers_and_length() -> None:
    """The head kept for a path is reused only for the very same headers mapping."""
    seen: list[tuple[bytes, dict[str, str], bytes]] = []

    async def handler(peer: Peer) -> None:
        while True:
            try:
                seen.append(await peer.request())
            except asyncio.IncompleteReadError:
                return
            await peer.send(response(b"{}"))

    shared = MappingProxyType({"Content-Type": "application/json"})
    sequence = [
        (shared, b"1"),
        (shared, b"22"),
        ({"Content-Type": "application/json", "x-request-id": "a"}, b"333"),
        (shared, b"4444"),
        (MappingProxyType({"Content-Type": "text/plain"}), b"5"),
        ({"Content-Type": "application/json", "x-request-id": "b"}, b"66"),
    ]
    async with ScriptedServer(handler) as server, client() as upstream:
        for headers, body in sequence:
            reply = await upstream.post(server.url, "/v1/completions", body, headers)
            assert await reply.read() == b"{}"
            reply.release()
        reply = await upstream.post(server.url, "/v1/embeddings", b"7", shared)
        await reply.read()
        reply.release()
    sent = [({k.lower(): v for k, v in h.items()}, b) for h, b in [*sequence, (shared, b"7")]]
    received = [({k: v for k, v in h.items() if k not in ("host", "content-length")}, b) for _, h, b in seen]
    assert received == sent
    assert [line for line, _, _ in seen][-1] == b"POST /v1/embeddings HTTP/1.1"
    assert [int(headers["content-length"]) for _, headers, _ in seen] == [1, 2, 3, 4, 1, 2, 1]


async def test_chunked_body_with_extensions_and_trailers_arrives_whole_and_the_connection_is_reused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"):
            await peer.send(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            await asyncio.sleep(0.01)
        await peer.send(b"0\r\nX-Trailer: ignored\r\n\r\n")
        await serve_forever_ok(peer)

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/chat/completions", b"{}", JSON)
        assert reply.header("content-type") == "text/event-stream"
        chunks = []
        while chunk := await reply.read_chunk():
            chunks.append(chunk)
        assert b"".join(chunks) == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
        assert len(chunks) >= 2, "each upstream write should be handed over as it arrives"
        assert reply.header("x-trailer") is None
        reply.release()
        again = await upstream.post(server.url, "/v1/chat/completions", b'{"n": 2}', JSON)
        assert await again.read() == b'{"n": 2}'
        again.release()
    assert server.connections == 1


async def test_keep_alive_reuses_one_connection_for_sequential_requests() -> None:
    async with ScriptedServer(serve_forever_ok) as server, client() as upstream:
        for index in range(5):
            reply = await upstream.post(server.url, "/v1/completions", b'{"i": %d}' % index, JSON)
            assert await reply.read() == b'{"i": %d}' % index
            reply.release()
    assert server.connections == 1


async def test_an_idle_connection_past_the_keepalive_time_is_closed_not_reused() -> None:
    async with ScriptedServer(serve_forever_ok) as server, client(keepalive_seconds=0.2) as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"1", JSON)
        assert await reply.read() == b"1"
        reply.release()
        await asyncio.sleep(0.35)
        reply = await upstream.post(server.url, "/v1/completions", b"2", JSON)
        assert await reply.read() == b"2"
        reply.release()
        await asyncio.sleep(0.05)
        assert server.connections == 2
        assert server.closed_by_client == 1, "the expired connection must be closed by the gateway"


async def test_a_connection_the_server_half_closed_is_never_reused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(response(b"first"))  # keep-alive by HTTP/1.1 default ...
        peer.writer.write_eof()  # ... yet the server shuts its side down when idle
        if peer.index == 0:
            await peer.reader.read()

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert await reply.read() == b"first"
        reply.release()
        await asyncio.sleep(0.05)  # the FIN arrives while the connection is idle
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert await reply.read() == b"first"
        reply.release()
    assert server.connections == 2


async def test_connection_close_response_is_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(response(b"bye", "Connection: close"))
        peer.writer.close()

    async with ScriptedServer(handler) as server, client() as upstream:
        for _ in range(2):
            reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
            assert await reply.read() == b"bye"
            reply.release()
    assert server.connections == 2


async def test_a_body_delimited_by_the_end_of_the_connection_is_read_to_the_end() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nno length ")
        await asyncio.sleep(0.02)
        await peer.send(b"given")
        peer.writer.close()

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert await reply.read() == b"no length given"
        reply.release()


async def test_a_server_closing_mid_body_is_a_broken_upstream_not_a_short_answer() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")
        peer.writer.close()

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        with pytest.raises(UpstreamBrokenError):
            await reply.read()
        reply.close()


async def test_a_server_closing_before_answering_is_a_broken_upstream() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        peer.writer.close()

    async with ScriptedServer(handler) as server, client() as upstream:
        with pytest.raises(UpstreamBrokenError):
            await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert upstream.open_connections == 0


async def test_large_headers_pass_and_oversized_ones_fail_cleanly() -> None:
    big = "x" * 32_000

    async def handler(peer: Peer) -> None:
        await peer.request()
        if peer.index == 0:
            await peer.send(response(b"ok", f"X-Big: {big}", f"X-Big-Too: {big[:16_000]}"))
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"y" * (MAX_HEADER_BYTES + 1024) + b"\r\n\r\n")
        await serve_forever_ok(peer)

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert reply.header("x-big") == big
        assert await reply.read() == b"ok"
        reply.close()  # the next request opens the second connection
        await asyncio.sleep(0.01)
        with pytest.raises(UpstreamBrokenError, match="headers larger"):
            await upstream.post(server.url, "/v1/completions", b"{}", JSON)


async def test_interim_100_continue_and_103_responses_are_skipped() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.01)
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await peer.send(response(b'{"final": true}', "Content-Type: application/json", status="201 Created"))
        await serve_forever_ok(peer)

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        assert reply.status == 201
        assert reply.header("link") is None
        assert await reply.read() == b'{"final": true}'
        reply.release()
        again = await upstream.post(server.url, "/v1/completions", b"2", JSON)
        assert await again.read() == b"2"
        again.release()
    assert server.connections == 1


async def test_malformed_http_is_a_broken_upstream() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"SPDY/9 nonsense\r\n\r\n")

    async with ScriptedServer(handler) as server, client() as upstream:
        with pytest.raises(UpstreamBrokenError, match="malformed"):
            await upstream.post(server.url, "/v1/completions", b"{}", JSON)


async def test_refused_connection_is_a_connect_error() -> None:
    async with client() as upstream:
        with pytest.raises(UpstreamConnectError):
            await upstream.post(f"http://127.0.0.1:{free_port()}", "/v1/completions", b"{}", JSON)
        assert upstream.open_connections == 0


async def test_the_per_endpoint_limit_queues_requests_on_the_open_connections() -> None:
    active = 0
    most_active = 0

    async def handler(peer: Peer) -> None:
        nonlocal active, most_active
        while True:
            try:
                _, _, body = await peer.request()
            except asyncio.IncompleteReadError:
                return
            active += 1
            most_active = max(most_active, active)
            await asyncio.sleep(0.02)
            active -= 1
            await peer.send(response(body))

    async def one(upstream: PooledUpstream, index: int) -> bytes:
        reply = await upstream.post(server.url, "/v1/completions", b"%d" % index, JSON)
        data = await reply.read()
        reply.release()
        return data

    async with ScriptedServer(handler) as server, client(max_connections_per_endpoint=2) as upstream:
        results = await asyncio.gather(*(one(upstream, i) for i in range(8)))
    assert results == [b"%d" % i for i in range(8)]
    assert server.connections == 2
    assert most_active == 2


async def test_a_large_stream_arrives_byte_for_byte_with_flow_control() -> None:
    payload = bytes(range(256)) * 16_384  # 4 MiB, more than the read backlog limit

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for start in range(0, len(payload), 65_536):
            peer.writer.write(payload[start : start + 65_536])
        await peer.writer.drain()
        await serve_forever_ok(peer)

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        received = bytearray()
        while chunk := await reply.read_chunk():
            received += chunk
            await asyncio.sleep(0)  # a slow reader: the backlog limit pauses the socket
        assert bytes(received) == payload
        reply.release()


async def test_fail_makes_the_pending_read_raise() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await peer.reader.read()  # until the gateway drops the connection

    class Silent(Exception):
        pass

    async with ScriptedServer(handler) as server, client() as upstream:
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON)
        asyncio.get_running_loop().call_later(0.05, reply.fail, Silent())
        with pytest.raises(Silent):
            await reply.read_chunk()
        reply.close()
        await asyncio.sleep(0.05)
    assert server.closed_by_client == 1


async def test_the_gateway_answers_a_client_that_expects_100_continue(
    gateway_factory: GatewayFactory, tmp_path: Path, sims: dict[str, Simulator]
) -> None:
    write_routes(tmp_path / "routes.yaml", {"model-a": [sims["a1"].url]})
    gateway = await gateway_factory()
    body = b'{"model": "model-a", "prompt": "hi", "max_tokens": 3}'
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.url + "/v1/completions", data=body, expect100=True) as reply,
    ):
        assert reply.status == 200
        assert (await reply.json())["usage"]["completion_tokens"] == 3


async def test_first_byte_timeout_covers_the_headers_and_the_first_body_bytes_only() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if peer.index == 0:
            await peer.reader.read()  # never answers
            return
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.1)
        await peer.send(b"5\r\nfirst\r\n")
        await asyncio.sleep(0.3)  # later chunks may take longer than the first-byte timeout
        await peer.send(b"4\r\nlast\r\n0\r\n\r\n")

    async with ScriptedServer(handler) as server, client() as upstream:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await upstream.post(server.url, "/v1/completions", b"{}", JSON, 0.2)
        assert 0.15 < loop.time() - started < 1.0
        reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON, 0.2)
        assert await reply.read_chunk() == b"first"
        assert await reply.read_chunk() == b"last"
        assert await reply.read_chunk() == b""
        reply.release()


async def test_first_byte_timeout_holds_on_a_reused_connection_and_not_after_the_answer() -> None:
    """A reused connection's deadline is a shared one (deadlines.py): it must fire, and only once due."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(response(b"one"))
        await peer.request()
        await peer.send(response(b"two"))
        await peer.request()
        await peer.reader.read()  # the third request is never answered

    async with ScriptedServer(handler) as server, client() as upstream:
        loop = asyncio.get_running_loop()
        for expected in (b"one", b"two"):
            reply = await upstream.post(server.url, "/v1/completions", b"{}", JSON, 0.2)
            assert await reply.read() == expected
            reply.release()
            await asyncio.sleep(0.3)  # past the deadline of the answered request: nothing fires
        started = loop.time()
        with pytest.raises(TimeoutError):
            await upstream.post(server.url, "/v1/completions", b"{}", JSON, 0.2)
        assert 0.15 < loop.time() - started < 1.0
        assert server.connections == 1  # all three went over the one reused connection
