"""Helpers for tests that drive the simulator: read its /metrics and wait for a state."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp

_SAMPLE = re.compile(r"^(?P<name>[^{\s]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_ALWAYS_PRESENT = ("engine=", "model_name=")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{other="labels"}': value}; the engine and model_name labels are dropped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = [
            label for label in (match["labels"] or "").split(",") if label and not label.startswith(_ALWAYS_PRESENT)
        ]
        key = match["name"] + (f"{{{','.join(labels)}}}" if labels else "")
        samples[key] = float(match["value"])
    return samples


async def scrape_metrics(base_url: str) -> dict[str, float]:
    """GET {base_url}/metrics and parse it."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as response:
        response.raise_for_status()
        return parse_metrics(await response.text())


async def wait_for_metrics(
    base_url: str, condition: Callable[[dict[str, float]], bool], timeout_s: float = 5.0
) -> dict[str, float]:
    """Poll /metrics until `condition` holds; raise AssertionError with the last scrape if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        samples = await scrape_metrics(base_url)
        if condition(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"metrics never reached the expected state within {timeout_s} s: {samples}")
        await asyncio.sleep(0.01)
