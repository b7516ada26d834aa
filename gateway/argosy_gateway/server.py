"""The client-facing HTTP/1.1 protocol: uvicorn's httptools protocol, one socket write per answer.

uvicorn writes a response's status line and headers as soon as the application sends
``http.response.start``, and its body with the next message: two ``send`` system calls for
every non-streamed answer, and the head of every stream in a packet of its own. With the
gateway's short answers those writes were the largest single cost in its profile
(docs/benchmarks.md). ``GatewayHttpProtocol`` keeps everything of uvicorn's protocol (parsing,
keep-alive, pipelining, flow control, 100-continue, shutdown) and changes only how a response
is written: the head is held until the first body message and goes out in the same write; if
the application awaits something between the two, the head is written at the end of the
current event-loop iteration, so a client never waits for it.

It also offers the application a way out of ASGI for the rest of a chunked response body,
the scope extension ``argosy.splice`` (``SPLICE_EXTENSION``): a callable that takes a
``SpliceListener`` and returns the client's transport (or None: keep using ``send``). The
application then writes already-framed chunks to the transport itself, and the listener hears
when the client's socket buffer fills and drains and when the client goes away; calling it with
None hands the response back to ``send``, whose last message ends it as usual. The proxy uses it
to pass a model server's stream on without a coroutine and a task wake-up per chunk.

Selected with ``uvicorn.run(..., http=HTTP_PROTOCOL)`` (cli.py and the tests' harness);
tests/unit/gateway/test_server_protocol.py is its conformance suite. uvicorn is pinned in
images/constraints.txt, and that suite runs against the pinned version.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

_NO_BODY_STATUSES = (204, 304)
HTTP_PROTOCOL = "argosy_gateway.server:GatewayHttpProtocol"
"""uvicorn's ``http`` setting that selects this protocol."""
SPLICE_EXTENSION = "argosy.splice"
BODY_NEXT = "argosy.body_next"
"""A key an application may set on ``http.response.start`` when its next step is the body's
``send`` (no await between them): the head then waits for that write, and no flush of it is
scheduled. Other servers ignore the key."""


class SpliceListener(Protocol):
    """What the protocol tells the application that writes a spliced body itself."""

    def client_paused(self) -> None:
        """The client's socket buffer is full: stop producing."""

    def client_resumed(self) -> None:
        """It drained below the low-water mark again."""

    def client_lost(self) -> None:
        """The client's connection is gone."""


_default_cache: tuple[object, bytes] = (None, b"")


def _default_lines(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The server's own headers (the date, --header ones), checked and joined once per list.

    uvicorn replaces the list when the date changes, so the lines are rebuilt once a second,
    not per response. Framing headers (length, chunked, connection) are refused here, as
    uvicorn's own configuration cannot sensibly set them for every response.
    """
    global _default_cache
    cached, lines = _default_cache
    if cached is default_headers:
        return lines
    parts = []
    for raw_name, value in default_headers:
        name = raw_name.lower()
        if HEADER_RE.search(raw_name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header in the server's default headers.")
        if name in (b"content-length", b"transfer-encoding", b"connection"):
            raise RuntimeError(f"The server's default headers cannot set {name.decode()}.")
        parts.append(b"%b: %b\r\n" % (name, value))
    lines = b"".join(parts)
    _default_cache = (default_headers, lines)
    return lines


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` whose request cycles write each answer's head with its body."""

    splice: SpliceListener | None = None  # the current cycle's, while its body is spliced
    _idle_since = 0.0
    _idle_cycle: object = None  # the cycle whose end started the idle time
    _keep_alive_timer: asyncio.TimerHandle | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Every cycle (pipelined ones too) starts here, before its task first runs.
        cycle.__class__ = _CoalescingCycle
        cycle.loop = self.loop  # type: ignore[attr-defined]
        cycle.protocol = self  # type: ignore[attr-defined]
        extensions = cycle.scope.get("extensions")
        if extensions is None:  # uvicorn's httptools protocol sets none today
            cycle.scope["extensions"] = {SPLICE_EXTENSION: cycle.splice}  # type: ignore[attr-defined]
        else:
            extensions[SPLICE_EXTENSION] = cycle.splice  # type: ignore[attr-defined]
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.splice is not None:
            self.splice.client_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.splice is not None:
            self.splice.client_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        splice, self.splice = self.splice, None
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        super().connection_lost(exc)
        if splice is not None:
            splice.client_lost()

    def on_response_complete(self) -> None:
        # uvicorn's, but one keep-alive timer per connection instead of one per request:
        # uvicorn arms a timer after every answer and cancels it when the next request's
        # bytes arrive. Here the timer stays armed and, when it fires, closes the connection
        # only if it is still idle since the same answer, or waits for the rest of the time.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        self._idle_cycle = self.cycle
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_check)

    def _keep_alive_check(self) -> None:
        self._keep_alive_timer = None
        if self.transport.is_closing() or self.cycle is not self._idle_cycle:
            return  # closed, or busy with a later request (whose end arms the timer again)
        remaining = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self._keep_alive_timer = self.loop.call_later(remaining, self._keep_alive_check)
        else:
            self.timeout_keep_alive_handler()


class _CoalescingCycle(RequestResponseCycle):
    """A request cycle whose ``send`` holds the response head for the first body write."""

    loop: asyncio.AbstractEventLoop
    protocol: GatewayHttpProtocol
    _held = b""  # the response head, not written yet

    def splice(self, listener: SpliceListener | None) -> asyncio.Transport | None:
        """The ``argosy.splice`` extension: the transport for the rest of a chunked body, or None.

        Only once the response started with chunked framing (not for HEAD, not after the
        response completed or the client left). The caller writes ``b"%x\\r\\n%b\\r\\n"`` frames
        of non-empty chunks to it; ``splice(None)`` ends that, and the next ``send`` goes on.
        """
        protocol = self.protocol
        if listener is None:
            protocol.splice = None
            return None
        if (
            not self.response_started
            or self.response_complete
            or self.disconnected
            or not self.chunked_encoding
            or self.scope["method"] == "HEAD"
        ):
            return None
        self._flush_head()
        protocol.splice = listener
        if self.flow.write_paused:
            listener.client_paused()
        return self.transport

    async def send(self, message: Any) -> None:  # the ASGI send callable
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.response_started = True
            self.waiting_for_100_continue = False
            self._held = self._head(message["status"], message.get("headers", ()))
            if not message.get(BODY_NEXT):
                self.loop.call_soon(self._flush_head)
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        if self._held:
            data, self._held = self._held + data, b""
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _flush_head(self) -> None:
        """The application awaited something after starting the response: write the head now."""
        if self._held:
            held, self._held = self._held, b""
            if not self.disconnected:
                self.transport.write(held)

    def _head(self, status: int, headers: Any) -> bytes:
        """The status line and headers; sets the framing (length or chunked) and keep-alive."""
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        parts = [STATUS_LINE[status], _default_lines(self.default_headers)]
        close_sent = False
        for raw_name, value in headers:
            if HEADER_RE.search(raw_name):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            name = raw_name.lower()
            if name == b"content-length":
                if self.chunked_encoding is None:
                    self.expected_content_length = int(value)
                    self.chunked_encoding = False
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
            elif name == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
                self.keep_alive = False
                close_sent = True
            parts.append(b"%b: %b\r\n" % (name, value))
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in _NO_BODY_STATUSES:
            self.chunked_encoding = True
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)
