"""Passive health: eject an endpoint after consecutive failures, for a cool-down.

Pure: the caller passes the current monotonic time. State is bounded by the number
of endpoints that are failing right now (a success forgets the endpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejected_until: float = 0.0


class EndpointHealth:
    def __init__(self, failure_threshold: int, cooldown_seconds: float, max_tracked: int = 4096) -> None:
        self._threshold = max(1, failure_threshold)
        self._cooldown = cooldown_seconds
        self._max_tracked = max_tracked
        self._records: dict[str, _Record] = {}

    def record_success(self, endpoint: str) -> None:
        if self._records:
            self._records.pop(endpoint, None)

    def record_failure(self, endpoint: str, now: float) -> bool:
        """Count a failure; True when this failure ejects the endpoint."""
        record = self._records.get(endpoint)
        if record is None:
            if len(self._records) >= self._max_tracked:
                self._forget_one(now)
            record = self._records[endpoint] = _Record()
        if record.ejected_until > now:
            return False
        record.failures += 1
        if record.failures >= self._threshold:
            record.failures = 0
            record.ejected_until = now + self._cooldown
            return True
        return False

    def is_ejected(self, endpoint: str, now: float) -> bool:
        record = self._records.get(endpoint)
        return record is not None and record.ejected_until > now

    def usable(self, endpoints: Sequence[str], now: float) -> Sequence[str]:
        """The endpoints not ejected; all of them if every one is ejected (fail open)."""
        if not self._records:
            return endpoints
        usable = [e for e in endpoints if not self.is_ejected(e, now)]
        return usable or endpoints

    def _forget_one(self, now: float) -> None:
        for endpoint, record in self._records.items():
            if record.ejected_until <= now:
                del self._records[endpoint]
                return
        self._records.pop(next(iter(self._records)))
