"""Deadlines of one fixed delay on one repeating timer: for the timeouts of the hot path.

Every proxied request had event-loop timers that almost never fire (the first-byte deadline,
the delayed disconnect watcher): each one created and cancelled again a few hundred
microseconds later. ``FixedDelay`` keeps such deadlines in a dict in the order they were set
(with one delay, that is the order they fall due) and checks the front of it from one timer
every ``resolution`` seconds while any is pending, so a deadline fires up to ``resolution``
late, and setting and cancelling one is a dict insert and a dict pop. The timer runs when the
oldest pending deadline falls due (at most once per ``resolution``): with short requests that
cancel their deadlines, about once per ``delay``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """A pending deadline of a ``FixedDelay``; ``cancel()`` like an ``asyncio.TimerHandle``'s."""

    __slots__ = ("_owner",)

    def __init__(self, owner: FixedDelay) -> None:
        self._owner = owner

    def cancel(self) -> None:
        self._owner.entries.pop(self, None)


class FixedDelay:
    """Call callbacks ``delay`` (up to ``delay + resolution``) seconds after they were added."""

    __slots__ = ("_loop", "_timer", "delay", "entries", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, resolution: float) -> None:
        self._loop = loop
        self.delay = delay
        self.resolution = resolution
        self.entries: dict[Deadline, tuple[float, Callable[[], None]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def call_later(self, callback: Callable[[], None]) -> Deadline:
        deadline = Deadline(self)
        self.entries[deadline] = (self._loop.time() + self.delay, callback)
        if self._timer is None:
            self._timer = self._loop.call_later(self.delay, self._tick)
        return deadline

    def _tick(self) -> None:
        self._timer = None
        entries = self.entries
        loop = self._loop
        now = loop.time()
        when = now
        try:
            while entries:
                deadline = next(iter(entries))
                when, callback = entries[deadline]
                if when > now:
                    break
                del entries[deadline]
                callback()
        finally:
            if entries and self._timer is None:
                self._timer = loop.call_at(max(when, now + self.resolution), self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.entries.clear()
