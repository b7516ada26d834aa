"""The app factory: ``create_app(settings)`` builds one self-contained gateway."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from argosy_gateway.auth import parse_keys_file
from argosy_gateway.discovery.static import StaticDiscovery
from argosy_gateway.podscraper import run_pod_scraper
from argosy_gateway.proxy import ProxyEndpoint
from argosy_gateway.routes import install_routes
from argosy_gateway.runtime import GatewayRuntime
from argosy_gateway.settings import GatewaySettings, load_settings
from argosy_gateway.upstream import create_upstream

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings if settings is not None else load_settings()
    runtime = GatewayRuntime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.upstream = create_upstream(settings)
        tasks: list[asyncio.Task[None]] = []
        if settings.api_keys_file is not None:
            _load_keys(runtime, settings.api_keys_file)
            tasks.append(asyncio.create_task(_watch_keys(runtime, settings.api_keys_file), name="api-keys"))
        else:
            log.warning("no API keys configured: the gateway accepts every request (set api_keys_file)")
        tasks.append(asyncio.create_task(_run_discovery(runtime), name="discovery"))
        if settings.pod_metrics_seconds > 0:
            tasks.append(asyncio.create_task(run_pod_scraper(runtime), name="pod-metrics"))
        _quiet_garbage_collector()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await runtime.wake.close()
            await runtime.upstream.close()
            runtime.upstream = None
            await app.state.stored_responses.close()

    app = GatewayApp(
        title="Argosy gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # No OpenTelemetry: FastAPI's native hook would trace only the small JSON endpoints (the
        # proxy paths are dispatched before it) at a cost on every request. The gateway's own
        # Prometheus metrics cover the proxy paths, and traceparent/tracestate are forwarded so
        # vLLM's tracing joins the caller's trace (docs/gateway.md, "Telemetry").
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = runtime
    app.proxy_endpoints, app.state.stored_responses = install_routes(app, runtime)
    app.direct_routes = {path.encode("ascii"): endpoint for path, endpoint in app.proxy_endpoints.items()}
    return app


class GatewayApp(FastAPI):
    """FastAPI, with the proxy paths dispatched before the middleware stack and router.

    A POST to an OpenAI path goes straight to its raw ASGI endpoint (the same object the
    router would reach); everything else, including wrong methods on those paths, takes
    the normal FastAPI route. ``direct_routes`` offers the same endpoints to the gateway's
    own protocol (server.py), which then calls them without this dispatch at all.
    """

    proxy_endpoints: dict[str, ProxyEndpoint]
    direct_routes: dict[bytes, ProxyEndpoint]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.proxy_endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _quiet_garbage_collector() -> None:
    """Keep the collector from stalling the event loop mid-request (the tail at c=16).

    Everything alive after startup (imported modules, the app, settings) is frozen out of
    the collector's view, so a full collection no longer walks it; and young collections
    run less often, since a proxied request leaves few reference cycles behind.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(5000, middle, old)


def create_app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker process builds its own app)."""
    settings = load_settings()
    if not logging.getLogger().handlers:  # a fresh worker process: configure like the CLI
        configure_logging(settings.log_level)
    return create_app(settings)


def configure_logging(level: str) -> None:
    # The operator's logfmt-like layout, so one log pipeline parses both.
    logging.basicConfig(level=level.upper(), format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


async def _run_discovery(runtime: GatewayRuntime) -> None:
    settings = runtime.settings
    if settings.discovery == "kubernetes":
        from argosy_gateway.discovery.kubernetes import KubernetesDiscovery

        await KubernetesDiscovery(settings).run(runtime.publish)
        return
    if settings.static_config is None:
        log.error("static discovery needs static_config (ARGOSY_GATEWAY_STATIC_CONFIG); no models are served")
        return
    await StaticDiscovery(settings.static_config, settings.default_policy, settings.static_poll_seconds).run(
        runtime.publish
    )


def _load_keys(runtime: GatewayRuntime, path: Path) -> bool:
    try:
        runtime.keys = parse_keys_file(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if runtime.keys is None:
            # Fail closed: with a keys file configured but unreadable, nobody gets in.
            runtime.keys = parse_keys_file("keys: []")
        log.error("API keys file %s is invalid, keeping the previous keys: %s", path, exc)
        return False
    log.info("loaded %d API keys from %s", len(runtime.keys.by_hash), path)
    return True


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()  # follows symlinks, so a Secret volume's atomic swap is seen
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


async def _watch_keys(runtime: GatewayRuntime, path: Path) -> None:
    seen = _signature(path)
    while True:
        await asyncio.sleep(runtime.settings.api_keys_poll_seconds)
        signature = _signature(path)
        if signature is not None and signature != seen:
            seen = signature
            _load_keys(runtime, path)
