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

Four more shortcuts, all for the proxy paths:

- **Direct routes.** An app may carry ``direct_routes`` (``DIRECT_ROUTES_ATTRIBUTE``): exact
  raw paths (bytes) to ASGI callables for POST requests. A POST whose request target is one of
  them (no query string, no escapes) goes straight to that callable, without the app's own
  dispatch and with a lighter request cycle (no ``asyncio.Event``, no URL parsing). Anything
  else, and every other app, takes the normal ASGI route.
- **Client lost** (scope extension ``argosy.client_lost``, ``CLIENT_LOST_EXTENSION``): the
  application registers a callback that the protocol calls once when the client's connection
  is lost before the response completed (``None`` unregisters it). The proxy uses it instead
  of a task that waits on ``receive`` for ``http.disconnect``.
- **Answer** (scope extension ``argosy.answer``, ``ANSWER_EXTENSION``): a whole response
  (status, headers, body) in one synchronous call, for an application that has the body
  already (the proxy's non-streamed answers and its errors).
- **Run now** (``RUN_NOW_ATTRIBUTE``): a direct route with a ``run_now`` method gets the
  request's ``DirectCycle`` synchronously once the body is complete, and may answer it
  without a task, or hand it over to one (``DirectCycle``).

Selected with ``uvicorn.run(..., http=HTTP_PROTOCOL)`` (cli.py and the tests' harness);
tests/unit/gateway/test_server_protocol.py is its conformance suite. uvicorn is pinned in
images/constraints.txt, and that suite runs against the pinned version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
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
CLIENT_LOST_EXTENSION = "argosy.client_lost"
ANSWER_EXTENSION = "argosy.answer"
DIRECT_ROUTES_ATTRIBUTE = "direct_routes"
"""The app attribute naming its direct routes: {raw path: ASGI callable} for POST requests."""
RUN_NOW_ATTRIBUTE = "run_now"
"""A direct route's optional method taking a ``DirectCycle`` once its request body is complete,
to answer it without a task (see ``DirectCycle``)."""
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

# Response header lines already checked, by (name, value) as the application sent them: the
# line, and what it means for the framing. A proxy answers with a handful of distinct headers
# (its content types, endpoint addresses, lengths), so each is checked once, not per response.
_PLAIN, _LENGTH, _CHUNKED, _CLOSE = 0, 1, 2, 3
_MAX_CACHED_LINES = 4096
_checked_lines: dict[tuple[bytes, bytes], tuple[bytes, int]] = {}


def _header_line(raw_name: bytes, value: bytes) -> tuple[bytes, int]:
    """A response header not in ``_checked_lines`` yet: checked (raises for an invalid name or
    value), its line and framing kind remembered."""
    if HEADER_RE.search(raw_name):
        raise RuntimeError("Invalid HTTP header name.")
    if HEADER_VALUE_RE.search(value):
        raise RuntimeError("Invalid HTTP header value.")
    name = raw_name.lower()
    kind = _PLAIN
    if name == b"content-length":
        kind = _LENGTH
    elif name == b"transfer-encoding":
        kind = _CHUNKED if value.lower() == b"chunked" else _PLAIN
    elif name == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
        kind = _CLOSE
    checked = (b"%b: %b\r\n" % (name, value), kind)
    if len(_checked_lines) >= _MAX_CACHED_LINES:
        _checked_lines.clear()
    _checked_lines[(raw_name, value)] = checked
    return checked


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
    client_lost_callback: Callable[[], object] | None = None  # the current cycle's (argosy.client_lost)
    _direct_routes: dict[bytes, Any] | None = None
    _now: tuple[DirectCycle, Any] | None = None  # a direct cycle to run when its body is complete
    _idle_since = 0.0
    _idle_cycle: object = None  # the cycle whose end started the idle time
    _keep_alive_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.root_path and self.limit_concurrency is None:
            self._direct_routes = getattr(self.app, DIRECT_ROUTES_ATTRIBUTE, None)

    def on_headers_complete(self) -> None:
        routes = self._direct_routes
        if routes:
            app = routes.get(self.url)
            if app is not None and self.parser.get_method() == b"POST" and not self.parser.should_upgrade():
                self._direct_cycle(app)
                return
        super().on_headers_complete()

    def _direct_cycle(self, app: Any) -> None:
        """A POST to a direct route: its scope completed and its cycle started (or queued)."""
        parser = self.parser
        scope = self.scope
        url = self.url
        scope["method"] = "POST"
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["path"] = url.decode("ascii")
        scope["raw_path"] = url
        scope["query_string"] = b""
        existing = self.cycle
        cycle = self.cycle = DirectCycle(self, scope, http_version != "1.0" and parser.should_keep_alive())
        if existing is None or existing.response_complete:
            if self.expect_100_continue or getattr(app, RUN_NOW_ATTRIBUTE, None) is None:
                self._start_asgi_task(cycle, app)
            else:
                self._now = (cycle, app)  # on_message_complete runs it, or on_body starts a task
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Every cycle (pipelined ones too) starts here, before its task first runs.
        if cycle.__class__ is not DirectCycle:
            cycle.__class__ = _CoalescingCycle
            cycle.loop = self.loop  # type: ignore[attr-defined]
            cycle.protocol = self  # type: ignore[attr-defined]
        ours = {
            SPLICE_EXTENSION: cycle.splice,  # type: ignore[attr-defined]
            CLIENT_LOST_EXTENSION: cycle.client_lost,  # type: ignore[attr-defined]
            ANSWER_EXTENSION: cycle.answer,  # type: ignore[attr-defined]
        }
        extensions = cycle.scope.get("extensions")
        if extensions is None:  # uvicorn's httptools protocol sets none today
            cycle.scope["extensions"] = ours
        else:
            extensions.update(ours)
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        # uvicorn's, and a direct cycle waiting for its whole body gets a task when the body
        # outgrows the read buffer (reading pauses until the application receives).
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self._start_pending()
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        # uvicorn's (inline: one call less per request), then a waiting direct cycle runs.
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()
        now = self._now
        if now is not None:
            self._now = None
            cycle, app = now
            if not cycle.disconnected:
                app.run_now(cycle)

    def _start_pending(self) -> None:
        """The direct cycle waiting for its body goes the ASGI way after all."""
        now = self._now
        if now is not None:
            self._now = None
            self._start_asgi_task(*now)

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
        lost, self.client_lost_callback = self.client_lost_callback, None
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        super().connection_lost(exc)
        self._start_pending()  # its application sees the disconnect (and counts the request)
        if splice is not None:
            splice.client_lost()
        if lost is not None:
            lost()

    def on_response_complete(self) -> None:
        # uvicorn's, but one keep-alive timer per connection instead of one per request:
        # uvicorn arms a timer after every answer and cancels it when the next request's
        # bytes arrive. Here the timer stays armed and, when it fires, closes the connection
        # only if it is still idle since the same answer, or waits for the rest of the time.
        self.server_state.total_requests += 1
        self.client_lost_callback = None
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

    async def run_asgi(self, app: Any) -> None:
        try:
            await super().run_asgi(app)
        finally:
            # The scope's extensions are this cycle's bound methods: a reference cycle (cycle,
            # scope, extensions, methods) that only the garbage collector could free, 13 objects
            # per request and a young collection of 1-3 ms every few hundred requests (the tail
            # at c=16, docs/benchmarks.md). Dropped when the application returns, it is freed at once.
            self.scope.pop("extensions", None)

    def client_lost(self, callback: Callable[[], object] | None) -> None:
        """The ``argosy.client_lost`` extension: call ``callback`` once if the client goes away first.

        Called at once if it already went away; ``None`` unregisters; the response's end
        unregisters too.
        """
        if callback is not None and (self.disconnected or self.response_complete):
            if self.disconnected:
                callback()
            return
        self.protocol.client_lost_callback = callback

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
        self._write_body(message.get("body", b""), message.get("more_body", False))

    def answer(self, status: int, headers: Any, body: bytes) -> None:
        """The ``argosy.answer`` extension: a whole response (head and body) in one call and one write.

        Instead of ``http.response.start`` and a last ``http.response.body`` from an application
        that has the whole body already; nothing after it.
        """
        if self.disconnected:
            return
        if self.response_started:
            raise RuntimeError("argosy.answer after the response started.")
        self.response_started = True
        self.waiting_for_100_continue = False
        self._held = self._head(status, headers)
        self._write_body(body, False)

    def _write_body(self, body: bytes, more_body: bool) -> None:
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
        cached, default_lines = _default_cache
        if cached is not self.default_headers:
            default_lines = _default_lines(self.default_headers)
        parts = [STATUS_LINE[status], default_lines]
        close_sent = False
        checked_lines = _checked_lines
        for raw_name, value in headers:
            line, kind = checked_lines.get((raw_name, value)) or _header_line(raw_name, value)
            if kind == _LENGTH:
                if self.chunked_encoding is None:
                    self.expected_content_length = int(value)
                    self.chunked_encoding = False
            elif kind == _CHUNKED:
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif kind == _CLOSE:
                self.keep_alive = False
                close_sent = True
            parts.append(line)
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in _NO_BODY_STATUSES:
            self.chunked_encoding = True
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


class _Signal:
    """``asyncio.Event``'s part a request cycle uses, without a waiter deque or a coroutine per wait."""

    __slots__ = ("_loop", "_waiter", "flag")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.flag = False

    def set(self) -> None:
        self.flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.flag = False

    def wait(self) -> asyncio.Future[None]:
        """An awaitable that is done once the signal is set."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._loop.create_future()
            if self.flag:
                waiter.set_result(None)
                self._waiter = None
        return waiter


class DirectCycle(_CoalescingCycle):
    """The cycle of a POST to a direct route: set up without uvicorn's URL parsing and event.

    For an application with ``run_now`` (``RUN_NOW_ATTRIBUTE``) it is also what that method
    gets, synchronously, once the whole body has arrived: the ``scope``, ``take_body``, ``answer``,
    ``client_lost`` and ``splice`` as the scope extensions describe them, and ``hand_over``, which
    runs an ASGI application in a task for the rest of the request (its ``receive`` gets what
    ``take_body`` left). Requests with ``Expect: 100-continue``, pipelined ones and bodies larger
    than uvicorn's read buffer run in a task from the start.
    """

    # uvicorn's RequestResponseCycle sets these per instance; here they start as class defaults
    # and become instance attributes only when a request changes them.
    disconnected = False
    more_body = True
    response_started = False
    response_complete = False
    chunked_encoding: bool | None = None
    expected_content_length = 0

    def __init__(self, protocol: GatewayHttpProtocol, scope: Any, keep_alive: bool) -> None:
        # The rest of what uvicorn's RequestResponseCycle sets, with the protocol's values.
        self.scope = scope
        self.protocol = protocol
        self.loop = loop = protocol.loop
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.logger = protocol.logger
        self.access_logger = protocol.access_logger
        self.access_log = protocol.access_log
        self.default_headers = protocol.server_state.default_headers
        self.message_event = _Signal(loop)  # type: ignore[assignment]
        self.on_response = protocol.on_response_complete
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.body = bytearray()

    def take_body(self) -> bytes:
        body = bytes(self.body)
        self.body = bytearray()
        return body

    def hand_over(self, app: Any) -> None:
        """Run ``app(scope, receive, send)`` in a task for the rest of this request."""
        self.protocol._start_asgi_task(self, app)

    async def receive(self) -> Any:  # the ASGI receive callable
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            signal = self.message_event
            if not signal.flag:  # type: ignore[attr-defined]
                await signal.wait()
            signal.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = bytes(self.body)
        self.body = bytearray()
        return {"type": "http.request", "body": body, "more_body": self.more_body}
