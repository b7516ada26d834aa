"""Prometheus metrics of the operator (prefix argosy_operator_), on a registry of their own."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Reconciles are mostly cache reads (milliseconds); a pass that writes takes a few API
# round trips; anything past seconds is an API server in trouble.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclasses.dataclass(frozen=True)
class OperatorMetrics:
    registry: CollectorRegistry
    reconciles: Counter
    errors: Counter
    duration: Histogram
    child_writes: Counter
    queue_depth: Gauge
    managed: Gauge
    api_latency: Histogram
    leader: Gauge


def create_metrics(registry: CollectorRegistry | None = None) -> OperatorMetrics:
    registry = registry if registry is not None else CollectorRegistry()
    return OperatorMetrics(
        registry=registry,
        reconciles=Counter(
            "argosy_operator_reconciles", "Reconcile passes by outcome (success, gone, retry, wait, error).",
            ["result"], registry=registry,
        ),
        errors=Counter(
            "argosy_operator_reconcile_errors", "Reconcile passes that raised, by error type.",
            ["error"], registry=registry,
        ),
        duration=Histogram(
            "argosy_operator_reconcile_duration_seconds", "Wall time of one reconcile pass.",
            buckets=DURATION_BUCKETS, registry=registry,
        ),
        child_writes=Counter(
            "argosy_operator_child_writes",
            "Child objects written, by kind and why (missing, drifted, deleted).",
            ["kind", "reason"], registry=registry,
        ),
        queue_depth=Gauge(
            "argosy_operator_queue_depth", "LLMDeployments waiting for a reconcile.", registry=registry,
        ),
        managed=Gauge(
            "argosy_operator_llmdeployments", "LLMDeployments the operator currently watches.",
            registry=registry,
        ),
        api_latency=Histogram(
            "argosy_operator_api_request_duration_seconds",
            "Kubernetes API calls made by reconciles (not kopf's watches), by method.",
            ["method"], buckets=DURATION_BUCKETS, registry=registry,
        ),
        leader=Gauge(
            "argosy_operator_leader",
            "1 while this replica reconciles (it holds the Lease, or leader election is off), 0 on standby.",
            registry=registry,
        ),
    )
