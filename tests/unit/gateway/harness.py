"""Test harness: vLLM simulators as subprocesses and an in-process gateway on a real socket."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from argosy_gateway.app import create_app
from argosy_gateway.runtime import GatewayRuntime
from argosy_gateway.server import HTTP_PROTOCOL
from argosy_gateway.settings import GatewaySettings
from argosy_sandbox.cluster import free_port

SIM_BIN = Path(sys.executable).with_name("argosy-vllm-sim")


class Simulator:
    """One ``argosy-vllm-sim`` process on 127.0.0.1 (killable, like a real pod)."""

    def __init__(
        self,
        models: Sequence[str],
        *,
        ttft_ms: float = 0,
        itl_ms: float = 0,
        max_num_seqs: int = 256,
        api_keys: Sequence[str] = (),
    ):
        self.models = tuple(models)
        self.port = free_port()
        args = [str(SIM_BIN), "--host", "127.0.0.1", "--port", str(self.port)]
        for model in self.models:
            args += ["--model", model]
        args += ["--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms), "--max-num-seqs", str(max_num_seqs)]
        if api_keys:  # as vLLM's --api-key: /v1/* answers 401 without one of them
            args += ["--api-key", *api_keys]
        # A file, not a pipe: nobody reads a pipe during the test, and a full one would block the simulator.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                self._stderr.seek(0)
                raise RuntimeError(f"simulator did not start: {self._stderr.read().decode(errors='replace')}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._stderr.close()

    def metric(self, name: str) -> float:
        """Sum of one metric's samples from the simulator's /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            text = response.read().decode()
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        return sum(float(value) for value in pattern.findall(text))

    async def ametric(self, name: str) -> float:
        return await asyncio.to_thread(self.metric, name)


def write_routes(path: Path, models: dict[str, Sequence[str]], policies: dict[str, str] | None = None) -> None:
    entries: list[dict[str, Any]] = []
    for name, endpoints in models.items():
        entry: dict[str, Any] = {"name": name, "endpoints": list(endpoints)}
        if policies and name in policies:
            entry["policy"] = policies[name]
        entries.append(entry)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump({"models": entries}))
    os.replace(temporary, path)


class RunningGateway:
    """``create_app(settings)`` served by uvicorn (the gateway's protocol) on a free 127.0.0.1 port."""

    def __init__(self, settings: GatewaySettings, http: str = HTTP_PROTOCOL) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            http=http,  # by default the protocol the CLI serves with
            lifespan="on",
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # as the CLI serves it (the proxy paths then take the direct route)
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> GatewayRuntime:
        runtime: GatewayRuntime = self.app.state.runtime
        return runtime

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            await asyncio.sleep(0.01)

    async def wait_loaded(self, within_seconds: float = 5.0) -> None:
        deadline = time.monotonic() + within_seconds
        while not self.runtime.loaded:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway discovery did not load")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)


class RecordingTap:
    """A pass-through in front of a model server that records what the backend received.

    Each request (method, path with query, headers, body bytes) is kept in ``received``, then
    forwarded as is; the answer streams back chunk by chunk. Works in front of the simulator
    and in front of real vLLM alike.
    """

    def __init__(self, target: str) -> None:
        from aiohttp import web

        self.target = target
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        self.port = free_port()
        self._session: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def bodies(self, path: str) -> list[bytes]:
        return [body for _, received_path, _, body in self.received if received_path.split("?")[0] == path]

    async def _forward(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        self.received.append((request.method, request.path_qs, dict(request.headers), body))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as upstream:
            answer = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Content-Encoding"):
                if name in upstream.headers:
                    answer.headers[name] = upstream.headers[name]
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer
