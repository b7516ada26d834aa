"""What model servers report of their own load, as routing reads it. Pure: no I/O.

A gateway process knows only the requests it sent itself (``GatewayRuntime.outstanding``).
A pod also serves the other gateway replicas (and worker processes), and whoever calls it
directly; vLLM's ``/metrics`` says how busy it really is. ``parse_vllm_metrics`` reads the
three gauges routing uses from that text, and ``pod_load`` turns them into what
``policies.PrefixAffinity`` uses: whether the pod is overloaded (requests queued, or its KV
cache full), and the load this process cannot see, which breaks ties.

Metric names are vLLM's (vllm/v1/metrics/loggers.py, v0.32): ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (0-1). A pod running several
engines (data parallel) reports one sample per engine: requests are summed, cache usage is
the largest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

RUNNING: Final = "vllm:num_requests_running"
WAITING: Final = "vllm:num_requests_waiting"
KV_CACHE_USAGE: Final = "vllm:kv_cache_usage_perc"
_WANTED: Final = (RUNNING, WAITING, KV_CACHE_USAGE)


@dataclass(frozen=True, slots=True)
class PodReport:
    """One scrape of a pod's own gauges."""

    running: float
    waiting: float
    kv_cache_usage: float


@dataclass(frozen=True, slots=True)
class PodLoad:
    """A pod's own view of its load, as of its last report."""

    hidden: int
    """Requests running or waiting on the pod that this process did not send (others' load)."""
    waiting: int
    """Requests queued on the pod: its batch (or KV cache) is full, a new request waits too."""
    kv_cache_usage: float
    """The pod's KV-cache usage, 0-1: near 1, new requests wait for cache space or preempt others."""

    def overloaded(self, kv_cache_full: float) -> bool:
        return self.waiting > 0 or self.kv_cache_usage >= kv_cache_full


def parse_vllm_metrics(text: str) -> PodReport | None:
    """The running/waiting/KV-cache gauges of a vLLM ``/metrics`` page; None if it has neither count.

    Only the lines of those three gauges are parsed (a vLLM page is mostly histograms), by
    prometheus_client's own text parser.
    """
    lines = [line for line in text.splitlines() if line.startswith(_WANTED)]
    values: dict[str, list[float]] = {name: [] for name in _WANTED}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name].append(float(sample.value))
    if not values[RUNNING] and not values[WAITING]:
        return None
    return PodReport(sum(values[RUNNING]), sum(values[WAITING]), max(values[KV_CACHE_USAGE], default=0.0))


def pod_load(report: PodReport, ours: int) -> PodLoad:
    """``report``, with the ``ours`` requests this process had in flight to the pod taken out of
    the hidden count (the larger of its counts before and after the read, so requests of ours
    that ended meanwhile are not mistaken for others')."""
    return PodLoad(
        max(0, round(report.running + report.waiting) - ours),
        max(0, round(report.waiting)),
        min(1.0, max(0.0, report.kv_cache_usage)),
    )
