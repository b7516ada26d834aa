"""The engine's admission order, KV budget and bounded prefix cache (pure asyncio, no HTTP)."""

from __future__ import annotations

import asyncio

import pytest
from argosy_vllm_sim.engine import Engine, PrefixCache, chained_block_hashes


async def test_waiting_requests_run_in_arrival_order() -> None:
    engine = Engine(max_num_seqs=1, total_kv_blocks=100, prefix_cache=None)
    order: list[int] = []
    await engine.admit(1)

    async def request(number: int) -> None:
        await engine.admit(1)
        order.append(number)
        engine.release(1)

    tasks = [asyncio.create_task(request(n)) for n in range(4)]
    await asyncio.sleep(0)
    assert engine.waiting == 4
    engine.release(1)
    await asyncio.gather(*tasks)

    assert order == [0, 1, 2, 3]
    assert (engine.running, engine.waiting, engine.used_kv_blocks) == (0, 0, 0)


async def test_a_request_waits_for_kv_blocks_even_with_free_slots() -> None:
    engine = Engine(max_num_seqs=8, total_kv_blocks=10, prefix_cache=None)
    await engine.admit(8)
    blocked = asyncio.create_task(engine.admit(4))
    await asyncio.sleep(0)
    assert (engine.running, engine.waiting) == (1, 1)

    engine.release(8)
    await blocked
    assert (engine.running, engine.waiting, engine.kv_cache_usage) == (1, 0, 0.4)


async def test_cancelled_waiter_frees_its_place_for_the_next() -> None:
    engine = Engine(max_num_seqs=1, total_kv_blocks=10, prefix_cache=None)
    await engine.admit(1)
    abandoned = asyncio.create_task(engine.admit(1))
    patient = asyncio.create_task(engine.admit(1))
    await asyncio.sleep(0)

    abandoned.cancel()
    engine.release(1)
    await patient
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert (engine.running, engine.waiting) == (1, 0)


def test_prefix_cache_never_exceeds_its_bound_and_evicts_least_recent() -> None:
    cache = PrefixCache(capacity_blocks=3)
    assert cache.lookup_and_insert([1, 2, 3]) == 0
    assert cache.lookup_and_insert([1]) == 1  # 1 is now the most recent
    cache.lookup_and_insert([4, 5])  # evicts 2 and 3
    assert len(cache) == 3
    assert cache.lookup_and_insert([1, 2]) == 1


def test_block_hashes_cover_full_blocks_and_chain_the_prefix() -> None:
    same_start = chained_block_hashes("a" * 64 + "b" * 64 + "tail", 64)
    other_start = chained_block_hashes("z" * 64 + "b" * 64, 64)

    assert len(same_start) == 2
    assert same_start[1] != other_start[1]  # equal block text, different prefix
