"""Fixtures: simulators on free 127.0.0.1 ports, stopped when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from argosy_vllm_sim.server import SimConfig, SimServer

StartSim = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """`await start_sim(ttft_ms=..., ...)` starts a simulator serving "llama-8b" unless told otherwise."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> SimServer:
            settings: dict[str, Any] = {"models": ("llama-8b",), "host": "127.0.0.1", "port": 0}
            settings.update(overrides)
            return await stack.enter_async_context(SimServer(SimConfig(**settings)))

        yield start
