"""HTTP routes: the proxy paths (raw ASGI) and the small JSON/text endpoints."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from argosy_gateway.errors import GatewayError, error_body, model_not_found
from argosy_gateway.parsing import CHAT, COMPLETIONS, EMBEDDINGS
from argosy_gateway.proxy import ProxyEndpoint
from argosy_gateway.routetable import ModelRoute
from argosy_gateway.runtime import GatewayRuntime

PROXY_PATHS = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
}


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload).encode(), status, headers=headers, media_type="application/json")


def _error(error: GatewayError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error.headers()}
    return Response(error.body(), error.status, headers=headers)


def model_entry(route: ModelRoute) -> dict[str, object]:
    return {
        "id": route.name,
        "object": "model",
        "created": 0,
        "owned_by": "argosy",
        "argosy": {"ready": route.ready, "readyEndpoints": len(route.endpoints), "policy": route.policy},
    }


def models_payload(runtime: GatewayRuntime, allowed: frozenset[str] | None) -> dict[str, object]:
    data = [model_entry(route) for route in runtime.table.routes.values() if allowed is None or route.name in allowed]
    return {"object": "list", "data": data}


def install_routes(app: FastAPI, runtime: GatewayRuntime) -> dict[str, ProxyEndpoint]:
    """Add every route; return the proxy endpoints by path (for the app's fast dispatch)."""
    proxies = {path: ProxyEndpoint(runtime, kind, path) for path, kind in PROXY_PATHS.items()}
    for path, endpoint in proxies.items():
        app.router.routes.append(Route(path, endpoint, methods=["POST"], include_in_schema=False))

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            key = runtime.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
        except GatewayError as error:
            return _error(error)
        return _json(models_payload(runtime, key.models if key is not None else None))

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        try:
            key = runtime.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
            route = runtime.table.get(model)
            if route is None or (key is not None and not key.allows(model)):
                allowed = [n for n in runtime.table.model_names() if key is None or key.allows(n)]
                raise model_not_found(model, allowed)
        except GatewayError as error:
            return _error(error)
        return _json(model_entry(route))

    @app.get("/healthz")
    async def healthz() -> Response:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def readyz() -> Response:
        if runtime.loaded:
            return PlainTextResponse("ready")
        return PlainTextResponse("discovery has not loaded yet", 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return Response(
            error_body(str(exc.detail), error_type, None, code),
            exc.status_code,
            headers=dict(exc.headers or {}),
            media_type="application/json",
        )

    return proxies
