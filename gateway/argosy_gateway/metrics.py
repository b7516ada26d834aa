"""Prometheus metrics in an app-local registry (each app, and each test, has its own).

Label values are bounded: ``model`` is a name from the route table (an unknown
model is counted as ``unknown``), ``endpoint`` is a discovered endpoint address.

The per-request series (requests, latency and first-byte histograms, tokens, requests
in flight) are plain integers and lists updated without locks on the event loop and
turned into metric families only when /metrics is scraped (``_HotPathCollector``):
prometheus_client's own Counter and Histogram take a lock and walk their buckets on
every update, which cost a tenth of the gateway's CPU per short request. The rare
series (errors, retries, ejections, API keys, route table) keep prometheus_client's
classes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from argosy_gateway.usage import extract_usage

PREFIX = "argosy_gateway"
UNKNOWN_MODEL = "unknown"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Histogram:
    """Bucket counts (the last one is +Inf) and the sum of one labelled histogram."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(repr, map(float, self.bounds)), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


class _HotPathCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Requests answered, by model and HTTP status.", labels=["model", "status"]
        )
        for (model, status), count in m.requests_by_status.items():
            requests.add_metric([model, str(status)], count)
        yield requests
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_requests_in_flight", "Requests being proxied now.", labels=["model", "endpoint"]
        )
        for (model, endpoint), count in m.in_flight_by_endpoint.items():
            in_flight.add_metric([model, endpoint], count)
        yield in_flight
        for name, help_text, series in (
            (f"{PREFIX}_request_duration_seconds", "Time from request start to the last byte sent.", m.latency),
            (
                f"{PREFIX}_time_to_first_byte_seconds",
                "Time from request start to the first response body byte sent.",
                m.ttfb,
            ),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["model"])
            for model, histogram in series.items():
                family.add_metric([model], histogram.cumulative(), histogram.total)
            yield family
        for name, help_text, totals in (
            (f"{PREFIX}_prompt_tokens", "Prompt tokens reported in responses' usage.", m.prompt_tokens),
            (f"{PREFIX}_completion_tokens", "Completion tokens reported in responses' usage.", m.completion_tokens),
        ):
            tokens = CounterMetricFamily(name, help_text, labels=["model"])
            for model, count in totals.items():
                tokens.add_metric([model], count)
            yield tokens


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The hot-path series, exported by _HotPathCollector.
        self.requests_by_status: dict[tuple[str, int], int] = {}
        self.in_flight_by_endpoint: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttfb: dict[str, _Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        r.register(_HotPathCollector(self))
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
        # Label children of the rare series, looked up once per label tuple.
        self._children: dict[tuple[str, ...], Counter] = {}

    def request_done(self, model: str, status: int, duration: float) -> None:
        key = (model, status)
        counts = self.requests_by_status
        counts[key] = counts.get(key, 0) + 1
        histogram = self.latency.get(model)
        if histogram is None:
            histogram = self.latency[model] = _Histogram(_LATENCY_BUCKETS)
        histogram.observe(duration)

    def first_byte(self, model: str, seconds: float) -> None:
        histogram = self.ttfb.get(model)
        if histogram is None:
            histogram = self.ttfb[model] = _Histogram(_TTFB_BUCKETS)
        histogram.observe(seconds)

    def answered(self, model: str, status: int, first_byte: float, body: bytes) -> None:
        """A whole (non-streamed) answer passed on: ``first_byte`` and the usage of a 200's body."""
        self.first_byte(model, first_byte)
        if status == 200:
            self.usage(model, *extract_usage(body[-2048:]))

    def key_admitted(self, key: str, model: str) -> None:
        child_key = ("k", key, model)
        child = self._children.get(child_key)
        if child is None:
            child = self._children[child_key] = self.key_requests.labels(key, model)
        child.inc()

    def usage(self, model: str, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        if prompt_tokens:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens
        if completion_tokens:
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + completion_tokens

    def table_published(self, ready_by_model: dict[str, int]) -> None:
        self.route_table_updates.inc()
        self.models.set(len(ready_by_model))
        self.ready_endpoints.clear()
        for model, count in ready_by_model.items():
            self.ready_endpoints.labels(model).set(count)

    def forget_endpoints(self, live: frozenset[str]) -> None:
        """Drop in-flight series of endpoints that left the table (bounded label sets)."""
        in_flight = self.in_flight_by_endpoint
        for key in [k for k, count in in_flight.items() if k[1] not in live and count == 0]:
            del in_flight[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)
