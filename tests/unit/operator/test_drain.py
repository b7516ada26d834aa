"""The serving pods' drain: the preStop command waits for vLLM's in-flight requests (run for real
against the vLLM simulator, whose /metrics has vLLM's names)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
from argosy_operator import builders
from argosy_operator.builders import ServerInputs, drain_command
from argosy_vllm_sim.server import SimConfig, SimServer


async def run_hook(grace: int, port: int) -> float:
    """Run the preStop command as the kubelet would (its argv, our Python); seconds it took."""
    argv = drain_command(grace, port=port, start_seconds=0)
    assert argv[:2] == ["python3", "-c"]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(sys.executable, *argv[1:])
    assert await asyncio.wait_for(process.wait(), grace + 10) == 0
    return time.monotonic() - started


async def test_the_hook_returns_only_when_the_last_stream_finished() -> None:
    config = SimConfig(models=("m",), port=0, itl_ms=50)
    async with SimServer(config) as server, aiohttp.ClientSession() as http:
        body = {"model": "m", "prompt": "hi", "max_tokens": 40, "stream": True}  # 40 x 50 ms = 2 s

        async def stream() -> bytes:
            async with http.post(f"{server.url}/v1/completions", json=body) as response:
                return await response.read()

        streams = [asyncio.create_task(stream()) for _ in range(3)]
        await asyncio.sleep(0.3)
        hook = asyncio.create_task(run_hook(60, server.port))
        done = await asyncio.gather(*streams)
        finished_at = time.monotonic()
        took = await hook
        hook_done_at = time.monotonic()
    assert all(b"[DONE]" in chunk for chunk in done)
    assert took >= 1.5  # it waited for the streams...
    assert hook_done_at - finished_at < 2.5  # ...and returned soon after the last one ended


async def test_an_idle_server_drains_at_once_and_a_stuck_one_within_the_grace_period() -> None:
    config = SimConfig(models=("m",), port=0, itl_ms=1000)
    async with SimServer(config) as server, aiohttp.ClientSession() as http:
        assert await run_hook(60, server.port) < 2
        body = {"model": "m", "prompt": "hi", "max_tokens": 60}  # a minute: longer than the grace period
        request = asyncio.create_task(http.post(f"{server.url}/v1/completions", json=body))
        await asyncio.sleep(0.3)
        took = await run_hook(builders.DRAIN_EXIT_SECONDS + 3, server.port)
        request.cancel()
    # It gives up DRAIN_EXIT_SECONDS before the kubelet would kill the pod.
    assert 2.5 <= took < 5


def test_pods_get_the_grace_period_and_the_hook() -> None:
    inputs = ServerInputs(
        name="m", namespace="ns", owner_uid="u", model_uri="hf://o/m", served_model_names=("m",), replicas=1,
        image="vllm/vllm-openai:v0", tensor_parallel_size=1, pipeline_parallel_size=1, max_model_len=None,
        gpu_memory_utilization=0.9, termination_grace_period_seconds=900,
    )
    pod = builders.build_deployment(inputs)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == drain_command(900)
    assert "deadline = time.monotonic() + 895" in hook[2]


async def test_a_group_worker_waits_for_its_leaders_streams_and_the_leader_for_its_own() -> None:
    """The whole group is deleted at once: a worker that stopped first would fail the leader's
    requests. The group's real hook script runs under /bin/sh, with the leader's DNS name pointed
    at a simulator on 127.0.0.2 (no DNS here) and the 5 s start wait left out."""
    from argosy_operator import group_builders as gb

    server = ServerInputs(
        name="big", namespace="ns", owner_uid="u", model_uri="hf://o/m", served_model_names=("big",), replicas=1,
        image="vllm/vllm-openai:v0", tensor_parallel_size=8, pipeline_parallel_size=2, max_model_len=None,
        gpu_memory_utilization=0.9, pods_per_replica=2, termination_grace_period_seconds=60,
    )
    inputs = gb.GroupInputs(server=server, index=0, executor="mp", master_port=29500)
    [sts] = [o for o in gb.build_groups(server) if o["kind"] == "StatefulSet"]
    spec = sts["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 60
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    config = SimConfig(models=("big",), host="127.0.0.2", port=0, itl_ms=50)
    async with SimServer(config) as leader, aiohttp.ClientSession() as http:
        script = (command[2].replace(inputs.leader_address, "127.0.0.2").replace(f":{builders.SERVER_PORT}/",
                  f":{leader.port}/").replace(f"time.sleep({builders.DRAIN_START_SECONDS})", "time.sleep(0)"))

        async def hook(rank: int) -> float:
            """Runs the hook as the given rank; when it returned (monotonic)."""
            env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", gb.NODE_RANK_ENV: str(rank)}
            process = await asyncio.create_subprocess_exec("/bin/sh", "-c", script, env=env)
            assert await asyncio.wait_for(process.wait(), 60) == 0
            return time.monotonic()

        body = {"model": "big", "prompt": "hi", "max_tokens": 80, "stream": True}  # 4 s

        async def stream() -> float:
            async with http.post(f"{leader.url}/v1/completions", json=body) as response:
                assert b"[DONE]" in await response.read()
            return time.monotonic()

        streams = [asyncio.create_task(stream()) for _ in range(3)]
        await asyncio.sleep(0.3)
        # The leader's own vLLM (127.0.0.1:<port>) is not there: nothing to wait for. The worker
        # waits on the leader's, which is busy.
        leader_done, worker_done = await asyncio.gather(hook(0), hook(1))
        streams_done = max(await asyncio.gather(*streams))
    assert leader_done < streams_done
    assert worker_done >= streams_done - 0.1  # it returned only once the leader's streams had ended
