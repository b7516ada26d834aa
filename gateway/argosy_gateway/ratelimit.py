"""Token buckets for per-key request rates. Pure: the caller passes the time.

Buckets are keyed by the API key's sha256 (never its display name), so two keys never
share a bucket. A bucket holds one minute's allowance and refills continuously.

When a key's limit changes (the keys file is reloaded), its bucket keeps its state: the
tokens it holds carry over, capped at the new capacity, and refill at the new rate from
then on. So lowering a limit takes effect at once (a client cannot keep the old burst),
and raising it grants no fresh burst beyond what the client had saved.

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
    """One bucket per key hash; capacity = one minute's allowance, refilled continuously."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key_hash: str, requests_per_minute: int, now: float) -> int:
        """Take one token. Returns 0 when allowed, else the seconds to wait (Retry-After)."""
        bucket = self._buckets.get(key_hash)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict_full(now)
            bucket = self._buckets[key_hash] = _Bucket(float(requests_per_minute), now, requests_per_minute)
        elapsed = max(0.0, now - bucket.updated)
        # Refill at the rate in force since the last request, then apply the current limit.
        refilled = bucket.tokens + elapsed * bucket.rate_per_minute / 60.0
        bucket.tokens = min(float(requests_per_minute), refilled)
        bucket.rate_per_minute = requests_per_minute
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        rate_per_second = requests_per_minute / 60.0
        if rate_per_second <= 0:
            return 60
        return max(1, math.ceil((1.0 - bucket.tokens) / rate_per_second))

    def _evict_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (forgetting them changes nothing);
        if none has, drop the oldest half."""
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * bucket.rate_per_minute / 60.0 >= bucket.rate_per_minute
        ]
        if not full:
            by_age = sorted(self._buckets, key=lambda key: self._buckets[key].updated)
            full = by_age[: max(1, len(by_age) // 2)]
        for key in full:
            del self._buckets[key]
