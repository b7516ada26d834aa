"""The pooled upstream HTTP client (one per app, opened and closed in the lifespan).

The proxy talks to model servers through one small interface, ``Upstream``, implemented
with aiohttp's pooled ``ClientSession`` (keep-alive, connection limits per endpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp
from yarl import URL

from argosy_gateway.settings import GatewaySettings


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

    def header(self, name: str) -> str | None:
        """A response header by lower-case name."""

    async def read(self) -> bytes:
        """The whole body."""

    async def read_chunk(self) -> bytes:
        """Whatever body bytes are available (waiting for some); b"" at the end."""

    def fail(self, exc: BaseException) -> None:
        """Make the pending (or next) read raise ``exc``."""

    def release(self) -> None:
        """The body was read to the end: the connection may be reused."""

    def close(self) -> None:
        """Drop the connection (the server sees the client go away)."""


class Upstream(Protocol):
    async def post(self, endpoint: str, path: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """POST ``body`` to ``endpoint + path``; returns once the response headers arrived."""

    async def close(self) -> None: ...


def create_upstream(settings: GatewaySettings) -> Upstream:
    return AiohttpUpstream(settings)


def create_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections,
        limit_per_host=settings.max_connections_per_endpoint,
        keepalive_timeout=settings.keepalive_seconds,
        ttl_dns_cache=60,
    )
    # Only the connect timeout lives here; first-byte and between-chunk deadlines are
    # enforced per request by the proxy, because a non-streamed completion sends its
    # headers only after the whole generation.
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=settings.connect_timeout_seconds)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,  # bytes pass through exactly as the upstream sent them
        # No Accept-Encoding: the model server answers uncompressed, which the client can read.
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


class AiohttpUpstream:
    def __init__(self, settings: GatewaySettings) -> None:
        self.session = create_session(settings)
        self._urls: dict[tuple[str, str], URL] = {}

    async def post(self, endpoint: str, path: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        url = self._urls.get((endpoint, path))
        if url is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            url = self._urls[(endpoint, path)] = URL(endpoint + path)
        try:
            response = await self.session.post(url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamConnectError(str(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBrokenError(type(exc).__name__) from None
        return _AiohttpResponse(response)

    async def close(self) -> None:
        await self.session.close()


class _AiohttpResponse:
    __slots__ = ("_response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBrokenError(type(exc).__name__) from None

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBrokenError(type(exc).__name__) from None

    def fail(self, exc: BaseException) -> None:
        self._response.content.set_exception(exc)

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()
