"""HTTP routes: the proxy paths (raw ASGI) and the small JSON/text endpoints."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from argosy_gateway import errors
from argosy_gateway.errors import GatewayError, error_body, model_not_found
from argosy_gateway.parsing import JSON_BODY, MULTIPART_BODY
from argosy_gateway.proxy import ProxyEndpoint
from argosy_gateway.responsestore import ResponseLocations
from argosy_gateway.routetable import ModelRoute, endpoint_address
from argosy_gateway.runtime import GatewayRuntime

# Every model-addressed path of vLLM's OpenAI server (vllm/entrypoints/openai/api_server.py
# and its routers), by body format. Each is routed by its ``model`` and passed through as is.
JSON_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",  # vLLM's Anthropic Messages API
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
)
MULTIPART_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
PROXY_PATHS = {**dict.fromkeys(JSON_PATHS, JSON_BODY), **dict.fromkeys(MULTIPART_PATHS, MULTIPART_BODY)}
RESPONSES_PATH = "/v1/responses"
_FORWARDED_LOOKUP_HEADERS = ("x-request-id", "traceparent", "tracestate", "accept")


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
        "argosy": {
            "ready": route.ready,
            "readyEndpoints": len(route.endpoints),
            "policy": route.policy,
            "scaledToZero": route.scaled_to_zero,
        },
    }


def models_payload(runtime: GatewayRuntime, allowed: frozenset[str] | None) -> dict[str, object]:
    data = [model_entry(route) for route in runtime.table.routes.values() if allowed is None or route.name in allowed]
    return {"object": "list", "data": data}


class StoredResponses:
    """``GET``/``DELETE /v1/responses/{id}`` and ``POST .../cancel``: sent to the replica that stored it.

    The lookup requests are rare, so they use their own small session (opened on first use,
    closed with the app) instead of the hot path's upstream client.
    """

    def __init__(self, runtime: GatewayRuntime, locations: ResponseLocations) -> None:
        self.runtime = runtime
        self.locations = locations
        self._session: httpx2.AsyncClient | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.aclose()
            self._session = None

    async def forward(self, request: Request, response_id: str, suffix: str) -> Response:
        runtime = self.runtime
        try:
            key = runtime.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
            stored = self.locations.get(response_id)
            if stored is None or (key is not None and not key.allows(stored.model)):
                raise GatewayError(
                    404,
                    f"No response with id '{response_id[:200]}' is known to this gateway: it keeps the "
                    "replica of the responses it proxied (bounded, in memory, per gateway process).",
                    param="response_id",
                    code="response_not_found",
                )
            if stored.endpoint not in (runtime.table.get(stored.model) or _NO_ROUTE).endpoints:
                raise GatewayError(
                    404,
                    f"The replica that stored response '{response_id[:200]}' no longer serves it.",
                    param="response_id",
                    code="response_not_found",
                )
        except GatewayError as error:
            return _error(error)
        if self._session is None:
            settings = runtime.settings
            # Bytes pass through as the replica sent them: no decompression, no Accept-Encoding added.
            self._session = httpx2.AsyncClient(
                timeout=httpx2.Timeout(settings.first_byte_timeout_seconds, connect=settings.connect_timeout_seconds),
                headers={"accept-encoding": "identity"},
            )
        headers = {name: request.headers[name] for name in _FORWARDED_LOOKUP_HEADERS if name in request.headers}
        if "content-type" in request.headers:
            headers["content-type"] = request.headers["content-type"]
        url = f"{stored.endpoint}{RESPONSES_PATH}/{response_id}{suffix}"
        if request.url.query:
            url += "?" + request.url.query
        try:
            upstream = await self._session.send(
                self._session.build_request(
                    request.method,
                    url,
                    content=await request.body(),
                    headers=dict(runtime.table.upstream_headers(stored.endpoint, headers)),
                ),
                stream=True,
            )
        except (httpx2.HTTPError, OSError) as exc:
            return _error(errors.upstream_failed(f"Cannot reach the replica that stored the response: {exc}."))
        if request.method == "DELETE" and upstream.status_code == 200:
            self.locations.forget(response_id)
        content_type = upstream.headers.get("content-type", "application/json")
        passed = {"x-argosy-endpoint": endpoint_address(stored.endpoint)}
        if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
            return StreamingResponse(_relay(upstream), upstream.status_code, passed, media_type=content_type)
        try:
            body = b"".join([chunk async for chunk in upstream.aiter_raw()])
        except (httpx2.HTTPError, OSError) as exc:
            return _error(errors.upstream_failed(f"The replica failed while answering: {exc}."))
        finally:
            await upstream.aclose()
        return Response(body, upstream.status_code, passed, media_type=content_type)


_NO_ROUTE = ModelRoute("", ())


async def _relay(upstream: httpx2.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except (httpx2.HTTPError, OSError):
        return
    finally:
        await upstream.aclose()


def install_routes(app: FastAPI, runtime: GatewayRuntime) -> tuple[dict[str, ProxyEndpoint], StoredResponses]:
    """Add every route; return the proxy endpoints by path (for the app's fast dispatch) and
    the stored-response lookups (closed with the app)."""
    locations = ResponseLocations(runtime.settings.max_remembered_responses)
    proxies = {path: ProxyEndpoint(runtime, kind, path) for path, kind in PROXY_PATHS.items()}
    proxies[RESPONSES_PATH].on_answer = lambda model, endpoint, first: locations.remember(model, endpoint, first)
    for path, endpoint in proxies.items():
        app.router.routes.append(Route(path, endpoint, methods=["POST"], include_in_schema=False))
    stored = StoredResponses(runtime, locations)

    @app.api_route(RESPONSES_PATH + "/{response_id}", methods=["GET", "DELETE"])
    async def stored_response(response_id: str, request: Request) -> Response:
        return await stored.forward(request, response_id, "")

    @app.post(RESPONSES_PATH + "/{response_id}/cancel")
    async def cancel_response(response_id: str, request: Request) -> Response:
        return await stored.forward(request, response_id, "/cancel")

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
        if exc.status_code == 404:
            return _error(errors.unknown_path(request.method, request.url.path))
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return Response(
            error_body(str(exc.detail), error_type, None, code),
            exc.status_code,
            headers=dict(exc.headers or {}),
            media_type="application/json",
        )

    return proxies, stored
