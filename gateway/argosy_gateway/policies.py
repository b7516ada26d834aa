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
    """Consistent hashing on the prompt's start, with bounded load.

    Requests sharing a prompt prefix go to the same endpoint (its prefix cache is warm)
    unless that endpoint already carries more than ``load_factor`` times the fair share
    of the outstanding requests; then the request spills to the next endpoint in the
    key's hash order.
    """

    needs = "prefix"

    def __init__(self, load_factor: float = 1.25) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be at least 1.0")
        self._load_factor = load_factor
        self._hashes = _EndpointHashes()
        self._fallback = LeastOutstanding()

    def choose(self, model: str, endpoints: Sequence[str], outstanding: Mapping[str, int], key: str | None) -> str:
        if not key or len(endpoints) == 1:
            return self._fallback.choose(model, endpoints, outstanding, None)
        total = sum(outstanding.get(e, 0) for e in endpoints)
        # Capacity per endpoint counting the request being placed (bounded-load hashing).
        capacity = max(1, math.ceil(self._load_factor * (total + 1) / len(endpoints)))
        order = rendezvous_order(key, endpoints, self._hashes)
        for endpoint in order:
            if outstanding.get(endpoint, 0) < capacity:
                return endpoint
        return _least_loaded(order, outstanding, 0)


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


def build_policies(prefix_load_factor: float = 1.25) -> dict[str, Policy]:
    """One instance of every policy, by the name used in the route table."""
    return {
        LEAST_OUTSTANDING: LeastOutstanding(),
        ROUND_ROBIN: RoundRobin(),
        PREFIX_AFFINITY: PrefixAffinity(prefix_load_factor),
        SESSION_AFFINITY: SessionAffinity(),
    }
