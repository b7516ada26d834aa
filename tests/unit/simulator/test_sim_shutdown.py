"""What the simulator does on SIGTERM, as vLLM 0.32 does it (vllm/entrypoints/launchers/launcher.py,
v1/engine/core.py): with --shutdown-timeout 0, its default, requests in flight are aborted; with N > 0
new requests are refused and those in flight get up to N seconds to finish."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from argosy_sandbox.cluster import free_port

SIM_BIN = Path(sys.executable).with_name("argosy-vllm-sim")


async def start(port: int, *extra: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        str(SIM_BIN), "--model", "m", "--port", str(port), "--itl-ms", "50", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError("the simulator did not start")


async def stream(http: aiohttp.ClientSession, port: int) -> bytes:
    body = {"model": "m", "prompt": "hi", "max_tokens": 30, "stream": True}  # 30 x 50 ms = 1.5 s
    try:
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
            return await response.read()
    except aiohttp.ClientError as error:
        return f"error: {error!r}".encode()


async def sigterm_during_streams(*extra: str, group: bool = False) -> tuple[list[bytes], float, bytes]:
    """Three streams in flight, SIGTERM, then one new request; (streams, seconds to exit, new request).
    With `group`, the simulator is the leader of a group of two and a headless member has joined it."""
    port = free_port()
    member = None
    if group:
        group_port = free_port()
        extra = (*extra, "--group-size", "2", "--group-port", str(group_port))
        member = await asyncio.create_subprocess_exec(
            str(SIM_BIN), "--model", "m", "--headless", "--leader", f"127.0.0.1:{group_port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        return await _sigterm_during_streams(port, await start(port, *extra))
    finally:
        if member is not None and member.returncode is None:
            member.kill()
            await member.wait()


async def _sigterm_during_streams(port: int, process: asyncio.subprocess.Process) -> tuple[list[bytes], float, bytes]:
    async with aiohttp.ClientSession() as http:
        streams = [asyncio.create_task(stream(http, port)) for _ in range(3)]
        await asyncio.sleep(0.4)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as fresh:  # a new connection, as a new client would open
            late = await stream(fresh, port)
        done = await asyncio.gather(*streams)
        await asyncio.wait_for(process.wait(), 20)
    return done, time.monotonic() - sent, late


@pytest.mark.timeout(60)
async def test_by_default_sigterm_aborts_what_is_in_flight() -> None:
    done, exit_seconds, _ = await sigterm_during_streams()
    assert not any(b"[DONE]" in body for body in done), done
    assert exit_seconds < 1.5  # before the streams could have ended on their own


@pytest.mark.timeout(60)
async def test_with_a_shutdown_timeout_sigterm_refuses_new_requests_and_finishes_the_others() -> None:
    done, exit_seconds, late = await sigterm_during_streams("--shutdown-timeout", "10")
    assert all(body.rstrip().endswith(b"data: [DONE]") for body in done), done
    assert late.startswith(b"error:"), late  # no longer listening
    assert exit_seconds < 5  # as soon as the last stream ended, not after the whole timeout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shutdown_timeout", ["0", "10"])
async def test_a_group_leader_stops_on_sigterm_as_a_single_server_does(shutdown_timeout: str) -> None:
    done, exit_seconds, late = await sigterm_during_streams("--shutdown-timeout", shutdown_timeout, group=True)
    if shutdown_timeout == "0":
        assert not any(b"[DONE]" in body for body in done), done
        assert exit_seconds < 1.5
    else:
        assert all(body.rstrip().endswith(b"data: [DONE]") for body in done), done
        assert late.startswith(b"error:"), late
        assert exit_seconds < 5
