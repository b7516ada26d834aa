"""A de-duplicating work queue with per-key serialization and retry backoff.

Every trigger (an LLMDeployment event, a child's event, the periodic resync, a retry)
only adds the object's key. A key is never processed by two workers at once, and a key
added while it is being processed runs once more afterwards, so the last trigger always
sees the latest state. This is the controller-runtime workqueue, in asyncio.

A pass ends in one of three outcomes, and the queue alone decides what happens next:

- `Done`: nothing more to do; the key runs again on its next trigger or resync.
- `Retry(reason, after)`: run again later, after `after` seconds or the exponential
  backoff of the consecutive retries of this key, whichever is longer. An exception
  escaping the handler counts as `Retry` with backoff (and is logged with its traceback).
- `WaitForChange(reason)`: only a change can help (an invalid spec, an object the API
  server refuses). No retry is scheduled and the periodic resync skips the key; an
  event for the object (its spec, a child) runs it again, and so leaves the wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeAlias, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Done:
    """The pass brought the object to its desired state (or found it gone)."""

    result: str = "success"
    """Metrics label: success, or gone for an object that no longer exists."""


@dataclasses.dataclass(frozen=True)
class Retry:
    """Not yet: run the key again after `after` seconds or its backoff, whichever is longer."""

    reason: str
    after: float | None = None


@dataclasses.dataclass(frozen=True)
class WaitForChange:
    """Only a change of the object can help: no retry, no resync, until an event for it arrives."""

    reason: str


Outcome: TypeAlias = Done | Retry | WaitForChange


def outcome_label(outcome: Outcome) -> str:
    """The `result` label of the reconcile metric: success, gone, retry or wait."""
    if isinstance(outcome, Done):
        return outcome.result
    return "retry" if isinstance(outcome, Retry) else "wait"


@dataclasses.dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    cap: float = 120.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * (2 ** max(0, failures - 1))))


def retry_delay(outcome: Retry, failures: int, backoff: Backoff) -> float:
    """Seconds until the next attempt after the `failures`-th consecutive retry."""
    return max(outcome.after or 0.0, backoff.delay(failures))


class WorkQueue(Generic[K]):
    def __init__(
        self,
        handler: Callable[[K], Awaitable[Outcome]],
        *,
        workers: int = 4,
        backoff: Backoff | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._handler = handler
        self._workers = workers
        self._backoff = backoff or Backoff()
        self._on_depth = on_depth
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._waiting: dict[K, str] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K) -> None:
        """Schedule `key` for an event that concerns it; a no-op when it is already queued."""
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)
        self._report()

    def resync(self, keys: Iterable[K]) -> None:
        """Schedule every key for a periodic or broad (inventory) re-check, except those waiting for a change."""
        for key in keys:
            if key not in self._waiting:
                self.add(key)

    def waiting(self, key: K) -> str | None:
        """Why `key` waits for a change, or None."""
        return self._waiting.get(key)

    def forget(self, key: K) -> None:
        """Drop the bookkeeping of a key whose object is gone."""
        self._waiting.pop(key, None)
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def add_after(self, key: K, delay: float) -> None:
        """Schedule `key` in `delay` seconds (an earlier pending retry wins)."""
        existing = self._timers.get(key)
        loop = asyncio.get_running_loop()
        if existing is not None and existing.when() <= loop.time() + delay:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _report(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queued))

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            self._report()
            self._waiting.pop(key, None)
            try:
                outcome = await self._handler(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = self._retry(key, Retry(f"{type(e).__name__}: {e}"))
                logger.exception("reconcile of %s failed (attempt %d); retrying in %.0fs",
                                 key, self._failures[key], delay)
            else:
                if isinstance(outcome, Retry):
                    delay = self._retry(key, outcome)
                    logger.info("%s: %s; retrying in %.0fs", key, outcome.reason, delay)
                elif isinstance(outcome, WaitForChange):
                    self._failures.pop(key, None)
                    timer = self._timers.pop(key, None)
                    if timer is not None:
                        timer.cancel()
                    self._waiting[key] = outcome.reason
                    logger.warning("%s: %s; waiting for a change of the object", key, outcome.reason)
                else:
                    self._failures.pop(key, None)
            finally:
                self._active.discard(key)
                self._queue.task_done()
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)

    def _retry(self, key: K, outcome: Retry) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = retry_delay(outcome, failures, self._backoff)
        self.add_after(key, delay)
        return delay

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}")
                           for i in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def join(self) -> None:
        """Wait until everything queued so far has been handled (tests)."""
        await self._queue.join()
