"""Token buckets for per-key request rates. Pure: the caller passes the time.

A bucket is local to one gateway process: with R replicas x W workers each allowing
``requests_per_minute``, a key can reach up to R x W times that rate in total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    rate_per_minute: int


class TokenBuckets:
    """One bucket per key name; capacity = one minute's allowance, refilled continuously."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str, requests_per_minute: int, now: float) -> int:
        """Take one token. Returns 0 when allowed, else the seconds to wait (Retry-After)."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate_per_minute != requests_per_minute:
            if len(self._buckets) >= self._max_keys:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(float(requests_per_minute), now, requests_per_minute)
        rate_per_second = requests_per_minute / 60.0
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(requests_per_minute), bucket.tokens + elapsed * rate_per_second)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        if rate_per_second <= 0:
            return 60
        return max(1, math.ceil((1.0 - bucket.tokens) / rate_per_second))
