"""The proxy paths as raw ASGI endpoints: the hot path of the gateway.

They are mounted as Starlette routes inside the FastAPI app, but skip FastAPI's
request parsing, dependency injection and response classes: the body is read once,
parsed once with the standard json module, forwarded as the original bytes, and the
upstream response is passed through as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from time import monotonic, perf_counter
from types import MappingProxyType
from typing import Any

from argosy_gateway import errors
from argosy_gateway.deadlines import Deadline, FixedDelay
from argosy_gateway.errors import GatewayError
from argosy_gateway.metrics import UNKNOWN_MODEL
from argosy_gateway.parsing import MULTIPART_BODY, ParsedRequest, parse_request, prompt_prefix
from argosy_gateway.routetable import DEFAULT_POLICY, ModelRoute, endpoint_address
from argosy_gateway.runtime import GatewayRuntime
from argosy_gateway.server import ANSWER_EXTENSION, BODY_NEXT, CLIENT_LOST_EXTENSION, SPLICE_EXTENSION, DirectCycle
from argosy_gateway.upstream import UpstreamConnectError, UpstreamError, UpstreamResponse
from argosy_gateway.usage import extract_usage

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Splice = Callable[[Any], Any]  # server.py's argosy.splice: takes a listener, gives a transport or None
Answer = Callable[[int, Headers, bytes], None]  # server.py's argosy.answer: a whole response at once

log = logging.getLogger(__name__)

STATUS_CLIENT_CLOSED = 499  # nginx's convention for "the client went away first"
_FORWARDED_REQUEST_HEADERS = (b"x-request-id", b"traceparent", b"tracestate")
_EVENT_STREAM = b"text/event-stream"
_JSON = b"application/json"
_RETRYABLE_STATUSES = (502, 503)
Forwarded = Mapping[str, str]  # the request headers for the model server, never changed once made
_JSON_ONLY: Forwarded = MappingProxyType({"Content-Type": "application/json"})


class _ClientGone(Exception):
    """The client disconnected while we were still reading its request."""


class _Attempt(Exception):
    """A failed upstream attempt before any byte reached the client (may be retried).

    ``answer`` is the model server's own answer (a 502/503 and its headers and body), which
    the client gets unchanged when no retry is left.
    """

    def __init__(
        self, reason: str, error: GatewayError, retryable: bool, answer: tuple[int, Headers, bytes] | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.retryable = retryable
        self.answer = answer


class _Admitted:
    """A request parsed, routed and admitted: what choosing an endpoint and trying it need."""

    __slots__ = ("body", "forwarded", "parsed", "route", "session_id")

    def __init__(
        self, route: ModelRoute, parsed: ParsedRequest, body: bytes, forwarded: Forwarded, session_id: str | None
    ) -> None:
        self.route = route  # replaced by the woken one when the model had to be woken
        self.parsed = parsed
        self.body = body
        self.forwarded = forwarded  # the request headers for the model server
        self.session_id = session_id


class _StreamSilent(Exception):
    """The upstream stream sent nothing for the between-chunk timeout."""


class _SilenceWatchdog:
    """Fails a stream's pending read once nothing arrived for ``seconds``.

    Cheaper than a timeout context per chunk: the hot loop only stores the time of the
    last chunk, and one timer re-arms itself at most once per ``seconds``.
    """

    __slots__ = ("_handle", "_loop", "_response", "_seconds", "last_activity", "sending")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, response: UpstreamResponse) -> None:
        self._loop = loop
        self._seconds = seconds
        self._response = response
        self.last_activity = loop.time()
        self.sending = False  # a slow client is not a silent server
        self._handle = loop.call_at(self.last_activity + seconds, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        deadline = (now if self.sending else self.last_activity) + self._seconds
        if now >= deadline:
            self._response.fail(_StreamSilent())
        else:
            self._handle = self._loop.call_at(deadline, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


# A request still waiting for its upstream after this long (up to _WATCH_RESOLUTION more)
# gets a task that watches for the client going away. Most short requests are answered
# sooner, and then cost a shared deadline instead of a task (created, woken, cancelled).
_WATCH_AFTER_SECONDS = 0.05
_WATCH_RESOLUTION = 0.01


class _Exchange:
    """One request's bookkeeping: its outcome for the metrics, the server's extensions, and
    the watch for the client going away."""

    __slots__ = (
        "_client_lost",
        "_receive",
        "_timer",
        "answer",
        "disconnected",
        "model",
        "splice",
        "started",
        "status",
        "task",
        "watcher",
        "watching",
    )

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        answer: Answer | None,
        splice: Splice | None,
        client_lost: Callable[[Any], None] | None,
        started: float,
    ) -> None:
        self.task = task  # None until a request answered without a task is handed to one
        # The server's argosy.answer, argosy.splice and argosy.client_lost, when it offers them.
        self.answer = answer
        self.splice = splice
        self._client_lost = client_lost
        self.started = started
        self.model = UNKNOWN_MODEL
        self.status = 500
        self.disconnected = False
        self.watching = False
        self.watcher: asyncio.Task[None] | None = None
        self._timer: Deadline | None = None
        self._receive: Receive | None = None

    @classmethod
    def of_scope(cls, task: asyncio.Task[Any], scope: Scope, started: float) -> _Exchange:
        extensions = scope.get("extensions")
        if not extensions:
            return cls(task, None, None, None, started)
        return cls(
            task,
            extensions.get(ANSWER_EXTENSION),
            extensions.get(SPLICE_EXTENSION),
            extensions.get(CLIENT_LOST_EXTENSION),
            started,
        )

    def watch_soon(self, timers: Callable[[], FixedDelay], receive: Receive) -> None:
        """Watch for a disconnect: the server's callback, or (without one) a task unless the
        exchange is over within the delay of ``timers()``."""
        self.watching = True
        if self._client_lost is not None:
            self._client_lost(self.client_gone)
            return
        self._receive = receive
        self._timer = timers().call_later(self._watch)

    def _watch(self) -> None:
        self._timer = None
        assert self._receive is not None
        self.watcher = asyncio.ensure_future(_watch_disconnect(self._receive, self))

    def client_gone(self) -> None:
        """The client disconnected: the request's task ends with a 499 (once, whoever saw it first)."""
        if not self.disconnected:
            self.disconnected = True
            assert self.task is not None
            self.task.cancel()

    def stop_watching(self) -> None:
        self.watching = False
        if self._client_lost is not None:
            self._client_lost(None)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None


async def _watch_disconnect(receive: Receive, exchange: _Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.client_gone()
            return


class _Sink:
    """The rest of an upstream stream, written to the client's transport from the upstream's callback.

    Per chunk: one frame, one write, the time for the silence watchdog and the last two chunks
    for the usage metric. Flow control both ways: a client whose buffer is full pauses the
    reading from the model server; a client that goes away closes the upstream connection
    and ends the request (499), as the disconnect watcher would.
    """

    __slots__ = ("_exchange", "_response", "_time", "_watchdog", "last", "previous", "write")

    def __init__(
        self,
        exchange: _Exchange,
        response: UpstreamResponse,
        watchdog: _SilenceWatchdog,
        loop: asyncio.AbstractEventLoop,
        last: bytes,
    ) -> None:
        self._exchange = exchange
        self._response = response
        self._watchdog = watchdog
        self._time = loop.time
        self.previous = b""
        self.last = last
        self.write: Callable[[bytes], object] = _no_write

    def on_body(self, chunk: bytes) -> None:
        self.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        self.previous, self.last = self.last, chunk
        self._watchdog.last_activity = self._time()

    def client_paused(self) -> None:
        self._watchdog.sending = True  # a slow client is not a silent server
        self._response.pause_reading()

    def client_resumed(self) -> None:
        watchdog = self._watchdog
        watchdog.sending = False
        watchdog.last_activity = self._time()
        self._response.resume_reading()

    def client_lost(self) -> None:
        self._response.close()  # at once: nothing more is read or written
        self._exchange.client_gone()


def _no_write(data: bytes) -> None:
    raise AssertionError("a chunk arrived before the splice was set up")


async def send_error(send: Send, error: GatewayError, answer: Answer | None = None) -> None:
    body = error.body()
    if (pending := _respond(send, answer, error.status, error.headers(len(body)), body)) is not None:
        await pending


def _respond(
    send: Send, answer: Answer | None, status: int, headers: Headers, body: bytes
) -> Coroutine[Any, Any, None] | None:
    """A whole response: sent now with the server's argosy.answer (None returned, nothing to
    await), else the coroutine that sends it as two ASGI messages."""
    if answer is not None:
        answer(status, headers, body)
        return None
    return _send_start_and_body(send, status, headers, body)


async def _send_start_and_body(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers, BODY_NEXT: True})
    await send({"type": "http.response.body", "body": body})


class ProxyEndpoint:
    """ASGI app for one model-addressed path (``/v1/chat/completions`` and friends).

    ``kind`` is the body format (parsing.JSON_BODY or MULTIPART_BODY). ``on_answer``, when
    set, sees the model, the endpoint and the first bytes of every 200 answer (the Responses API uses
    it to remember which replica stored a response).

    Served by the gateway's protocol, a request to it usually takes ``run_now`` instead of the
    ASGI call: it is parsed, routed and written to the model server from the protocol's
    callback, and a whole non-streamed answer is passed back from the upstream connection's
    (``_Answering``), with no task. Whatever needs to wait otherwise (a model to wake, a new
    upstream connection, a stream, a retry) goes on in a task, from where it got to.
    """

    def __init__(
        self,
        runtime: GatewayRuntime,
        kind: str,
        path: str,
        on_answer: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.kind = kind
        self.path = path
        self.on_answer = on_answer
        self._addresses: dict[str, bytes] = {}
        self._watch_timers: FixedDelay | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._is_stream: dict[bytes, bool] = {}  # content type -> is it an event stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange.of_scope(self._current_task(), scope, perf_counter())
        await self._guarded(exchange, send, self._serve(exchange, scope, receive, send))

    def run_now(self, cycle: DirectCycle) -> None:
        """The server's direct route (server.RUN_NOW_ATTRIBUTE): the request of ``cycle``, its
        body complete, taken as far as it goes without waiting, from the protocol's callback."""
        runtime = self.runtime
        exchange = _Exchange(None, cycle.answer, cycle.splice, cycle.client_lost, perf_counter())
        endpoint = None
        try:
            content_length, authorization, session_id, content_type_text, forwarded = self._request_head(cycle.scope)
            key = runtime.authenticate(authorization) if runtime.keys is not None else None
            limit = runtime.settings.max_body_bytes
            if content_length > limit:
                raise errors.body_too_large(limit)
            body = cycle.take_body()
            if len(body) > limit:
                raise errors.body_too_large(limit)
            request = self._admitted(exchange, key, body, content_type_text, forwarded, session_id)
            route = request.route
            # A stream goes on in a task whatever happens: it is handed over before its write.
            if route.endpoints and route.name not in runtime.wake.waking and not request.parsed.stream:
                policy, affinity = self._policy(request)
                endpoint = policy.choose(
                    route.name, runtime.health.usable(route.endpoints, monotonic()), runtime.outstanding, affinity
                )
                response = runtime.upstream.post_now(
                    endpoint,
                    self.path,
                    body,
                    runtime.table.upstream_headers(endpoint, forwarded),
                    runtime.settings.first_byte_timeout_seconds,
                )
                if response is not None:
                    address = self._address(endpoint)
                    in_flight = self._enter(route.name, endpoint, address)
                    _Answering(self, cycle, exchange, request).start(endpoint, address, response, in_flight)
                    return
        except GatewayError as error:
            exchange.status = error.status
            error_body = error.body()
            cycle.answer(error.status, error.headers(len(error_body)), error_body)
            runtime.metrics.request_done(exchange.model, exchange.status, perf_counter() - exchange.started)
            return
        except UpstreamError:
            pass  # a bad endpoint address or header value: the task's attempt reports it
        except Exception:
            log.exception("unexpected error while proxying %s", self.path)
            self._internal_error_now(cycle, exchange)
            return
        self._hand_over(cycle, exchange, request, endpoint, None)

    def _hand_over(
        self,
        cycle: DirectCycle,
        exchange: _Exchange,
        request: _Admitted,
        endpoint: str | None,
        sent: tuple[UpstreamResponse, tuple[str, str]] | None,
    ) -> None:
        """The rest of a request begun in ``run_now`` in a task (the server's ASGI cycle)."""

        async def rest(scope: Scope, receive: Receive, send: Send) -> None:
            exchange.task = self._current_task()
            work = self._proceed(exchange, receive, send, request, endpoint, sent)
            await self._guarded(exchange, send, work)

        cycle.hand_over(rest)

    def _internal_error_now(self, cycle: DirectCycle, exchange: _Exchange) -> None:
        """A bug seen in ``run_now`` or its callbacks (logged by the caller): a 500, if it can still be sent."""
        exchange.status = 500
        error = GatewayError(500, "Internal gateway error.", error_type="server_error")
        body = error.body()
        with contextlib.suppress(Exception):  # the response may already have started
            cycle.answer(500, error.headers(len(body)), body)
        self.runtime.metrics.request_done(exchange.model, 500, perf_counter() - exchange.started)

    def _current_task(self) -> asyncio.Task[Any]:
        loop = self._loop
        # With the loop, current_task looks up no running loop (a getpid system call in 3.11).
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # the first request, or another loop (tests)
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
        assert task is not None
        return task

    def _request_head(self, scope: Mapping[str, Any]) -> tuple[int, bytes | None, str | None, str | None, Forwarded]:
        """(content length or -1, authorization, session id, multipart content type, headers to forward)."""
        content_length = -1
        authorization = session_id = content_type = None
        forwarded = _JSON_ONLY  # shared, so the upstream client reuses its request head
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
            elif name == b"authorization":
                authorization = value
            elif name == b"x-session-id":
                session_id = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
            elif name in _FORWARDED_REQUEST_HEADERS:
                forwarded = MappingProxyType({**forwarded, name.decode(): value.decode("latin-1")})
        content_type_text = None
        if self.kind == MULTIPART_BODY and content_type is not None:
            content_type_text = content_type.decode("latin-1")
            # The boundary must reach vLLM.
            forwarded = MappingProxyType({**forwarded, "Content-Type": content_type_text})
        return content_length, authorization, session_id, content_type_text, forwarded

    def _admitted(
        self,
        exchange: _Exchange,
        key: Any,
        body: bytes,
        content_type_text: str | None,
        forwarded: Forwarded,
        session_id: str | None,
    ) -> _Admitted:
        """The request parsed and routed to its model, admitted for ``key``; raises GatewayError."""
        runtime = self.runtime
        parsed = parse_request(self.kind, body, content_type_text)
        route = runtime.table.routes.get(parsed.model)
        if route is None:
            if not runtime.loaded:
                raise errors.routes_not_loaded(runtime.settings.retry_after_seconds)
            names = runtime.table.model_names()
            raise errors.model_not_found(parsed.model, [n for n in names if key is None or key.allows(n)])
        exchange.model = route.name
        if key is not None:
            runtime.admit(key, route.name)
        return _Admitted(route, parsed, body, forwarded, session_id)

    async def _serve(self, exchange: _Exchange, scope: Scope, receive: Receive, send: Send) -> int:
        runtime = self.runtime
        content_length, authorization, session_id, content_type_text, forwarded = self._request_head(scope)
        key = runtime.authenticate(authorization) if runtime.keys is not None else None
        limit = runtime.settings.max_body_bytes
        if content_length > limit:
            raise errors.body_too_large(limit)
        body = await _read_body(receive, limit)
        request = self._admitted(exchange, key, body, content_type_text, forwarded, session_id)
        return await self._proceed(exchange, receive, send, request)

    async def _proceed(
        self,
        exchange: _Exchange,
        receive: Receive,
        send: Send,
        request: _Admitted,
        endpoint: str | None = None,
        sent: tuple[UpstreamResponse, tuple[str, str]] | None = None,
    ) -> int:
        """An admitted request from its routing on (``endpoint`` chosen already, ``sent`` to it)."""
        runtime = self.runtime
        exchange.watch_soon(self._watch_delay, receive)
        route = request.route
        if endpoint is None and (not route.endpoints or route.name in runtime.wake.waking):  # wake and wait, or 503
            request.route = await runtime.wake.ready_route(route)
        return await self._forward(send, exchange, request, endpoint, sent)

    async def _guarded(self, exchange: _Exchange, send: Send, work: Coroutine[Any, Any, int]) -> None:
        """Await ``work`` (which answers and returns the status); every way it can end answered and counted."""
        runtime = self.runtime
        try:
            try:
                exchange.status = await work
            except GatewayError as error:
                exchange.status = error.status
                exchange.stop_watching()
                await send_error(send, error, exchange.answer)
            except _ClientGone:
                exchange.status = STATUS_CLIENT_CLOSED
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            assert exchange.task is not None
            exchange.task.uncancel()
            exchange.status = STATUS_CLIENT_CLOSED
            runtime.metrics.client_disconnects.labels(exchange.model).inc()
        except Exception:
            # A bug, never a client's doing: log it and answer a well-formed 500.
            log.exception("unexpected error while proxying %s", self.path)
            exchange.stop_watching()
            exchange.status = 500
            with contextlib.suppress(Exception):  # the response may already have started
                await send_error(send, GatewayError(500, "Internal gateway error.", error_type="server_error"))
        finally:
            if exchange.watching:
                exchange.stop_watching()
            runtime.metrics.request_done(exchange.model, exchange.status, perf_counter() - exchange.started)

    def _policy(self, request: _Admitted) -> tuple[Any, str | None]:
        """The route's routing policy and the request's affinity key for it."""
        runtime = self.runtime
        policy = runtime.policies.get(request.route.policy) or runtime.policies[DEFAULT_POLICY]
        affinity: str | None = None
        if policy.needs == "prefix":
            affinity = prompt_prefix(request.parsed.body, runtime.settings.prefix_chars)
        elif policy.needs == "session":
            affinity = request.session_id or request.parsed.user
        return policy, affinity

    async def _forward(
        self,
        send: Send,
        exchange: _Exchange,
        request: _Admitted,
        endpoint: str | None = None,
        sent: tuple[UpstreamResponse, tuple[str, str]] | None = None,
    ) -> int:
        runtime = self.runtime
        route = request.route
        policy: Any = None  # the route's policy, looked up when an endpoint is to be chosen here
        affinity: str | None = None
        tried: list[str] = []
        retries_left = runtime.settings.retries
        while True:
            if endpoint is None:
                if policy is None:
                    policy, affinity = self._policy(request)
                candidates = runtime.health.usable(route.endpoints, monotonic())
                if tried:
                    candidates = [e for e in candidates if e not in tried] or [
                        e for e in route.endpoints if e not in tried
                    ]
                endpoint = policy.choose(route.name, candidates, runtime.outstanding, affinity)
            try:
                return await self._attempt(send, exchange, route.name, endpoint, request.body, request.forwarded, sent)
            except _Attempt as failed:
                tried.append(endpoint)
                more = any(e not in tried for e in route.endpoints)
                if not (failed.retryable and retries_left > 0 and more):
                    if failed.answer is not None:
                        return await _send_answer(send, exchange, *failed.answer)
                    raise failed.error from None
                retries_left -= 1
                runtime.metrics.retries.labels(route.name).inc()
                log.info("retrying %s on another endpoint after %s from %s", route.name, failed.reason, endpoint)
                endpoint = sent = None

    def _watch_delay(self) -> FixedDelay:
        """The shared 50 ms deadlines before a disconnect watcher starts (servers without argosy.client_lost)."""
        if self._watch_timers is None:
            self._watch_timers = FixedDelay(asyncio.get_running_loop(), _WATCH_AFTER_SECONDS, _WATCH_RESOLUTION)
        return self._watch_timers

    def _failure(self, model: str, endpoint: str, reason: str) -> None:
        runtime = self.runtime
        runtime.metrics.upstream_errors.labels(model, self._address(endpoint).decode(), reason).inc()
        if runtime.health.record_failure(endpoint, monotonic()):
            runtime.metrics.ejections.labels(self._address(endpoint).decode()).inc()
            log.warning(
                "ejecting endpoint %s for %.0f s after %d consecutive failures",
                endpoint,
                runtime.settings.eject_seconds,
                runtime.settings.eject_after_failures,
            )

    def _enter(self, model: str, endpoint: str, address: bytes) -> tuple[str, str]:
        """Count an attempt in flight to ``endpoint`` (for the policies and the metrics); see ``_leave``."""
        runtime = self.runtime
        outstanding = runtime.outstanding
        outstanding[endpoint] = outstanding.get(endpoint, 0) + 1
        # The metrics' requests in flight, by (model, endpoint address), kept here: every request does this.
        key = (model, address.decode())
        in_flight = runtime.metrics.in_flight_by_endpoint
        in_flight[key] = in_flight.get(key, 0) + 1
        return key

    def _leave(self, endpoint: str, in_flight: tuple[str, str]) -> None:
        runtime = self.runtime
        outstanding = runtime.outstanding
        count = outstanding.get(endpoint, 1) - 1
        if count > 0:
            outstanding[endpoint] = count
        else:
            outstanding.pop(endpoint, None)
        runtime.metrics.in_flight_by_endpoint[in_flight] -= 1

    def is_stream(self, content_type: bytes) -> bool:
        is_stream = self._is_stream.get(content_type)
        if is_stream is None:
            is_stream = content_type.split(b";", 1)[0].strip().lower() == _EVENT_STREAM
            if len(self._is_stream) < 256:
                self._is_stream[content_type] = is_stream
        return is_stream

    def answered(
        self,
        exchange: _Exchange,
        send: Send,
        endpoint: str,
        address: bytes,
        status: int,
        content_type: bytes,
        response: UpstreamResponse,
        body: bytes,
    ) -> Coroutine[Any, Any, None] | None:
        """A whole answer from the model server passed on (see ``_respond`` for the result) and counted."""
        runtime = self.runtime
        model = exchange.model
        runtime.health.record_success(endpoint)
        if self.on_answer is not None and status == 200:
            self.on_answer(model, endpoint, body)
        headers = _answer_headers(address, content_type, response)
        headers.append((b"content-length", b"%d" % len(body)))
        if exchange.watching:  # (run_now's requests: the answer's end unregisters their callback)
            exchange.stop_watching()
        runtime.metrics.answered(model, status, perf_counter() - exchange.started, body)
        if exchange.answer is not None:  # _respond(), inline
            exchange.answer(status, headers, body)
            return None
        return _send_start_and_body(send, status, headers, body)

    async def _attempt(
        self,
        send: Send,
        exchange: _Exchange,
        model: str,
        endpoint: str,
        body: bytes,
        headers: Forwarded,
        sent: tuple[UpstreamResponse, tuple[str, str]] | None = None,
    ) -> int:
        """One try on ``endpoint``; ``sent``: the response and in-flight count of a try begun already."""
        runtime = self.runtime
        settings = runtime.settings
        address = self._address(endpoint)
        response: UpstreamResponse | None
        if sent is None:
            response, in_flight = None, self._enter(model, endpoint, address)
        else:
            response, in_flight = sent
        clean = False
        try:
            try:
                if response is None:
                    # The first-byte deadline is one timer in the client, armed when the request is sent.
                    response = await runtime.upstream.post(
                        endpoint,
                        self.path,
                        body,
                        runtime.table.upstream_headers(endpoint, headers),
                        settings.first_byte_timeout_seconds,
                    )
                elif response.failure is not None:
                    raise response.failure  # the try begun already failed (a timeout, a broken connection)
                status = response.status
                if status in _RETRYABLE_STATUSES:
                    self._failure(model, endpoint, f"status_{status}")
                    raise _Attempt(
                        f"HTTP {status}",
                        errors.upstream_failed(f"The model server answered HTTP {status}."),
                        retryable=True,
                        answer=await _retryable_answer(response, address),
                    )
                content_type = response.raw_header(b"content-type") or _JSON
                is_stream = self.is_stream(content_type)
                if is_stream:
                    first = await response.read_chunk()
                else:
                    first = await response.read()
            except UpstreamConnectError as exc:
                self._failure(model, endpoint, "connect")
                raise _Attempt(
                    "connect", errors.upstream_failed(f"Cannot connect to the model server: {exc}."), True
                ) from None
            except TimeoutError:
                self._failure(model, endpoint, "timeout")
                raise _Attempt(
                    "timeout",
                    errors.upstream_timeout(
                        f"The model server sent nothing within {settings.first_byte_timeout_seconds:g} s."
                    ),
                    False,
                ) from None
            except UpstreamError as exc:
                self._failure(model, endpoint, exc.reason)
                raise _Attempt(
                    exc.reason,
                    errors.upstream_failed(f"The model server failed before answering: {exc}."),
                    True,
                ) from None

            if not is_stream:
                pending = self.answered(exchange, send, endpoint, address, status, content_type, response, first)
                if pending is not None:
                    await pending
                clean = True
                return status

            runtime.health.record_success(endpoint)
            if self.on_answer is not None and status == 200:
                self.on_answer(model, endpoint, first)
            response_headers = _answer_headers(address, content_type, response)
            response_headers.append((b"cache-control", b"no-cache"))
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                runtime.metrics.first_byte(model, perf_counter() - exchange.started)
            chunk_timeout = settings.chunk_timeout_seconds
            loop = asyncio.get_running_loop()
            watchdog = _SilenceWatchdog(loop, chunk_timeout, response)
            try:
                try:
                    if first and exchange.splice is not None:
                        clean, previous, last = await _splice(send, exchange, response, watchdog, loop, first)
                    else:
                        clean, previous, last = await _relay(send, response, watchdog, loop, first)
                    break_with = b""
                except _StreamSilent:
                    self._failure(model, endpoint, "timeout")
                    message = f"The model server sent nothing for {chunk_timeout:g} s; the stream was cut."
                    break_with = errors.sse_error_event(message, "upstream_error", "upstream_timeout")
                except UpstreamError as exc:
                    self._failure(model, endpoint, exc.reason)
                    message = f"The model server failed during the stream: {exc}."
                    break_with = errors.sse_error_event(message)
            finally:
                watchdog.cancel()
            exchange.stop_watching()
            await send({"type": "http.response.body", "body": break_with})
            if clean and status == 200:
                runtime.metrics.usage(model, *extract_usage((previous + last)[-4096:]))
            return status
        finally:
            self._leave(endpoint, in_flight)
            if response is not None:
                if clean:
                    response.release()
                else:
                    # Closing (not releasing) drops the connection, which is how the model
                    # server learns to abort the request.
                    response.close()

    def _address(self, endpoint: str) -> bytes:
        address = self._addresses.get(endpoint)
        if address is None:
            if len(self._addresses) > 4096:
                self._addresses.clear()
            address = self._addresses[endpoint] = endpoint_address(endpoint).encode()
        return address


class _Answering:
    """A request of ``ProxyEndpoint.run_now`` written to a model server: its answer awaited in
    the upstream connection's callbacks (``UpstreamResponse.listen``), not in a task.

    A whole non-streamed answer goes back to the client from the callback that completed it;
    a stream, a 502/503 or a failure hands the request to a task that goes on with this try
    (``ProxyEndpoint._attempt`` with the response). A client that goes away first closes the
    upstream connection (the model server aborts the request) and is counted as a 499.
    """

    __slots__ = (
        "address",
        "content_type",
        "cycle",
        "endpoint",
        "exchange",
        "in_flight",
        "owner",
        "request",
        "response",
    )

    def __init__(
        self,
        owner: ProxyEndpoint,
        cycle: DirectCycle,
        exchange: _Exchange,
        request: _Admitted,
    ) -> None:
        self.owner = owner
        self.cycle = cycle
        self.exchange = exchange
        self.request = request
        self.content_type: bytes | None = None  # known once the headers were looked at

    def start(self, endpoint: str, address: bytes, response: UpstreamResponse, in_flight: tuple[str, str]) -> None:
        """Wait for the answer of the try begun on ``endpoint``."""
        self.endpoint = endpoint
        self.address = address
        self.response = response
        self.in_flight = in_flight
        response.listen(self.upstream_event)
        self.cycle.client_lost(self.client_gone)

    def upstream_event(self) -> None:
        response = self.response
        try:
            if response.failure is not None:
                return self._hand_over()
            content_type = self.content_type
            if content_type is None:  # the headers are in
                if response.status in _RETRYABLE_STATUSES:
                    return self._hand_over()
                content_type = self.content_type = response.raw_header(b"content-type") or _JSON
                if self.owner.is_stream(content_type):
                    return self._hand_over()
            if not response.complete:
                response.resume_reading()  # the whole body is wanted: no backlog limit
                return
            exchange = self.exchange
            cycle = self.cycle
            owner = self.owner
            status = response.status
            body = response.take_body()
            owner.answered(exchange, cycle.send, self.endpoint, self.address, status, content_type, response, body)
            owner._leave(self.endpoint, self.in_flight)
            response.release()  # (which also stops its calls to upstream_event)
            exchange.status = status
            owner.runtime.metrics.request_done(exchange.model, status, perf_counter() - exchange.started)
        except Exception:
            self._bug()

    def client_gone(self) -> None:
        try:
            response = self.response
            response.listen(None)
            response.close()  # the model server sees the connection go and aborts the request
            owner = self.owner
            owner._leave(self.endpoint, self.in_flight)
            exchange = self.exchange
            exchange.status = STATUS_CLIENT_CLOSED
            metrics = owner.runtime.metrics
            metrics.client_disconnects.labels(exchange.model).inc()
            metrics.request_done(exchange.model, STATUS_CLIENT_CLOSED, perf_counter() - exchange.started)
        except Exception:
            log.exception("unexpected error while proxying %s", self.owner.path)

    def _hand_over(self) -> None:
        self.response.listen(None)
        self.cycle.client_lost(None)  # the task's exchange watches from now on
        self.owner._hand_over(self.cycle, self.exchange, self.request, self.endpoint, (self.response, self.in_flight))

    def _bug(self) -> None:
        log.exception("unexpected error while proxying %s", self.owner.path)
        response = self.response
        response.listen(None)
        self.cycle.client_lost(None)
        response.close()
        self.owner._leave(self.endpoint, self.in_flight)
        self.owner._internal_error_now(self.cycle, self.exchange)


def _answer_headers(address: bytes, content_type: bytes, response: UpstreamResponse) -> Headers:
    headers = [(b"content-type", content_type), (b"x-argosy-endpoint", address)]
    encoding = response.raw_header(b"content-encoding")
    if encoding is not None:
        headers.append((b"content-encoding", encoding))
    return headers


async def _relay(
    send: Send, response: UpstreamResponse, watchdog: _SilenceWatchdog, loop: asyncio.AbstractEventLoop, first: bytes
) -> tuple[bool, bytes, bytes]:
    """The rest of a stream through ASGI ``send``: (ended cleanly, the last two chunks)."""
    previous, last = b"", first
    read_chunk = response.read_chunk
    # One message dict for every event: the server reads it before send() returns.
    event: Message = {"type": "http.response.body", "body": b"", "more_body": True}
    while True:
        chunk = await read_chunk()
        if not chunk:
            return True, previous, last
        previous, last = last, chunk
        watchdog.sending = True
        event["body"] = chunk
        await send(event)
        watchdog.sending = False
        watchdog.last_activity = loop.time()


async def _splice(
    send: Send,
    exchange: _Exchange,
    response: UpstreamResponse,
    watchdog: _SilenceWatchdog,
    loop: asyncio.AbstractEventLoop,
    first: bytes,
) -> tuple[bool, bytes, bytes]:
    """The rest of a stream spliced from the upstream connection to the client's transport."""
    splice = exchange.splice
    assert splice is not None
    sink = _Sink(exchange, response, watchdog, loop, first)
    transport = splice(sink)
    if transport is None:  # the server cannot splice this response: stay on ASGI
        return await _relay(send, response, watchdog, loop, first)
    try:
        sink.write = transport.write
        paused = watchdog.sending  # the client was already slow (splice told the sink)
        done = response.splice(sink.on_body)
        if paused:
            response.pause_reading()
        await done
    finally:
        splice(None)
    return True, sink.previous, sink.last


async def _retryable_answer(response: UpstreamResponse, address: bytes) -> tuple[int, Headers, bytes] | None:
    """A 502/503 answer kept to pass on if no retry is left; None if it cannot be read."""
    try:
        body = await response.read()
    except UpstreamError:
        return None
    headers = [
        (b"content-type", (response.header("content-type") or "application/json").encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        (b"x-argosy-endpoint", address),
    ]
    retry_after = response.header("retry-after")
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode("latin-1")))
    return response.status, headers, body


async def _send_answer(send: Send, exchange: _Exchange, status: int, headers: Headers, body: bytes) -> int:
    exchange.stop_watching()
    if (pending := _respond(send, exchange.answer, status, headers, body)) is not None:
        await pending
    return status


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
