"""Per-app state: the current route table, the pooled client, load and health.

One instance per app, created by ``create_app``; nothing lives at module level.
"""

from __future__ import annotations

import logging
import time

from argosy_gateway.auth import ApiKey, KeyStore, bearer_token
from argosy_gateway.errors import forbidden, rate_limited, unauthorized
from argosy_gateway.health import EndpointHealth
from argosy_gateway.metrics import GatewayMetrics
from argosy_gateway.podload import PodLoad
from argosy_gateway.policies import Policy, build_policies
from argosy_gateway.ratelimit import TokenBuckets
from argosy_gateway.routetable import EMPTY_TABLE, RouteTable
from argosy_gateway.settings import GatewaySettings
from argosy_gateway.upstream import Upstream
from argosy_gateway.wake import Waker

log = logging.getLogger(__name__)


class GatewayRuntime:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.table: RouteTable = EMPTY_TABLE
        self.loaded = False
        self._upstream: Upstream | None = None
        # Endpoint -> the load its pod reported beyond ours (podscraper.py), read by prefix affinity.
        self.pod_loads: dict[str, PodLoad] = {}
        self.policies: dict[str, Policy] = build_policies(settings.prefix_load_factor, self.pod_loads)
        self.health = EndpointHealth(settings.eject_after_failures, settings.eject_seconds)
        self.outstanding: dict[str, int] = {}
        self.metrics = GatewayMetrics()
        self.keys: KeyStore | None = None
        self.buckets = TokenBuckets()
        self.wake = Waker(settings, self.metrics.registry, lambda: self.table)

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("the gateway's upstream client is open only while the app runs")
        return self._upstream

    @upstream.setter
    def upstream(self, value: Upstream | None) -> None:
        self._upstream = value

    def publish(self, table: RouteTable) -> None:
        """Swap in a new route table (one assignment: requests see old or new, never a mix)."""
        self.table = table
        self.wake.table_published(table)
        if not self.loaded:
            log.info("discovery loaded: gateway is ready")
        self.loaded = True
        self.metrics.table_published({name: len(route.endpoints) for name, route in table.routes.items()})
        self.metrics.forget_endpoints(frozenset(e.split("://", 1)[-1] for e in table.endpoints()))

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The caller's key, or None when the gateway is open; raises 401."""
        keys = self.keys
        if keys is None:
            return None
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        key = keys.lookup(token)
        if key is None:
            raise unauthorized("Invalid API key.")
        return key

    def admit(self, key: ApiKey | None, model: str) -> None:
        """Check the key's model allow-list (403) and rate (429)."""
        if key is None:
            return
        if not key.allows(model):
            self.metrics.key_rejections.labels(key.name, "model_not_allowed").inc()
            raise forbidden(model)
        if key.requests_per_minute is not None:
            # By the key's hash, never its name: two keys never share (or reset) a bucket.
            wait = self.buckets.acquire(key.sha256, key.requests_per_minute, time.monotonic())
            if wait:
                self.metrics.key_rejections.labels(key.name, "rate_limited").inc()
                raise rate_limited(wait)
        self.metrics.key_admitted(key.name, model)
