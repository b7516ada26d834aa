"""The Grafana dashboard the chart ships: rendered with helm, every query checked against what
Argosy's metrics modules and vLLM really export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from argosy_gateway.metrics import GatewayMetrics
from argosy_gateway.routetable import EMPTY_TABLE
from argosy_gateway.settings import GatewaySettings
from argosy_gateway.wake import Waker
from argosy_operator.autoscaling_loop import AutoscalingLoop, LoopSettings
from argosy_operator.metrics import create_metrics
from argosy_operator.settings import OperatorSettings
from prometheus_client import CollectorRegistry

CHART = Path(__file__).resolve().parents[3] / "charts" / "argosy"

# vLLM's names and label names, from vllm/v1/metrics/loggers.py (PrometheusStatLogger) and the
# metrics page of vLLM's docs: family name -> (type, labels). Counters gain _total, histograms
# _bucket/_sum/_count on the wire, as with prometheus_client.
VLLM_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "vllm:num_requests_running": ("gauge", frozenset({"model_name", "engine"})),
    "vllm:num_requests_waiting": ("gauge", frozenset({"model_name", "engine"})),
    "vllm:kv_cache_usage_perc": ("gauge", frozenset({"model_name", "engine"})),
    "vllm:prompt_tokens": ("counter", frozenset({"model_name", "engine"})),
    "vllm:generation_tokens": ("counter", frozenset({"model_name", "engine"})),
    "vllm:request_success": ("counter", frozenset({"model_name", "engine", "finished_reason"})),
    "vllm:time_to_first_token_seconds": ("histogram", frozenset({"model_name", "engine"})),
    "vllm:e2e_request_latency_seconds": ("histogram", frozenset({"model_name", "engine"})),
    "vllm:request_queue_time_seconds": ("histogram", frozenset({"model_name", "engine"})),
}
# Labels Prometheus adds when it scrapes (the pod a series came from, the histogram bucket).
SCRAPE_LABELS = frozenset({"pod", "namespace", "instance", "job", "le"})
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}

METRIC = re.compile(r"\b(argosy_(?:gateway|operator)_[a-z0-9_]+|vllm:[a-z0-9_]+)")
SELECTOR = re.compile(r"(argosy_(?:gateway|operator)_[a-z0-9_]+|vllm:[a-z0-9_]+)\{([^}]*)\}")
BY = re.compile(r"\bby \(([^)]*)\)")


def _exported(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    """Sample name -> label names, for every metric family the registry collects."""
    names: dict[str, frozenset[str]] = {}
    for collector in list(registry._collector_to_names):
        declared = frozenset(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            seen = frozenset(label for sample in family.samples for label in sample.labels) - {"le"}
            for suffix in SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = declared | seen
    return names


def _exercise(gateway: GatewayMetrics) -> None:
    """One answered request, so collectors that only list labelled series show their labels."""
    gateway.request_done("m", 200, 0.1)
    gateway.first_byte("m", 0.05)
    gateway.usage("m", 3, 5)
    gateway.in_flight_by_endpoint[("m", "127.0.0.1:8000")] = 1  # as the proxy counts a request in flight
    gateway.table_published({"m": 1})


def exported_metrics() -> dict[str, frozenset[str]]:
    gateway = GatewayMetrics()
    _exercise(gateway)
    Waker(GatewaySettings(), gateway.registry, lambda: EMPTY_TABLE)
    operator = create_metrics()
    AutoscalingLoop(OperatorSettings(), LoopSettings(), operator.registry)
    names = {**_exported(gateway.registry), **_exported(operator.registry)}
    for family, (kind, labels) in VLLM_METRICS.items():
        for suffix in SUFFIXES[kind]:
            names[family + suffix] = labels
    return names


def dashboard(render: Any) -> dict[str, Any]:
    objects = render({"monitoring": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}}})
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"
                     and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert config_map["metadata"]["namespace"] == "argosy-system"
    (text,) = config_map["data"].values()
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", ())]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"${variable['name']}", variable["definition"]))
    return found


def test_every_query_names_metrics_argosy_or_vllm_export_with_their_labels(render) -> None:
    board = dashboard(render)
    exported = exported_metrics()
    checked = queries(board)
    assert len(checked) >= 20
    for title, expr in checked:
        names = METRIC.findall(expr)
        assert names, f"{title}: {expr} names no Argosy or vLLM metric"
        for name in names:
            assert name in exported, f"{title}: {name} is exported by neither Argosy nor vLLM"
        for name, selector in SELECTOR.findall(expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert label in exported[name] | SCRAPE_LABELS, f"{title}: {name} has no label {label}"
        for grouping in BY.findall(expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert any(label in exported[n] | SCRAPE_LABELS for n in names), f"{title}: no label {label}"


def test_the_dashboard_shows_what_an_operator_of_llm_traffic_looks_for(render) -> None:
    text = json.dumps(dashboard(render))
    for metric in (
        "argosy_gateway_requests_total",  # requests and errors by status
        "argosy_gateway_time_to_first_byte_seconds_bucket",  # TTFT
        "argosy_gateway_request_duration_seconds_bucket",  # latency
        "argosy_gateway_completion_tokens_total",  # tokens/s
        "argosy_operator_autoscaler_desired_replicas",  # desired vs ready
        "argosy_operator_autoscaler_ready_replicas",
        "argosy_gateway_requests_held",  # held requests
        "vllm:kv_cache_usage_perc",  # KV cache
        "vllm:num_requests_waiting",  # queue depth
        "argosy_operator_autoscaler_decisions_total",  # decisions
    ):
        assert metric in text, metric


def test_the_dashboard_is_off_by_default_and_its_settings_are_checked(render, run_helm) -> None:
    assert not [o for o in render() if o["kind"] == "ConfigMap"
                and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    elsewhere = render({"monitoring": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}})
    assert [o["metadata"]["namespace"] for o in elsewhere if o["kind"] == "ConfigMap"] == ["monitoring"]
    typo = run_helm("template", "argosy", str(CHART), "--set", "monitoring.grafanaDashboard.enable=true")
    assert typo.returncode != 0 and "enable" in typo.stderr
