"""Conformance of the spliced stream path (proxy.py ``_splice``, server.py's ``argosy.splice``).

Once a stream's head and first bytes are sent, the proxy hands the rest of the model
server's body to the client's socket from the upstream connection's callback. A scripted
model server (a raw asyncio server, so every byte and every pause is the test's) and a raw
client socket check what a client sees: the bytes exactly as sent, keep-alive afterwards,
a cut stream ending in an error event, a slow client pausing the model server instead of the
gateway buffering, a client that leaves closing the upstream connection, a silent model
server cut by the watchdog (but a slow client never taken for one), the usage metric, and
the ASGI path when the server offers no splice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from argosy_gateway import proxy
from argosy_gateway.settings import GatewaySettings

from .conftest import GatewayFactory
from .harness import RunningGateway, free_port, write_routes
from .test_server_protocol import read_response

pytestmark = pytest.mark.timeout(60)

MODEL = "model-s"
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def event(index: int) -> bytes:
    return b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "t%d"}}]}\n\n' % index


async def start_stream(writer: asyncio.StreamWriter, first: bytes = event(0), pause: float = 0.1) -> None:
    """The response head with the first event in one write, then a pause: past the first read,
    so what follows goes through the splice."""
    writer.write(STREAM_HEAD + chunk(first))
    await writer.drain()
    await asyncio.sleep(pause)


USAGE_EVENT = b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 40}}\n\n'


class ScriptedServer:
    """A model server whose answer to each POST is a script writing raw bytes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = free_port()
        self.closed = asyncio.Event()  # the gateway closed a connection we were answering on
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.requests += 1
                await self.script(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


async def gateway_for(gateway_factory: GatewayFactory, tmp_path: Path, server: ScriptedServer, **settings: Any) -> Any:
    write_routes(tmp_path / "routes.yaml", {MODEL: [server.url]})
    return await gateway_factory(**settings)


def stream_request(port: int) -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        yield reader, writer
    finally:
        writer.close()


def metric(gateway: Any, line_start: str) -> float:
    for line in gateway.runtime.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_spliced_stream_arrives_byte_for_byte_and_the_connection_is_reused(
    gateway_factory: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_relay(*args: object) -> None:
        raise AssertionError("the stream went through ASGI send, not the splice")

    monkeypatch.setattr(proxy, "_relay", no_relay)
    events = [event(i) for i in range(40)] + [USAGE_EVENT, b"data: [DONE]\n\n"]

    async def script(writer: asyncio.StreamWriter) -> None:
        await start_stream(writer, events[0])
        for index, data in enumerate(events[1:], 1):
            if index % 3 == 0:  # some reads hold several chunks, some one, some half a frame
                frame = chunk(data)
                writer.write(frame[:7])
                await writer.drain()
                await asyncio.sleep(0.002)
                writer.write(frame[7:])
            else:
                writer.write(chunk(data))
            await writer.drain()
            if index % 2:
                await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with ScriptedServer(script) as server:
        gateway = await gateway_for(gateway_factory, tmp_path, server)
        async with connect(gateway.port) as (reader, writer):
            for _ in range(2):  # the second stream on the same client connection
                writer.write(stream_request(gateway.port))
                status, headers, body = await read_response(reader)
                assert status == b"HTTP/1.1 200 OK"
                assert headers[b"content-type"] == b"text/event-stream"
                assert body == b"".join(events)
        assert server.requests == 2
    assert metric(gateway, f'argosy_gateway_completion_tokens_total{{model="{MODEL}"}}') == 80
    assert metric(gateway, f'argosy_gateway_prompt_tokens_total{{model="{MODEL}"}}') == 14
    assert metric(gateway, f'argosy_gateway_requests_total{{model="{MODEL}",status="200"}}') == 2
    assert gateway.runtime.outstanding == {}


async def test_a_stream_cut_mid_way_ends_with_an_error_event_and_a_whole_response(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        await start_stream(writer)
        for index in range(1, 5):
            writer.write(chunk(event(index)))
            await writer.drain()
        writer.write(b"40\r\npartial")  # half a frame, then the server dies
        await writer.drain()
        writer.transport.abort()

    async with ScriptedServer(script) as server:
        gateway = await gateway_for(gateway_factory, tmp_path, server)
        async with connect(gateway.port) as (reader, writer):
            writer.write(stream_request(gateway.port))
            status, _, body = await read_response(reader)  # a well-framed end, not a hang
            assert status == b"HTTP/1.1 200 OK"
            events = body.split(b"\n\n")
            assert body.startswith(b"".join(event(i) for i in range(5)))
            assert b"partial" in body  # the bytes the model server did send were passed on
            assert b'"type": "upstream_error"' in events[-2]
            assert b"failed during the stream" in events[-2]
    errors_seen = [
        line
        for line in gateway.runtime.metrics.render().decode().splitlines()
        if line.startswith("argosy_gateway_upstream_errors_total{") and 'reason="disconnect"' in line
    ]
    assert [float(line.rsplit(" ", 1)[1]) for line in errors_seen] == [1.0]
    assert gateway.runtime.outstanding == {}


async def test_a_slow_client_pauses_the_model_server_and_still_gets_every_byte(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # 64 MiB in 32 KiB events: more than the sockets between the model server and the client
    # hold (a Linux TCP receive buffer grows up to 32 MiB here), so only a pause stops the writer.
    events = [(b"data: %05d " % i).ljust(32 * 1024 - 2, b"x") + b"\n\n" for i in range(2048)]
    total = sum(len(e) for e in events)
    written = 0

    async def script(writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await start_stream(writer, events[0])
        written += len(events[0])
        for data in events[1:]:
            writer.write(chunk(data))
            await writer.drain()  # blocks while the gateway does not read
            written += len(data)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with ScriptedServer(script) as server:
        # A watchdog much shorter than the client's pause: a slow client is not a silent server.
        gateway = await gateway_for(gateway_factory, tmp_path, server, chunk_timeout_seconds=0.5)
        async with connect(gateway.port) as (reader, writer):
            writer.write(stream_request(gateway.port))
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.pause_reading()  # the client stops reading
            await asyncio.sleep(1.5)
            held = written
            assert held < total / 2, f"the model server wrote {held} of {total} bytes to a client that read nothing"
            writer.transport.resume_reading()
            parts: list[bytes] = []
            async with asyncio.timeout(30):
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    parts.append(data[:-2])
        assert b"".join(parts) == b"".join(events)  # and no error event: the watchdog stayed quiet
    assert gateway.runtime.outstanding == {}


async def test_a_client_leaving_mid_stream_closes_the_upstream_connection(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        await start_stream(writer, pause=0)
        for index in range(1, 100_000):  # an endless stream, one event every 10 ms
            await asyncio.sleep(0.01)
            writer.write(chunk(event(index)))
            await writer.drain()

    async with ScriptedServer(script) as server:
        gateway = await gateway_for(gateway_factory, tmp_path, server)
        before = metric(gateway, f'argosy_gateway_client_disconnects_total{{model="{MODEL}"}}')
        async with connect(gateway.port) as (reader, writer):
            writer.write(stream_request(gateway.port))
            await reader.readuntil(b"\r\n\r\n")
            for _ in range(5):
                await reader.readuntil(b"\n\n")
            await asyncio.sleep(0.2)  # well into the spliced part
        left_at = time.monotonic()
        async with asyncio.timeout(1.0):
            await server.closed.wait()  # the model server sees the client go, as vLLM would abort
        assert time.monotonic() - left_at < 1.0
        for _ in range(20):
            if not gateway.runtime.outstanding:
                break
            await asyncio.sleep(0.05)
        assert gateway.runtime.outstanding == {}
        assert metric(gateway, f'argosy_gateway_client_disconnects_total{{model="{MODEL}"}}') == before + 1
        assert metric(gateway, f'argosy_gateway_requests_total{{model="{MODEL}",status="499"}}') == 1


async def test_a_silent_model_server_mid_splice_is_cut_by_the_watchdog(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        await start_stream(writer)
        writer.write(chunk(event(1)) + chunk(event(2)))
        await writer.drain()
        # Then nothing: the script returns with the response unfinished and the server waits
        # for a next request, so it sees the gateway close the connection.

    async with ScriptedServer(script) as server:
        gateway = await gateway_for(gateway_factory, tmp_path, server, chunk_timeout_seconds=0.4)
        async with connect(gateway.port) as (reader, writer):
            started = time.monotonic()
            writer.write(stream_request(gateway.port))
            _, _, body = await read_response(reader)
            elapsed = time.monotonic() - started
        assert body.startswith(event(0) + event(1) + event(2))
        last = body.strip().split(b"\n\n")[-1]
        assert b'"code": "upstream_timeout"' in last
        assert 0.4 <= elapsed < 2.0
        async with asyncio.timeout(1.0):
            await server.closed.wait()  # the silent upstream connection is dropped, not reused
    assert gateway.runtime.outstanding == {}


async def test_without_the_splice_extension_the_stream_goes_through_asgi(tmp_path: Path) -> None:
    """Plain uvicorn (no argosy.splice): the same stream, the same bytes."""
    events = [event(i) for i in range(20)] + [USAGE_EVENT, b"data: [DONE]\n\n"]

    async def script(writer: asyncio.StreamWriter) -> None:
        await start_stream(writer, events[0], pause=0.05)
        for data in events[1:]:
            writer.write(chunk(data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with ScriptedServer(script) as server:
        write_routes(tmp_path / "routes.yaml", {MODEL: [server.url]})
        gateway = RunningGateway(
            GatewaySettings(static_config=tmp_path / "routes.yaml", static_poll_seconds=0.05), http="httptools"
        )
        await gateway.start()
        try:
            await gateway.wait_loaded()
            async with connect(gateway.port) as (reader, writer):
                writer.write(stream_request(gateway.port))
                status, _, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert body == b"".join(events)
            assert gateway.runtime.metrics.completion_tokens == {MODEL: 40}
        finally:
            await gateway.stop()
