"""OpenAI-shaped errors.

Every error the gateway produces has the body
``{"error": {"message", "type", "param", "code"}}`` and a status that tells the
client what to do next. The module is pure: no web framework imports.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    """An error answered to the client with an OpenAI-shaped body."""

    __slots__ = ("code", "error_type", "message", "param", "retry_after", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self, content_length: int | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    # ASCII escapes: a lone surrogate from a client's "\ud800" must not break the encoding.
    return json.dumps(payload).encode()


def sse_error_event(message: str, error_type: str = "upstream_error", code: str = "upstream_failed") -> bytes:
    """The last event of a stream whose upstream failed after bytes reached the client."""
    return b"data: " + error_body(message, error_type, None, code) + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def model_not_found(model: str, available: list[str]) -> GatewayError:
    if len(model) > 200:
        model = model[:200] + "..."
    listed = ", ".join(available[:50]) if available else "none"
    more = f" (and {len(available) - 50} more)" if len(available) > 50 else ""
    return GatewayError(
        404,
        f"The model '{model}' does not exist. Available models: {listed}{more}.",
        param="model",
        code="model_not_found",
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, error_type="authentication_error", code="invalid_api_key")


def forbidden(model: str) -> GatewayError:
    return GatewayError(
        403,
        f"This API key is not allowed to use the model '{model}'.",
        error_type="permission_error",
        param="model",
        code="model_not_allowed",
    )


def rate_limited(retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "Rate limit reached for this API key; retry after the time in the Retry-After header.",
        error_type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=retry_after,
    )


def no_ready_replica(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"The model '{model}' has no ready replica; retry later.",
        error_type="service_unavailable_error",
        param="model",
        code="no_ready_replica",
        retry_after=retry_after,
    )


def routes_not_loaded(retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "The gateway is starting and has not loaded its routes yet; retry shortly.",
        error_type="service_unavailable_error",
        code="routes_not_loaded",
        retry_after=retry_after,
    )


def unknown_path(method: str, path: str) -> GatewayError:
    if len(path) > 200:
        path = path[:200] + "..."
    return GatewayError(
        404, f"No such path: {method} {path}. See docs/gateway.md for the paths served.", code="not_found"
    )


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, error_type="upstream_error", code="upstream_failed")


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, error_type="upstream_error", code="upstream_timeout")
