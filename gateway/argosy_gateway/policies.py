"""Routing policies: pick one endpoint among a model's ready endpoints.

Pure functions of plain values (endpoint URLs, the outstanding-request counts, an
affinity key); no web framework and no I/O. State is bounded: the only mutable state
is one round-robin counter per model, in a dict capped in size.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

from argosy_gateway.podload import PodLoad
from argosy_gateway.routetable import LEAST_OUTSTANDING, PREFIX_AFFINITY, ROUND_ROBIN, SESSION_AFFINITY

_MASK64: Final = (1 << 64) - 1


class Policy(Protocol):
    """Choose one of ``endpoints`` (never empty) for a request to ``model``.

    ``outstanding`` maps endpoint -> requests in flight (missing = 0). ``key`` is the
    affinity key the policy asked for (prompt prefix or session id), or None.
    """

    needs: str  # "none" | "prefix" | "session": what the caller should extract as key

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str: ...


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _mix64(value: int) -> int:
    """splitmix64 finaliser: spreads the bits of a combined key well and cheaply."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class _EndpointHashes:
    """Stable 64-bit hashes of endpoint URLs, bounded in size (stable across processes)."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._cache: dict[str, int] = {}

    def __call__(self, endpoint: str) -> int:
        value = self._cache.get(endpoint)
        if value is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            value = self._cache[endpoint] = _digest64(endpoint)
        return value


def rendezvous_order(key: str, endpoints: Sequence[str], endpoint_hash: _EndpointHashes) -> list[str]:
    """Endpoints ordered by highest-random-weight hashing of ``key``.

    This is consistent hashing: removing an endpoint only moves the keys that were on
    it, and every process (and every gateway replica) computes the same order.
    """
    key_hash = _digest64(key)
    return sorted(endpoints, key=lambda e: _mix64(key_hash ^ endpoint_hash(e)), reverse=True)


def _least_loaded(endpoints: Sequence[str], outstanding: Mapping[str, int], start: int) -> str:
    """The endpoint with the fewest outstanding requests; ties rotate with ``start``."""
    count = len(endpoints)
    best = endpoints[start % count]
    best_load = outstanding.get(best, 0)
    for offset in range(1, count):
        candidate = endpoints[(start + offset) % count]
        load = outstanding.get(candidate, 0)
        if load < best_load:
            best, best_load = candidate, load
    return best


class LeastOutstanding:
    needs = "none"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str:
        self._turn = (self._turn + 1) & 0xFFFFFFFF
        return _least_loaded(endpoints, outstanding, self._turn)


class RoundRobin:
    needs = "none"

    def __init__(self, max_models: int = 4096) -> None:
        self._max_models = max_models
        self._next: OrderedDict[str, int] = OrderedDict()

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str:
        turn = self._next.get(model, 0)
        self._next[model] = (turn + 1) & 0xFFFFFFFF
        if len(self._next) > self._max_models:
            self._next.popitem(last=False)
        return endpoints[turn % len(endpoints)]


class PrefixAffinity:
    """Longest cached prefix first, within a load bound; consistent hashing for new prefixes.

    The policy remembers, per block of ``block_chars`` characters of the prompt (each block's
    hash chained to the ones before it, as vLLM hashes its KV blocks), which endpoints served
    a prompt that began that way. A request goes to the endpoint holding its longest known
    prefix among those under ``load_factor`` times the fair share of outstanding requests
    (bounded-load hashing; at low load an endpoint may always carry ``headroom`` requests
    more than the least loaded one, since a request or two more costs a batch slot where a
    cache miss costs a whole prefill), ties going to the less loaded. A prefix nobody holds yet goes to
    its highest-random-weight endpoint for the first ``home_chars`` characters, so every
    gateway replica sends a new system prompt to the same place. Requests that share a system
    prompt therefore gather on few endpoints, and each conversation's later turns (whose
    prompt is the whole conversation so far) return to the endpoint that cached its earlier
    turns, unless it is overloaded.

    State is bounded: at most ``max_blocks`` block hashes (least recently used evicted), each
    with at most ``holders_per_block`` endpoints.

    ``pod_loads`` (endpoint -> ``PodLoad``, kept up to date by the gateway from the pods'
    ``/metrics``; a missing endpoint = not known) overrides affinity for an overloaded pod:
    one with requests queued (its batch is full, so a new request would wait too, whatever
    prefix it holds) or a KV cache at least ``kv_cache_full`` used takes no request while
    another pod is not overloaded. Among equally good endpoints (same cached depth, same
    own load) the one with less load from others (other gateway replicas, direct clients)
    wins. The pods' running counts do not otherwise change the load bound: spilling a
    prefix costs its cache hits, and measured (docs/benchmarks.md) that cost more time
    than the load it spread.
    """

    needs = "prefix"

    def __init__(
        self,
        load_factor: float = 1.25,
        *,
        block_chars: int = 128,
        home_chars: int = 256,
        max_blocks: int = 200_000,
        holders_per_block: int = 4,
        headroom: int = 2,
        pod_loads: Mapping[str, PodLoad] | None = None,
        kv_cache_full: float = 0.95,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be at least 1.0")
        if block_chars < 1 or home_chars < 1 or max_blocks < 1 or holders_per_block < 1 or headroom < 0:
            raise ValueError("block_chars, home_chars, max_blocks and holders_per_block must be positive")
        self._headroom = headroom
        self._pod_loads: Mapping[str, PodLoad] = pod_loads if pod_loads is not None else {}
        self._kv_cache_full = kv_cache_full
        self._load_factor = load_factor
        self._block_chars = block_chars
        self._home_chars = home_chars
        self._max_blocks = max_blocks
        self._holders_per_block = holders_per_block
        self._hashes = _EndpointHashes()
        self._fallback = LeastOutstanding()
        self._holders: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    @property
    def remembered_blocks(self) -> int:
        """How many prompt blocks the policy remembers (never more than ``max_blocks``)."""
        return len(self._holders)

    def _block_hashes(self, model: str, key: str) -> list[int]:
        block = self._block_chars
        chained = hash(model)
        hashes: list[int] = []
        for start in range(0, len(key) - block + 1, block):
            chained = hash((chained, key[start : start + block]))
            hashes.append(chained)
        return hashes

    def _cached_depths(self, hashes: list[int], endpoints: Sequence[str]) -> dict[str, int]:
        """Endpoint -> how many leading blocks of the prompt it served before."""
        depths: dict[str, int] = {}
        holders = self._holders
        for depth, block_hash in enumerate(hashes):
            served = holders.get(block_hash)
            if served is None:
                break
            extended = False
            for endpoint in served:
                if depths.get(endpoint, 0) == depth and endpoint in endpoints:
                    depths[endpoint] = depth + 1
                    extended = True
            if not extended:
                break
        return depths

    def _remember(self, hashes: list[int], endpoint: str) -> None:
        holders = self._holders
        limit = self._holders_per_block
        for block_hash in hashes:
            served = holders.get(block_hash)
            if served is None:
                holders[block_hash] = (endpoint,)
            else:
                if served[-1] != endpoint:
                    kept = tuple(e for e in served if e != endpoint)
                    holders[block_hash] = (*kept[-(limit - 1) :], endpoint) if limit > 1 else (endpoint,)
                holders.move_to_end(block_hash)
        while len(holders) > self._max_blocks:
            holders.popitem(last=False)

    def _not_overloaded(self, endpoints: Sequence[str]) -> Sequence[str]:
        """The endpoints whose pods are not overloaded; all of them if every one is."""
        pods, full = self._pod_loads, self._kv_cache_full
        fine = [e for e in endpoints if (pod := pods.get(e)) is None or not pod.overloaded(full)]
        return fine or endpoints

    def _hidden(self, endpoint: str) -> int:
        pod = self._pod_loads.get(endpoint)
        return 0 if pod is None else pod.hidden

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str:
        if self._pod_loads and len(endpoints) > 1:
            endpoints = self._not_overloaded(endpoints)
        if not key or len(endpoints) == 1:
            return self._fallback.choose(model, endpoints, outstanding, None)
        loads = [outstanding.get(e, 0) for e in endpoints]
        # Capacity per endpoint counting the request being placed (bounded-load hashing).
        capacity = max(1, math.ceil(self._load_factor * (sum(loads) + 1) / len(endpoints)), min(loads) + self._headroom)
        hashes = self._block_hashes(model, key)
        depths = self._cached_depths(hashes, endpoints) if hashes else {}
        chosen: str | None = None
        if depths:
            best = (0, 0, 0)
            for endpoint, depth in depths.items():
                load = outstanding.get(endpoint, 0)
                if load < capacity and (rank := (depth, -load, -self._hidden(endpoint))) > best:
                    chosen, best = endpoint, rank
        if chosen is None:
            for endpoint in rendezvous_order(key[: self._home_chars], endpoints, self._hashes):
                if outstanding.get(endpoint, 0) < capacity:
                    chosen = endpoint
                    break
            else:
                chosen = _least_loaded(endpoints, outstanding, 0)
        if hashes:
            self._remember(hashes, chosen)
        return chosen


class SessionAffinity:
    """The same session (``X-Session-ID`` header, else the ``user`` field) keeps its endpoint.

    Without a session key the request goes to the least loaded endpoint.
    """

    needs = "session"

    def __init__(self) -> None:
        self._hashes = _EndpointHashes()
        self._fallback = LeastOutstanding()

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str:
        if not key:
            return self._fallback.choose(model, endpoints, outstanding, None)
        if len(endpoints) == 1:
            return endpoints[0]
        key_hash = _digest64(key)
        return max(endpoints, key=lambda e: _mix64(key_hash ^ self._hashes(e)))


def build_policies(
    prefix_load_factor: float = 1.25, pod_loads: Mapping[str, PodLoad] | None = None
) -> dict[str, Policy]:
    """One instance of every policy, by the name used in the route table.

    ``pod_loads`` is the live endpoint -> ``PodLoad`` mapping prefix affinity reads (see there).
    """
    return {
        LEAST_OUTSTANDING: LeastOutstanding(),
        ROUND_ROBIN: RoundRobin(),
        PREFIX_AFFINITY: PrefixAffinity(prefix_load_factor, pod_loads=pod_loads),
        SESSION_AFFINITY: SessionAffinity(),
    }
