"""The simulator as one member of a replica that spans nodes (vLLM's `--nnodes` groups).

vLLM's ranks meet at the leader's torch.distributed store (`--master-addr:--master-port`):
the leader serves the OpenAI API only once every member has joined, a headless member has
no HTTP listener at all, and the group does not survive a lost member. The simulator does
the same with plain TCP connections:

- leader (`--group-size N --group-port P`): listens on host:P, starts serving HTTP when
  N-1 members are connected, and exits with code 1 when one of them goes away; on SIGTERM
  it stops as a single server does (`--shutdown-timeout`: 0 aborts what is in flight);
- headless member (`--headless --leader HOST:P`): connects from its own address (retrying
  while the leader is not up yet), holds the connection, and exits with code 1 when the
  leader closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from argosy_vllm_sim.server import SimConfig, SimServer

JOIN_TIMEOUT_SECONDS = 600.0
RETRY_SECONDS = 0.5


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    return stop


def _say(message: str) -> None:
    print(f"argosy-vllm-sim: {message}", flush=True)


async def lead(config: SimConfig, group_size: int, group_port: int) -> int:
    """Serve as a group's leader; 0 on SIGTERM, 1 when a member is lost."""
    stop = _stop_event()
    members: set[asyncio.StreamWriter] = set()
    complete, lost = asyncio.Event(), asyncio.Event()

    async def member(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        members.add(writer)
        _say(f"member {writer.get_extra_info('peername')} joined ({len(members)} of {group_size - 1})")
        if len(members) >= group_size - 1:
            complete.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        members.discard(writer)
        _say(f"member {writer.get_extra_info('peername')} left")
        lost.set()

    listener = await asyncio.start_server(member, config.host, group_port)
    _say(f"leader of a group of {group_size}: waiting for members on {config.host}:{group_port}")
    waits = [asyncio.create_task(e.wait()) for e in (complete, stop, lost)]
    try:
        async with listener:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if complete.is_set() and not lost.is_set() and not stop.is_set():
                # SIGTERM ends the group's serving as it ends a single server's: --shutdown-timeout.
                async with SimServer(config, shutdown_timeout=config.shutdown_timeout) as server:
                    _say(f"group complete; serving {', '.join(config.models)} on {server.url}")
                    await asyncio.wait(waits[1:], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        for writer in list(members):
            writer.close()
    if lost.is_set() and not stop.is_set():
        _say("a member of the group was lost; exiting (vLLM cannot take a lost rank back)")
        return 1
    return 0


async def follow(leader: str, host: str, give_up_after: float = JOIN_TIMEOUT_SECONDS) -> int:
    """Serve as a headless member: join the leader and stay until it goes away."""
    stop = _stop_event()
    address, _, port = leader.rpartition(":")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while True:
        try:
            reader, writer = await asyncio.open_connection(address, int(port), local_addr=(host, 0))
            break
        except OSError as error:
            if stop.is_set():
                return 0
            if loop.time() > deadline:
                _say(f"could not join the leader {leader} in {give_up_after:.0f} s: {error}")
                return 1
            await asyncio.sleep(RETRY_SECONDS)
    _say(f"headless member on {host}: joined the leader {leader}")
    closed = asyncio.create_task(reader.read())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        writer.close()
        closed.cancel()
        stopped.cancel()
    if stop.is_set():
        return 0
    _say(f"the leader {leader} closed the connection; exiting")
    return 1

