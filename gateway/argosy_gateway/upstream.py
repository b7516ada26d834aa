"""The pooled upstream HTTP client (one per app, opened and closed in the lifespan)."""

from __future__ import annotations

import aiohttp

from argosy_gateway.settings import GatewaySettings


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
