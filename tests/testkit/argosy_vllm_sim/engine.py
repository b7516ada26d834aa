"""The simulated engine: a batch limit with a FIFO waiting queue, a KV-cache budget and a prefix cache.

Nothing here touches HTTP. The server asks the engine to admit a request (which may wait), to
look its prompt blocks up in the prefix cache, and to release it when it ends or is aborted.
The engine keeps the counters that /metrics reports under vLLM's names.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

# Like vLLM's time-to-first-token histogram, but with finer low buckets: benchmarks run with no delay.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


class PrefixCache:
    """An LRU set of prompt-block hashes, bounded by the number of KV blocks.

    A block hash covers the whole prefix up to the end of that block (hash chaining, as in vLLM),
    so a hit on block k implies hits on blocks 0..k-1.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("the prefix cache needs room for at least one block")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_insert(self, block_hashes: list[int]) -> int:
        """Return how many leading blocks were cached, then cache all of them as most recent."""
        blocks = self._blocks
        hits = 0
        for block_hash in block_hashes:
            if block_hash not in blocks:
                break
            hits += 1
        for block_hash in block_hashes:
            if block_hash in blocks:
                blocks.move_to_end(block_hash)
            else:
                blocks[block_hash] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
        return hits


def chained_block_hashes(text: str, block_chars: int) -> list[int]:
    """Hashes of each full block of `text`, each one chained to the block before it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    kv_blocks: int


@dataclass
class EngineStats:
    """Monotonic counters, as vLLM exports them (token counters count tokens, not requests)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    success_by_reason: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS_S))
    ttft_count: int = 0
    ttft_sum_s: float = 0.0

    def observe_ttft(self, seconds: float) -> None:
        index = bisect.bisect_left(TTFT_BUCKETS_S, seconds)
        if index < len(self.ttft_bucket_counts):
            self.ttft_bucket_counts[index] += 1
        self.ttft_count += 1
        self.ttft_sum_s += seconds


class Engine:
    """Admission control: at most `max_num_seqs` running requests within `total_kv_blocks`.

    Requests that do not fit wait in arrival order, like vLLM's FCFS scheduler. A request holds
    the KV blocks for its prompt plus its maximum output from admission until release.
    """

    def __init__(self, *, max_num_seqs: int, total_kv_blocks: int, prefix_cache: PrefixCache | None) -> None:
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.max_num_seqs = max_num_seqs
        self.total_kv_blocks = total_kv_blocks
        self.prefix_cache = prefix_cache
        self.stats = EngineStats()
        self.running = 0
        self.used_kv_blocks = 0
        self._waiters: deque[_Waiter] = deque()
        self._prefill_free_at = 0.0

    def queue_prefill(self, seconds: float, now: float) -> float:
        """Reserve ``seconds`` of prefill on the one compute lane; return the wait plus the work.

        A GPU runs one batch at a time, so the uncached prompt tokens of requests that arrive
        together are computed one after the other: under load, every uncached token delays
        the requests behind it. Reserved time stays spent if the request is aborted.
        """
        start = max(now, self._prefill_free_at)
        self._prefill_free_at = start + seconds
        return self._prefill_free_at - now

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        return self.used_kv_blocks / self.total_kv_blocks

    def _fits(self, kv_blocks: int) -> bool:
        return self.running < self.max_num_seqs and self.used_kv_blocks + kv_blocks <= self.total_kv_blocks

    async def admit(self, kv_blocks: int) -> None:
        """Return once the request runs. Cancelling while waiting leaves no trace."""
        if not self._waiters and self._fits(kv_blocks):
            self.running += 1
            self.used_kv_blocks += kv_blocks
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), kv_blocks)
        self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted in the same loop turn as the cancellation: give the slot back.
                self.release(kv_blocks)
            else:
                with contextlib.suppress(ValueError):  # _dispatch may have dropped it already
                    self._waiters.remove(waiter)
                self._dispatch()
            raise

    def release(self, kv_blocks: int) -> None:
        self.running -= 1
        self.used_kv_blocks -= kv_blocks
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled; its task is about to remove it
                self._waiters.popleft()
                continue
            if not self._fits(waiter.kv_blocks):
                return
            self._waiters.popleft()
            self.running += 1
            self.used_kv_blocks += waiter.kv_blocks
            waiter.future.set_result(None)

    def cached_prefix_tokens(self, block_hashes: list[int], prompt_tokens: int, block_tokens: int) -> int:
        """Look a prompt up in the prefix cache; count the query and the hit in tokens."""
        self.stats.prefix_cache_queries += prompt_tokens
        if self.prefix_cache is None or not block_hashes:
            return 0
        hit_tokens = self.prefix_cache.lookup_and_insert(block_hashes) * block_tokens
        self.stats.prefix_cache_hits += hit_tokens
        return hit_tokens
