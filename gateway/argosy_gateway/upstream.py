"""The pooled upstream HTTP/1.1 client (one per app, opened and closed in the lifespan).

The proxy talks to model servers through one small interface, ``Upstream``. It is
implemented here on ``asyncio.Protocol`` with httptools' response parser (llhttp, the
parser uvicorn uses) instead of aiohttp's client: aiohttp took about 45 % of the
gateway's CPU per short request (docs/benchmarks.md), most of it in machinery a proxy
does not use (cookies, redirects, multidict headers, tracing hooks, per-read timers).
What it keeps is what a proxy needs:

- keep-alive pools per endpoint, most recently used connection first; idle ones are
  closed after ``keepalive_seconds``, and one the server closed is never reused;
- a limit on connections per endpoint and in total (further requests wait their turn);
- chunked bodies, length-delimited ones and ones that end when the server closes;
  interim ``1xx`` responses (``100 Continue``) are skipped; response headers are capped;
- body bytes handed over as the parser returns them, with flow control (reading pauses
  while the proxy has a backlog).

tests/unit/gateway/test_upstream_conformance.py is its conformance suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from argosy_gateway.deadlines import Deadline, FixedDelay
from argosy_gateway.settings import GatewaySettings

MAX_HEADER_BYTES = 64 * 1024  # status line and headers of one response
_READ_HIGH_WATER = 256 * 1024  # pause reading from the model server above this backlog
_LARGE_BODY = 16 * 1024  # request bodies above this are written separately, not copied
_NO_BODY_STATUSES = frozenset((204, 304))


class UpstreamError(Exception):
    """An upstream attempt failed before a complete response; ``reason`` is a metric label."""

    reason = "disconnect"


class UpstreamConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, connect timeout)."""

    reason = "connect"


class UpstreamBrokenError(UpstreamError):
    """The connection broke or the server spoke malformed HTTP."""

    reason = "disconnect"


class UpstreamResponse(Protocol):
    status: int
    complete: bool  # the whole body has arrived
    failure: BaseException | None  # what the pending (or next) read would raise

    def header(self, name: str) -> str | None:
        """A response header by lower-case name."""

    def raw_header(self, name: bytes) -> bytes | None:
        """A response header's bytes by lower-case name (as the model server sent them)."""

    async def read(self) -> bytes:
        """The whole body."""

    async def read_chunk(self) -> bytes:
        """Whatever body bytes are available (waiting for some); b"" at the end."""

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` (no read pending) after each arrival of bytes once the headers are
        in, when the body ends with the connection, and when the response fails; None, ``release``
        and ``close`` stop it.

        It is called outside the HTTP parser, so it may release or close the connection.
        """

    def take_body(self) -> bytes:
        """The whole body, once ``complete`` and without ``failure`` (``read`` without waiting)."""

    def splice(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Hand the rest of the body to ``sink`` as it arrives (no reads any more).

        Bytes already received go to ``sink`` at once, and reading resumes. The future
        resolves at the end of the body, or fails as a read would (``fail`` included).
        """

    def pause_reading(self) -> None:
        """Stop reading from the model server (the spliced body's reader is slow)."""

    def resume_reading(self) -> None: ...

    def fail(self, exc: BaseException) -> None:
        """Make the pending (or next) read raise ``exc``."""

    def release(self) -> None:
        """The body was read to the end: the connection may be reused."""

    def close(self) -> None:
        """Drop the connection (the server sees the client go away)."""


class Upstream(Protocol):
    async def post(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        first_byte_timeout: float | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` to ``endpoint + path``; returns once the response headers arrived.

        With ``first_byte_timeout``, the wait for the headers and the first body bytes (the
        whole body, for ``read``) raises ``TimeoutError`` after that many seconds.
        """

    def post_now(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        first_byte_timeout: float | None = None,
    ) -> UpstreamResponse | None:
        """``post`` written at once on an idle connection, or None when none is idle; the
        response is then followed with ``listen`` (its first-byte deadline fails it)."""

    async def close(self) -> None: ...


def create_upstream(settings: GatewaySettings) -> Upstream:
    return PooledUpstream(
        max_connections=settings.max_connections,
        max_connections_per_endpoint=settings.max_connections_per_endpoint,
        keepalive_seconds=settings.keepalive_seconds,
        connect_timeout_seconds=settings.connect_timeout_seconds,
    )


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, which is also the response being read on it (one at a time)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_header_bytes",
        "_headers",
        "_headers_done",
        "_headers_future",
        "_listener",
        "_parser",
        "_paused",
        "_reader",
        "_sink",
        "_timer",
        "_until_close",
        "_waiter",
        "closed",
        "complete",
        "failure",
        "idle_since",
        "keep_alive",
        "loop",
        "pool",
        "status",
        "transport",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None  # while a response is awaited
        self._reader: httptools.HttpResponseParser | None = None  # the connection's, reused per response
        self._timer: asyncio.TimerHandle | Deadline | None = None
        self._headers_future: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._body_size = 0
        self._paused = False
        self._sink: Callable[[bytes], None] | None = None
        self._listener: Callable[[], None] | None = None
        self.failure: BaseException | None = None
        self.complete = False
        self._headers_done = False
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._until_close = False
        self.keep_alive = False
        self.status = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            # Bytes nobody asked for (after a complete response): the stream is out of step.
            self._abort(UpstreamBrokenError("unexpected bytes from the model server"))
            return
        if not self._headers_done:
            self._header_bytes += len(data)  # an upper bound until the headers are complete
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort(UpstreamBrokenError(f"malformed HTTP from the model server: {exc}"))
            return
        if self._header_bytes > MAX_HEADER_BYTES and not self._headers_done:
            self._abort(UpstreamBrokenError(f"response headers larger than {MAX_HEADER_BYTES} bytes"))
        elif self._listener is not None and self._headers_done:
            self._listener()  # after the parser returned: the listener may release the connection

    def eof_received(self) -> bool:
        return False  # close our side too: a half-closed connection is never reused

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._parser is None or self.complete:
            return
        if self._headers_done and self._until_close and exc is None:
            self._finish()  # a body delimited by the end of the connection
            if self._listener is not None:
                self._listener()
            return
        self._set_exception(UpstreamBrokenError("the model server closed the connection"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a chunked body's trailers: not passed on
        key = name.lower()
        headers = self._headers
        if key not in headers:
            headers[key] = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200:
            self._headers.clear()  # an interim response (100 Continue, 103 Early Hints): skip it
            return
        if self._header_bytes > MAX_HEADER_BYTES and sum(map(len, self._headers.values())) > MAX_HEADER_BYTES:
            return  # left incomplete: data_received refuses the response
        self.status = status
        self._headers_done = True
        self.keep_alive = parser.should_keep_alive()
        headers = self._headers
        self._until_close = (
            status not in _NO_BODY_STATUSES and b"content-length" not in headers and b"transfer-encoding" not in headers
        )
        future = self._headers_future
        if future is not None and not future.done():
            future.set_result(None)

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:  # spliced: straight on, nothing kept, nobody woken
            sink(body)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > _READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._finish()

    # -- the request --------------------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes, timeout: float | None, timers: FixedDelay | None = None
    ) -> asyncio.Future[None]:
        """Write one request; the future resolves when its response headers arrived.

        ``timers``, when given, keeps the first-byte deadline (its delay is ``timeout``).
        """
        self.start(head, body, timeout, timers)
        future = self._headers_future = self.loop.create_future()
        return future

    def start(self, head: bytes, body: bytes, timeout: float | None, timers: FixedDelay | None = None) -> None:
        """Write one request, to be followed with ``listen`` (``send`` without its future)."""
        # One parser per connection: llhttp starts the next message after a complete one.
        parser = self._reader
        if parser is None:
            parser = self._reader = httptools.HttpResponseParser(self)
        self._parser = parser
        self._sink = None
        self._listener = None
        self._headers_future = None
        self._body.clear()
        self._body_size = 0
        self.failure = None
        self.complete = self._headers_done = self._until_close = False
        self._headers = {}
        self._header_bytes = 0
        self.status = 0
        if timers is not None:
            self._timer = timers.call_later(self._first_byte_overdue)
        elif timeout is not None:
            self._timer = self.loop.call_later(max(0.0, timeout), self._first_byte_overdue)
        transport = self.transport
        assert transport is not None
        if len(body) < _LARGE_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)

    def _first_byte_overdue(self) -> None:
        self._timer = None
        self._set_exception(TimeoutError())

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.complete = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _set_exception(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sink = None  # a failed splice writes nothing more
        self.failure = exc
        for future in (self._headers_future, self._waiter):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here, so an abandoned future logs nothing
        self._waiter = None
        if self._listener is not None:
            self._listener()

    def _abort(self, exc: BaseException) -> None:
        self._set_exception(exc)
        self.close()

    def _resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- UpstreamResponse ---------------------------------------------------------------------

    def header(self, name: str) -> str | None:
        value = self._headers.get(name.encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    def raw_header(self, name: bytes) -> bytes | None:
        return self._headers.get(name)

    async def read_chunk(self) -> bytes:
        body = self._body
        while not body:
            if self.failure is not None:
                raise self.failure
            if self.complete:
                return b""
            waiter = self._waiter = self.loop.create_future()
            await waiter
        if self.failure is not None:
            raise self.failure
        chunk = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_size = 0
        self._resume()
        return chunk

    async def read(self) -> bytes:
        while not self.complete:
            if self.failure is not None:
                raise self.failure
            self._resume()  # the whole body is wanted: no backlog limit
            waiter = self._waiter = self.loop.create_future()
            await waiter
        if self.failure is not None:
            raise self.failure
        return self.take_body()

    def listen(self, listener: Callable[[], None] | None) -> None:
        self._listener = listener

    def take_body(self) -> bytes:
        assert self.complete and self.failure is None
        body = self._body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_size = 0
        return data

    def splice(self, sink: Callable[[bytes], None]) -> asyncio.Future[None]:
        done = self.loop.create_future()
        if self.failure is not None:
            done.set_exception(self.failure)
            return done
        body = self._body
        if body:
            chunk = body.popleft() if len(body) == 1 else b"".join(body)
            body.clear()
            self._body_size = 0
            sink(chunk)
        if self.complete:
            done.set_result(None)
            return done
        self._sink = sink
        self._waiter = done  # _finish and _set_exception resolve it like a read's waiter
        self._resume()
        return done

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._resume()

    def fail(self, exc: BaseException) -> None:
        self._set_exception(exc)

    def release(self) -> None:
        self._listener = None
        if self.complete and self.keep_alive and self.failure is None and not self.closed:
            self._parser = None
            self.pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        self._sink = self._listener = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows and updates the pool


class _Pool:
    """The connections to one endpoint: the idle ones (most recent last) and a count of all."""

    def __init__(self, owner: PooledUpstream, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(f"not an http(s) endpoint: {endpoint}")
        self.owner = owner
        self.loop = owner.loop
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = owner.ssl_context() if parts.scheme == "https" else None
        self.host_header = parts.netloc.encode("latin-1")
        self.idle: list[_Connection] = []
        self.open = 0
        self._heads: dict[str, tuple[Mapping[str, str], bytes]] = {}

    def head(self, path: str, body_size: int, headers: Mapping[str, str]) -> bytes:
        """The request line and headers of a POST of ``body_size`` bytes.

        The lines before Content-Length are kept per path for the last ``headers`` object seen
        (the proxy passes the same mapping for most requests, below).
        """
        cached = self._heads.get(path)
        if cached is not None and cached[0] is headers:  # held here, so its identity is not reused
            return b"%bContent-Length: %d\r\n\r\n" % (cached[1], body_size)
        if any(c in path for c in " \r\n"):
            raise UpstreamBrokenError("the request path contains white space")
        parts = [b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (path.encode("latin-1"), self.host_header)]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise UpstreamBrokenError(f"the {name} header contains a line break")
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines = b"".join(parts)
        if len(self._heads) > 256:
            self._heads.clear()
        self._heads[path] = (headers, lines)
        return b"%bContent-Length: %d\r\n\r\n" % (lines, body_size)

    def forget(self, connection: _Connection) -> None:
        """A connection closed: it leaves the pool and frees its place under the limits."""
        if connection.pool is not self:
            return
        connection.pool = _DETACHED
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        self.open -= 1
        self.owner.connection_closed()

    def give_back(self, connection: _Connection) -> None:
        if self.owner.closing:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        self.idle.append(connection)
        if self.owner.waiting:  # connection_idle(), called only when someone waits
            self.owner.connection_idle()

    def take_idle(self) -> _Connection | None:
        idle = self.idle
        expired_before = self.loop.time() - self.owner.keepalive_seconds
        while idle:
            connection = idle.pop()
            if connection.closed or connection.transport is None or connection.transport.is_closing():
                continue
            if connection.idle_since < expired_before:
                # The rest are older, so expired too: close them all.
                connection.close()
                for stale in list(idle):
                    stale.close()
                idle.clear()
                return None
            return connection
        return None

    async def connect(self) -> _Connection:
        """Open a new connection; the caller has counted it under the total limit."""
        self.open += 1
        try:
            async with asyncio.timeout(self.owner.connect_timeout_seconds):
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl
                )
        except BaseException as exc:
            self.open -= 1
            self.owner.connection_closed()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectError(f"connecting to {self.host}:{self.port} timed out") from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
            raise
        return protocol


class _DetachedPool:
    """Where a closed connection points, so late callbacks change nothing."""

    def forget(self, connection: _Connection) -> None:
        pass

    def give_back(self, connection: _Connection) -> None:
        connection.close()


_DETACHED: _Pool = _DetachedPool()  # type: ignore[assignment]


class PooledUpstream:
    """Keep-alive connection pools per endpoint with per-endpoint and total limits."""

    def __init__(
        self,
        *,
        max_connections: int = 1024,
        max_connections_per_endpoint: int = 0,
        keepalive_seconds: float = 4.0,
        connect_timeout_seconds: float = 5.0,
        max_endpoints: int = 4096,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_connections = max_connections
        self.max_per_endpoint = max_connections_per_endpoint or max_connections  # 0: only the total limit
        self.keepalive_seconds = keepalive_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self.max_endpoints = max_endpoints
        self.closing = False
        self._pools: dict[str, _Pool] = {}
        self._open = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._ssl: ssl.SSLContext | None = None
        self._first_byte: dict[float, FixedDelay] = {}  # by timeout: the deadlines of reused connections

    def _first_byte_timers(self, timeout: float | None) -> FixedDelay | None:
        """The shared deadlines for ``timeout`` (a setting: a few values at most), or None."""
        if timeout is None:
            return None
        timers = self._first_byte.get(timeout)
        if timers is None and len(self._first_byte) < 4:
            timers = self._first_byte[timeout] = FixedDelay(self.loop, timeout, min(0.1, timeout / 4))
        return timers

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    @property
    def open_connections(self) -> int:
        return self._open

    def _pool(self, endpoint: str) -> _Pool:
        pool = self._pools.get(endpoint)
        if pool is None:
            if len(self._pools) >= self.max_endpoints:
                for stale in [e for e, p in self._pools.items() if p.open == 0]:
                    del self._pools[stale]
            pool = self._pools[endpoint] = _Pool(self, endpoint)
        return pool

    async def _acquire(self, pool: _Pool) -> _Connection:
        while True:
            connection = pool.take_idle()
            if connection is not None:
                return connection
            if pool.open < self.max_per_endpoint and self._open < self.max_connections:
                self._open += 1
                return await pool.connect()
            if self._open >= self.max_connections:
                self._close_one_idle()  # its connection_lost wakes the waiters
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _close_one_idle(self) -> None:
        """Make room under the total limit by closing another endpoint's idle connection."""
        for pool in self._pools.values():
            if pool.idle:
                pool.idle.pop(0).close()
                return

    def connection_closed(self) -> None:
        self._open -= 1
        self._wake_waiters()

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def connection_idle(self) -> None:
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        # Only at a connection limit, and they may wait for different endpoints: wake them
        # all and let each one look again.
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def post(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        first_byte_timeout: float | None = None,
    ) -> UpstreamResponse:
        if self.closing:
            raise UpstreamConnectError("the gateway is shutting down")
        pool = self._pool(endpoint)
        head = pool.head(path, len(body), headers)
        connection = pool.take_idle()
        if connection is None:  # a new connection, or a wait at the limits: within the deadline too
            started = self.loop.time()
            async with asyncio.timeout(first_byte_timeout):
                connection = await self._acquire(pool)
            timers = None
            if first_byte_timeout is not None:
                first_byte_timeout -= self.loop.time() - started
        else:
            timers = self._first_byte_timers(first_byte_timeout)
        try:
            await connection.send(head, body, first_byte_timeout, timers)
        except BaseException:
            connection.close()
            raise
        return connection

    def post_now(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        first_byte_timeout: float | None = None,
    ) -> _Connection | None:
        """``post`` on an idle keep-alive connection, written now, without waiting for the
        headers (follow it with ``listen``); None when no connection is idle or the client
        is closing. Raises as ``post`` does for a bad endpoint or header."""
        if self.closing:
            return None
        pool = self._pool(endpoint)
        head = pool.head(path, len(body), headers)
        connection = pool.take_idle()
        if connection is not None:
            connection.start(head, body, first_byte_timeout, self._first_byte_timers(first_byte_timeout))
        return connection

    async def close(self) -> None:
        self.closing = True
        for timers in self._first_byte.values():
            timers.close()
        for pool in self._pools.values():
            for connection in list(pool.idle):
                connection.close()
            pool.idle.clear()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost
