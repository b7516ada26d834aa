from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from argosy_gateway.settings import GatewaySettings

from .harness import RunningGateway, Simulator

GatewayFactory = Callable[..., Any]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """uvloop, as under the CLI: the gateway must work on the loop it ships with."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, Simulator]]:
    """Three long-lived simulators: two serve model-a, one serves model-b and model-c."""
    started: dict[str, Simulator] = {}
    try:
        started["a1"] = Simulator(["model-a"])
        started["a2"] = Simulator(["model-a"])
        started["b"] = Simulator(["model-b", "model-c"])
        yield started
    finally:
        for sim in started.values():
            sim.kill()


@pytest.fixture
def spawn_sim() -> Iterator[Callable[..., Simulator]]:
    """Simulators owned by one test (for tests that kill them)."""
    started: list[Simulator] = []

    def spawn(models: list[str], **kwargs: Any) -> Simulator:
        sim = Simulator(models, **kwargs)
        started.append(sim)
        return sim

    yield spawn
    for sim in started:
        sim.kill()


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways with settings overrides; the routes file is ``tmp_path/routes.yaml``."""
    running: list[RunningGateway] = []

    async def start(wait_loaded: bool = True, **overrides: Any) -> RunningGateway:
        values: dict[str, Any] = {
            "static_config": tmp_path / "routes.yaml",
            "static_poll_seconds": 0.05,
            "eject_seconds": 5.0,
        }
        values.update(overrides)
        gateway = RunningGateway(GatewaySettings(**values))
        await gateway.start()
        running.append(gateway)
        if wait_loaded:
            await gateway.wait_loaded()
        return gateway

    yield start
    for gateway in running:
        await gateway.stop()
