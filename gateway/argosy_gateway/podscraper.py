"""Reads the model servers' own load from their ``/metrics``, for prefix affinity (the I/O half).

Every ``pod_metrics_seconds`` the endpoints of the models routed by prefix affinity are read
concurrently, each within that interval; ``podload`` parses the page and ``runtime.pod_loads``
gets the result. An endpoint that does not answer, or whose page has no vLLM gauges, is left
out, so the policy falls back to this process's own counts for it. Other policies do not read
pods' metrics and their endpoints are not scraped.
"""

from __future__ import annotations

import asyncio
import logging

import httpx2

from argosy_gateway.podload import parse_vllm_metrics, pod_load
from argosy_gateway.routetable import PREFIX_AFFINITY
from argosy_gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)


def scraped_endpoints(runtime: GatewayRuntime) -> set[str]:
    return {e for route in runtime.table.routes.values() if route.policy == PREFIX_AFFINITY for e in route.endpoints}


async def _scrape(client: httpx2.AsyncClient, runtime: GatewayRuntime, endpoint: str) -> None:
    before = runtime.outstanding.get(endpoint, 0)
    try:
        response = await client.get(endpoint.rstrip("/") + "/metrics")
        report = parse_vllm_metrics(response.text) if response.status_code == 200 else None
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        log.debug("cannot read the load of %s: %s", endpoint, exc)
        report = None
    if report is None:
        runtime.pod_loads.pop(endpoint, None)
    else:
        runtime.pod_loads[endpoint] = pod_load(report, max(before, runtime.outstanding.get(endpoint, 0)))


async def run_pod_scraper(runtime: GatewayRuntime) -> None:
    interval = runtime.settings.pod_metrics_seconds
    timeout = httpx2.Timeout(interval, connect=min(interval, runtime.settings.connect_timeout_seconds))
    async with httpx2.AsyncClient(timeout=timeout) as client:
        while True:
            endpoints = scraped_endpoints(runtime)
            for gone in [e for e in runtime.pod_loads if e not in endpoints]:
                del runtime.pod_loads[gone]
            await asyncio.gather(*(_scrape(client, runtime, e) for e in endpoints))
            await asyncio.sleep(interval)
