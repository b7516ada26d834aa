"""A de-duplicating work queue with per-key serialization and retry backoff.

Every trigger (an LLMDeployment event, a child's event, the periodic resync, a retry)
only adds the object's key. A key is never processed by two workers at once, and a key
added while it is being processed runs once more afterwards, so the last trigger always
sees the latest state. This is the controller-runtime workqueue, in asyncio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


class Requeue(Exception):
    """Raised by a handler to run the key again after `delay` seconds without counting a failure."""

    def __init__(self, delay: float, message: str = "") -> None:
        super().__init__(message or f"requeue in {delay}s")
        self.delay = delay


@dataclasses.dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    cap: float = 120.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * (2 ** max(0, failures - 1))))


class WorkQueue(Generic[K]):
    def __init__(
        self,
        handler: Callable[[K], Awaitable[None]],
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
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K) -> None:
        """Schedule `key`; a no-op when it is already waiting."""
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)
        self._report()

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
            try:
                await self._handler(key)
            except Requeue as r:
                self._failures.pop(key, None)
                self.add_after(key, r.delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = self._backoff.delay(failures)
                logger.exception("reconcile of %s failed (attempt %d); retrying in %.0fs",
                                 key, failures, delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
                self._queue.task_done()
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)

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
