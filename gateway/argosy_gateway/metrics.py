"""Prometheus metrics in an app-local registry (each app, and each test, has its own).

Label values are bounded: ``model`` is a name from the route table (an unknown
model is counted as ``unknown``), ``endpoint`` is a discovered endpoint address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "argosy_gateway"
UNKNOWN_MODEL = "unknown"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being proxied now.", ["model", "endpoint"], registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request start to the last byte sent.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Time from request start to the first response body byte sent.",
            ["model"],
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Failed upstream attempts, by reason (connect, status, timeout, disconnect).",
            ["model", "endpoint", "reason"],
            registry=r,
        )
        self.retries = Counter(f"{PREFIX}_retries", "Requests retried on another endpoint.", ["model"], registry=r)
        self.ejections = Counter(
            f"{PREFIX}_endpoint_ejections",
            "Endpoints ejected after consecutive failures.",
            ["endpoint"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens reported in responses' usage.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Completion tokens reported in responses' usage.",
            ["model"],
            registry=r,
        )
        self.client_disconnects = Counter(
            f"{PREFIX}_client_disconnects",
            "Requests cancelled because the client went away.",
            ["model"],
            registry=r,
        )
        self.key_requests = Counter(
            f"{PREFIX}_api_key_requests",
            "Requests admitted per API key name (from the keys file) and model.",
            ["key", "model"],
            registry=r,
        )
        self.key_rejections = Counter(
            f"{PREFIX}_api_key_rejections",
            "Requests refused per API key name: model_not_allowed (403) or rate_limited (429).",
            ["key", "reason"],
            registry=r,
        )
        self.models = Gauge(f"{PREFIX}_models", "Models known to the route table.", registry=r)
        self.ready_endpoints = Gauge(f"{PREFIX}_ready_endpoints", "Ready endpoints per model.", ["model"], registry=r)
        self.route_table_updates = Counter(
            f"{PREFIX}_route_table_updates", "Route tables published by discovery.", registry=r
        )
        # Label children are looked up once per label tuple, not per request.
        self._children: dict[tuple[str, ...], object] = {}

    def request_done(self, model: str, status: int, duration: float) -> None:
        key: tuple[str, ...] = ("r", model, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(model, str(status))
        child.inc()  # type: ignore[attr-defined]
        key = ("l", model)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.latency.labels(model)
        child.observe(duration)  # type: ignore[attr-defined]

    def first_byte(self, model: str, seconds: float) -> None:
        key: tuple[str, ...] = ("t", model)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.ttfb.labels(model)
        child.observe(seconds)  # type: ignore[attr-defined]

    def in_flight_child(self, model: str, endpoint: str) -> Gauge:
        key: tuple[str, ...] = ("f", model, endpoint)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.in_flight.labels(model, endpoint)
        return child  # type: ignore[return-value]

    def key_admitted(self, key: str, model: str) -> None:
        child_key: tuple[str, ...] = ("k", key, model)
        child = self._children.get(child_key)
        if child is None:
            child = self._children[child_key] = self.key_requests.labels(key, model)
        child.inc()  # type: ignore[attr-defined]

    def usage(self, model: str, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        if prompt_tokens:
            key: tuple[str, ...] = ("p", model)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.prompt_tokens.labels(model)
            child.inc(prompt_tokens)  # type: ignore[attr-defined]
        if completion_tokens:
            key = ("c", model)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.completion_tokens.labels(model)
            child.inc(completion_tokens)  # type: ignore[attr-defined]

    def table_published(self, ready_by_model: dict[str, int]) -> None:
        self.route_table_updates.inc()
        self.models.set(len(ready_by_model))
        self.ready_endpoints.clear()
        for model, count in ready_by_model.items():
            self.ready_endpoints.labels(model).set(count)

    def forget_endpoints(self, live: frozenset[str]) -> None:
        """Drop in-flight series of endpoints that left the table (bounded label sets)."""
        for key in [k for k in self._children if k[0] == "f" and k[2] not in live]:
            child = self._children[key]
            if child._value.get() == 0:  # type: ignore[attr-defined]
                del self._children[key]
                self.in_flight.remove(key[1], key[2])

    def render(self) -> bytes:
        return generate_latest(self.registry)
