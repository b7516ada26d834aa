"""The simulator as a group member: the leader serves only once its members joined, a headless member
has no HTTP listener, and a lost member ends the leader (as vLLM's does)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Callable

from argosy_vllm_sim import group
from argosy_vllm_sim.server import SimConfig


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _health(host: str, port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1) as response:
            return int(response.status)
    except OSError:
        return 0


async def _until(predicate: Callable[[], bool], within: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_leader_serves_once_its_member_joined_and_exits_when_it_is_lost() -> None:
    leader_host, member_host = "127.0.0.1", "127.0.0.2"
    http, dist = _free_port(leader_host), _free_port(leader_host)
    config = SimConfig(models=("m",), host=leader_host, port=http)
    leader = asyncio.create_task(group.lead(config, group_size=2, group_port=dist))
    await asyncio.sleep(0.3)
    assert _health(leader_host, http) == 0  # not serving: the group is not complete
    member = asyncio.create_task(group.follow(f"{leader_host}:{dist}", member_host))
    assert await _until(lambda: _health(leader_host, http) == 200)
    assert not member.done()
    member.cancel()
    assert await asyncio.wait_for(leader, 10) == 1  # the member went away: the leader ends
    assert _health(leader_host, http) == 0


async def test_a_member_waits_for_its_leader_then_exits_when_the_leader_goes() -> None:
    host = "127.0.0.1"
    http, dist = _free_port(host), _free_port(host)
    member = asyncio.create_task(group.follow(f"{host}:{dist}", "127.0.0.3"))
    await asyncio.sleep(1.0)  # the leader is not up yet: the member keeps retrying
    assert not member.done()
    leader = asyncio.create_task(group.lead(SimConfig(models=("m",), host=host, port=http), 2, dist))
    assert await _until(lambda: _health(host, http) == 200)
    leader.cancel()
    assert await asyncio.wait_for(member, 10) == 1


async def test_a_member_that_never_reaches_its_leader_gives_up() -> None:
    dist = _free_port("127.0.0.1")
    assert await group.follow(f"127.0.0.1:{dist}", "127.0.0.1", give_up_after=0.5) == 1
