"""The simulator's HTTP server: vLLM's OpenAI-compatible endpoints on aiohttp.

`build_app(config)` returns the aiohttp application; `SimServer` runs it on a socket (with handler
cancellation on, so a client that disconnects stops its request at once). Embedders that use
their own `web.AppRunner` should pass `handler_cancellation=True` for the same behaviour
(aiohttp's test server already does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from argosy_vllm_sim.engine import TTFT_BUCKETS_S, Engine, PrefixCache, chained_block_hashes
from argosy_vllm_sim.extra import ExtraEndpoints
from argosy_vllm_sim.protocol import (
    CHARS_PER_TOKEN,
    DEFAULT_EMBEDDING_DIM,
    DONE_EVENT,
    EVENT_PREFIX,
    ParsedRequest,
    Renderer,
    RequestError,
    RequestKind,
    error_body,
    parse_request,
    system_fingerprint,
)

ADDRESS_HEADER = "x-sim-address"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class SimConfig:
    """How the simulated vLLM server behaves. Times are in milliseconds; zero means no delay."""

    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    ttft_ms: float = 0.0  # fixed time to first token once a request runs
    itl_ms: float = 0.0  # interval between output tokens
    max_num_seqs: int = 256  # batch limit; further requests wait
    prefix_caching: bool = True
    prefill_ms_per_token: float = 0.0  # extra time to first token per prompt token not in the prefix cache
    serial_prefill: bool = False  # prefills share one compute lane: under load they queue behind each other
    max_model_len: int = 8192
    block_size: int = 16  # tokens per KV block (the prefix cache's unit)
    kv_cache_tokens: int = 262_144  # KV cache capacity; bounds running tokens and the prefix cache
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    # vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens (else null).
    prompt_tokens_details: bool = False
    # vLLM's --shutdown-timeout: on SIGTERM, 0 (vLLM's default) aborts the requests in flight; N > 0
    # stops taking new ones and gives those in flight up to N seconds to finish.
    shutdown_timeout: float = 0.0
    # vLLM's --api-key (several allowed) or, without it, $VLLM_API_KEY: callers of /v1/* need one.
    api_keys: tuple[str, ...] = ()
    model_created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "api_keys", tuple(k for k in self.api_keys if k))
        if not self.models:
            raise ValueError("the simulator needs at least one model name")
        if min(self.ttft_ms, self.itl_ms, self.prefill_ms_per_token, self.shutdown_timeout) < 0:
            raise ValueError("delays cannot be negative")
        if self.max_num_seqs < 1 or self.block_size < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs, block_size and max_model_len must be positive")
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError("kv_cache_tokens must hold at least one max_model_len sequence")


@dataclass
class _Progress:
    tokens: int = 0


class _Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.models = frozenset(config.models)
        total_blocks = config.kv_cache_tokens // config.block_size
        self.engine = Engine(
            max_num_seqs=config.max_num_seqs,
            total_kv_blocks=total_blocks,
            prefix_cache=PrefixCache(total_blocks) if config.prefix_caching else None,
        )
        self.block_chars = config.block_size * CHARS_PER_TOKEN
        self.ttft_s = config.ttft_ms / 1000
        self.itl_s = config.itl_ms / 1000
        self.prefill_s_per_token = config.prefill_ms_per_token / 1000
        self.static_address = (
            None if config.host in _WILDCARD_HOSTS or config.port == 0 else _format_address(config.host, config.port)
        )
        self._renderers: dict[str, Renderer] = {}
        self._fingerprint = system_fingerprint(config.models)
        self._headers: dict[str, dict[str, str]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(8).hex()
        self._models_body = self._render_models()

    # -- helpers ----------------------------------------------------------------------------------

    def _address(self, request: web.BaseRequest) -> str:
        if self.static_address is not None:
            return self.static_address
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            return _format_address(self.config.host, self.config.port)
        return _format_address(sockname[0], sockname[1])

    def _renderer(self, address: str) -> Renderer:
        renderer = self._renderers.get(address)
        if renderer is None:
            renderer = self._renderers[address] = Renderer(
                address, self._fingerprint, self.config.prompt_tokens_details
            )
        return renderer

    def _response_headers(self, address: str, content_type: str) -> dict[str, str]:
        key = address + content_type
        headers = self._headers.get(key)
        if headers is None:
            headers = self._headers[key] = {"Content-Type": content_type, ADDRESS_HEADER: address}
        return dict(headers)

    def _error(self, request: web.BaseRequest, err: RequestError) -> web.Response:
        return web.Response(
            status=err.status,
            body=error_body(err.status, err.message, err.err_type, err.param),
            headers=self._response_headers(self._address(request), "application/json"),
        )

    def _request_id(self, kind: RequestKind) -> str:
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-"}[kind]
        return f"{prefix}{self._id_prefix}{next(self._ids):016x}"

    def _check_model(self, model: str) -> None:
        if model not in self.models:
            raise RequestError(
                404,
                f"The model `{model}` does not exist. Valid aliases: {', '.join(self.config.models)}.",
                "NotFoundError",
                "model",
            )

    # -- endpoints --------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self, request: web.Request, kind: RequestKind) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        raw = await request.read()
        try:
            parsed = parse_request(kind, raw, self.config.max_model_len)
            self._check_model(parsed.model)
        except RequestError as err:
            return self._error(request, err)

        address = self._address(request)
        renderer = self._renderer(address)
        completion_tokens = renderer.completion_tokens(parsed)
        block_size = self.config.block_size
        kv_blocks = -(-(parsed.prompt_tokens + completion_tokens) // block_size)
        engine = self.engine
        stats = engine.stats
        sent_tokens = 0
        finish_reason = "abort"
        try:
            await engine.admit(kv_blocks)
        except asyncio.CancelledError:
            stats.success_by_reason["abort"] += 1
            raise
        try:
            hashes = (
                chained_block_hashes(parsed.prompt_text, self.block_chars) if engine.prefix_cache is not None else []
            )
            cached = engine.cached_prefix_tokens(hashes, parsed.prompt_tokens, block_size)
            stats.prompt_tokens += parsed.prompt_tokens
            prefill_work_s = self.prefill_s_per_token * (parsed.prompt_tokens - cached)
            if self.config.serial_prefill and prefill_work_s > 0:
                prefill_work_s = engine.queue_prefill(prefill_work_s, loop.time())
            prefill_s = self.ttft_s + prefill_work_s
            request_id = self._request_id(kind)
            created = int(time.time())
            if parsed.stream:
                response = web.StreamResponse(
                    headers=self._response_headers(address, "text/event-stream; charset=utf-8")
                )
                await response.prepare(request)
                progress = _Progress()
                try:
                    await self._write_stream(
                        response, renderer, parsed, request_id, created, cached, prefill_s, arrival, progress
                    )
                finally:
                    sent_tokens = progress.tokens
                await response.write_eof()
            else:
                delay = prefill_s + self.itl_s * (completion_tokens - 1)
                if delay > 0:
                    await asyncio.sleep(delay)
                stats.observe_ttft(loop.time() - arrival - self.itl_s * (completion_tokens - 1))
                response = web.Response(
                    body=renderer.plain_body(parsed, request_id, created, cached),
                    headers=self._response_headers(address, "application/json"),
                )
                sent_tokens = completion_tokens
            finish_reason = "stop" if parsed.max_tokens is None else "length"
            return response
        finally:
            engine.release(kv_blocks)
            stats.generation_tokens += sent_tokens
            stats.success_by_reason[finish_reason] += 1

    async def _write_stream(
        self,
        response: web.StreamResponse,
        renderer: Renderer,
        parsed: ParsedRequest,
        request_id: str,
        created: int,
        cached: int,
        prefill_s: float,
        arrival: float,
        progress: _Progress,
    ) -> None:
        """Write the SSE stream, counting the output tokens sent in `progress`."""
        loop = asyncio.get_running_loop()
        template = renderer.stream_template(parsed)
        stamp = Renderer.stream_stamp(parsed.kind, request_id, created)
        ending = (
            renderer.usage_event(template, stamp, parsed.prompt_tokens, cached) + DONE_EVENT
            if parsed.include_usage
            else DONE_EVENT
        )
        if prefill_s > 0:
            await asyncio.sleep(prefill_s)
        self.engine.stats.observe_ttft(loop.time() - arrival)
        if self.itl_s == 0:
            # As fast as possible: the whole stream in one write.
            await response.write(stamp.join(template.joined_parts) + ending)
            progress.tokens = template.completion_tokens
            return
        head = EVENT_PREFIX + stamp
        tails = template.tails
        # Chat streams open with a role-only event, sent together with the first token.
        first = 2 if parsed.kind == "chat" else 1
        await response.write(b"".join(head + tail for tail in tails[:first]))
        sent = progress.tokens = 1
        start = loop.time()
        for index in range(first, len(tails)):
            delay = start + self.itl_s * sent - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = head + tails[index]
            if index == len(tails) - 1:
                chunk += ending
            await response.write(chunk)
            sent = progress.tokens = sent + 1
        if len(tails) == first:
            await response.write(ending)

    async def embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            parsed = parse_request("embedding", raw, self.config.max_model_len)
            self._check_model(parsed.model)
        except RequestError as err:
            return self._error(request, err)
        engine = self.engine
        kv_blocks = -(-parsed.prompt_tokens // self.config.block_size)
        await engine.admit(kv_blocks)
        try:
            engine.stats.prompt_tokens += parsed.prompt_tokens
            delay = self.ttft_s + self.prefill_s_per_token * parsed.prompt_tokens
            if delay > 0:
                await asyncio.sleep(delay)
            engine.stats.success_by_reason["stop"] += 1
            body = Renderer.embedding_body(
                parsed, self._request_id("embedding"), int(time.time()), self.config.embedding_dim
            )
        finally:
            engine.release(kv_blocks)
        return web.Response(body=body, headers=self._response_headers(self._address(request), "application/json"))

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._models_body, headers=self._response_headers(self._address(request), "application/json")
        )

    def _render_models(self) -> bytes:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": self.config.model_created,
                "owned_by": "vllm",
                "root": self.config.models[0],
                "parent": None,
                "max_model_len": self.config.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{self._id_prefix}{index:016x}",
                        "object": "model_permission",
                        "created": self.config.model_created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for index, name in enumerate(self.config.models)
        ]
        return json.dumps({"object": "list", "data": cards}, separators=(",", ":")).encode()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers={ADDRESS_HEADER: self._address(request)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.render_metrics(),
            content_type="text/plain",
            charset="utf-8",
            headers={ADDRESS_HEADER: self._address(request)},
        )

    def render_metrics(self) -> str:
        engine = self.engine
        stats = engine.stats
        labels = f'engine="0",model_name="{_label_value(self.config.models[0])}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for suffix, extra, value in samples:
                lines.append(f"{name}{suffix}{{{labels}{extra}}} {float(value)!r}")

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [("", "", engine.running)],
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [("", "", engine.waiting)],
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [("", "", engine.kv_cache_usage)],
        )
        metric(
            "vllm:prefix_cache_queries",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            [("_total", "", stats.prefix_cache_queries)],
        )
        metric(
            "vllm:prefix_cache_hits",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            [("_total", "", stats.prefix_cache_hits)],
        )
        metric(
            "vllm:prompt_tokens",
            "counter",
            "Number of prefill tokens processed.",
            [("_total", "", stats.prompt_tokens)],
        )
        metric(
            "vllm:generation_tokens",
            "counter",
            "Number of generation tokens processed.",
            [("_total", "", stats.generation_tokens)],
        )
        metric(
            "vllm:request_success",
            "counter",
            "Count of successfully processed requests.",
            [
                ("_total", f',finished_reason="{reason}"', count)
                for reason, count in sorted(stats.success_by_reason.items())
            ],
        )
        buckets: list[tuple[str, str, float]] = []
        cumulative = 0
        for bound, count in zip(TTFT_BUCKETS_S, stats.ttft_bucket_counts, strict=True):
            cumulative += count
            buckets.append(("_bucket", f',le="{bound!r}"', cumulative))
        buckets.append(("_bucket", ',le="+Inf"', stats.ttft_count))
        buckets.append(("_count", "", stats.ttft_count))
        buckets.append(("_sum", "", stats.ttft_sum_s))
        metric(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token in seconds.",
            buckets,
        )
        return "\n".join(lines) + "\n"


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


SIMULATOR_KEY: web.AppKey[_Simulator] = web.AppKey("argosy_vllm_sim", _Simulator)

# What vLLM 0.32's AuthenticationMiddleware guards (vllm/entrypoints/serve/middleware/authenticate.py):
# these path prefixes, every method but OPTIONS; /health, /metrics, /tokenize and the rest stay open.
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


def _key_guard(api_keys: tuple[str, ...]) -> Any:
    digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIXES):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            matched = False
            for digest in digests:
                matched |= hmac.compare_digest(given, digest)
            if scheme.lower() != "bearer" or not matched:
                return web.json_response({"error": "Unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    return guard


def build_app(config: SimConfig) -> web.Application:
    """The simulator as an aiohttp application (one engine serving every name in config.models)."""
    simulator = _Simulator(config)
    app = web.Application(
        client_max_size=64 * 1024 * 1024, middlewares=[_key_guard(config.api_keys)] if config.api_keys else []
    )
    app[SIMULATOR_KEY] = simulator
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_post("/v1/completions", simulator.completions)
    app.router.add_post("/v1/embeddings", simulator.embeddings)
    app.router.add_get("/v1/models", simulator.list_models)
    app.router.add_get("/health", simulator.health)
    app.router.add_get("/metrics", simulator.metrics)
    extra = ExtraEndpoints(
        simulator.models,
        config.max_model_len,
        simulator._address,
        lambda: simulator.engine.admit(1),
        lambda: simulator.engine.release(1),
    )
    for method, path, handler in extra.routes():
        app.router.add_route(method, path, handler)
    return app


class SimServer:
    """Runs the simulator on config.host:config.port (port 0 picks a free port) until stopped.

    Usable as `async with SimServer(config) as server: ... server.url ...`. Stopping waits up to
    `shutdown_timeout` seconds for requests in flight; the default, 0, cuts them off at once, the
    way a crashed or killed server would.
    """

    def __init__(self, config: SimConfig, shutdown_timeout: float = 0.0) -> None:
        self.config = config
        self.shutdown_timeout = shutdown_timeout
        self.app = build_app(config)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{_format_address(self.config.host, self.port)}"

    async def start(self) -> None:
        # aiohttp reads a timeout of 0 as "wait forever"; a hundredth of a second is "at once".
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=max(self.shutdown_timeout, 0.01)
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=4096)
        await site.start()
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_forever(config: SimConfig, ready_message: bool = True) -> None:
    """Serve until SIGINT or SIGTERM, then shut down as vLLM does: stop listening and abort what is in
    flight, or with `config.shutdown_timeout` > 0 give it that long to finish."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with SimServer(config, shutdown_timeout=config.shutdown_timeout) as server:
        if ready_message:
            print(f"argosy-vllm-sim serving {', '.join(config.models)} on {server.url}", flush=True)
        await stop.wait()
