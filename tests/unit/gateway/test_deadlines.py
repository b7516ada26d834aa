"""deadlines.FixedDelay on a real event loop: fires once due (within the resolution), never when cancelled."""

from __future__ import annotations

import asyncio

from argosy_gateway.deadlines import FixedDelay


async def test_deadlines_fire_in_order_within_the_resolution_and_cancelled_ones_never() -> None:
    loop = asyncio.get_running_loop()
    timers = FixedDelay(loop, 0.2, 0.02)
    fired: list[tuple[str, float]] = []
    started = loop.time()
    timers.call_later(lambda: fired.append(("a", loop.time() - started)))
    cancelled = timers.call_later(lambda: fired.append(("cancelled", loop.time() - started)))
    await asyncio.sleep(0.1)
    timers.call_later(lambda: fired.append(("b", loop.time() - started)))
    cancelled.cancel()
    await asyncio.sleep(0.15)
    assert [name for name, _ in fired] == ["a"]
    await asyncio.sleep(0.15)
    assert [name for name, _ in fired] == ["a", "b"]
    (_, a_at), (_, b_at) = fired
    assert 0.2 - 1e-6 <= a_at < 0.28  # (float rounding of the loop clock: never a whole tick early)
    assert 0.3 - 1e-6 <= b_at < 0.38
    assert timers.entries == {}
    await asyncio.sleep(0.05)
    assert timers._timer is None  # nothing pending: no timer left running


async def test_a_failing_callback_does_not_stop_later_deadlines() -> None:
    loop = asyncio.get_running_loop()
    timers = FixedDelay(loop, 0.05, 0.01)
    fired: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    loop.set_exception_handler(lambda loop, context: fired.append("reported"))
    timers.call_later(fail)
    await asyncio.sleep(0.02)
    timers.call_later(lambda: fired.append("later"))
    await asyncio.sleep(0.15)
    assert fired == ["reported", "later"]
