"""The work queue behind every reconcile: no lost triggers, no concurrent passes per object."""

from __future__ import annotations

import asyncio

from argosy_operator.workqueue import Backoff, Requeue, WorkQueue


async def test_duplicate_triggers_collapse_and_a_trigger_during_a_pass_runs_again() -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    running = asyncio.Event()

    async def handle(key: str) -> None:
        calls.append(key)
        if len(calls) == 1:
            running.set()
            await gate.wait()

    queue: WorkQueue[str] = WorkQueue(handle, workers=3)
    queue.start()
    queue.add("a")
    await running.wait()
    # "a" is being processed: more triggers must neither run concurrently nor be lost.
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    queue.add("b")
    await asyncio.wait_for(_until(lambda: calls.count("b") == 1), 5)
    assert calls.count("a") == 1
    gate.set()
    await asyncio.wait_for(_until(lambda: calls.count("a") == 2), 5)
    await queue.join()
    assert sorted(calls) == ["a", "a", "b"]
    await queue.stop()


async def test_failures_are_retried_and_requeue_runs_later() -> None:
    attempts: dict[str, int] = {"boom": 0, "later": 0}

    async def handle(key: str) -> None:
        attempts[key] += 1
        if key == "boom" and attempts[key] < 3:
            raise RuntimeError("API server unavailable")
        if key == "later" and attempts[key] == 1:
            raise Requeue(0.01)

    queue: WorkQueue[str] = WorkQueue(handle, workers=2, backoff=Backoff(base=0.01, cap=0.05))
    queue.start()
    queue.add("boom")
    queue.add("later")
    await asyncio.wait_for(_until(lambda: attempts == {"boom": 3, "later": 2}), 5)
    await queue.stop()


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [Backoff(base=1, cap=10).delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():  # noqa: ASYNC110 - the handlers under test signal nothing else
        await asyncio.sleep(0.005)
