"""The work queue behind every reconcile: no lost triggers, no concurrent passes per object."""

from __future__ import annotations

import asyncio

import pytest
from argosy_operator.workqueue import Backoff, Done, Outcome, Retry, WaitForChange, WorkQueue, retry_delay


async def test_duplicate_triggers_collapse_and_a_trigger_during_a_pass_runs_again() -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    running = asyncio.Event()

    async def handle(key: str) -> Outcome:
        calls.append(key)
        if len(calls) == 1:
            running.set()
            await gate.wait()
        return Done()

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


@pytest.mark.parametrize("outcomes", [
    pytest.param([Retry("API server unavailable"), Retry("API server unavailable"), Done()], id="retry with backoff"),
    pytest.param([RuntimeError("connection reset"), RuntimeError("connection reset"), Done()],
                 id="an exception is a retry with backoff"),
    pytest.param([Retry("name taken", after=0.01), Done()], id="retry after a given delay"),
])
async def test_retries_run_the_key_again_until_done(outcomes: list[Outcome | Exception]) -> None:
    runs: list[int] = []

    async def handle(key: str) -> Outcome:
        runs.append(1)
        outcome = outcomes[len(runs) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    queue: WorkQueue[str] = WorkQueue(handle, workers=2, backoff=Backoff(base=0.01, cap=0.05))
    queue.start()
    queue.add("m")
    await asyncio.wait_for(_until(lambda: len(runs) == len(outcomes)), 5)
    await asyncio.sleep(0.1)  # a Done pass schedules nothing more
    assert len(runs) == len(outcomes)
    await queue.stop()


async def test_waiting_for_a_change_skips_resyncs_but_not_events() -> None:
    runs: list[str] = []
    replies: list[Outcome] = [WaitForChange("spec.replicas: must be >= 0"), WaitForChange("still invalid"), Done()]

    async def handle(key: str) -> Outcome:
        runs.append(key)
        return replies[len(runs) - 1]

    queue: WorkQueue[str] = WorkQueue(handle, workers=1, backoff=Backoff(base=0.01, cap=0.05))
    queue.start()
    queue.add("m")
    await asyncio.wait_for(_until(lambda: queue.waiting("m") is not None), 5)
    for _ in range(3):
        queue.resync(["m"])  # the periodic resync, a node change: nothing to retry
    await queue.join()
    await asyncio.sleep(0.05)
    assert runs == ["m"] and queue.waiting("m") == "spec.replicas: must be >= 0"

    queue.add("m")  # an event for the object (its spec was edited)
    await asyncio.wait_for(_until(lambda: len(runs) == 2), 5)
    await queue.join()
    assert queue.waiting("m") == "still invalid"
    queue.add("m")
    await asyncio.wait_for(_until(lambda: len(runs) == 3), 5)
    await queue.join()
    assert queue.waiting("m") is None
    queue.resync(["m"])  # no longer waiting: resyncs run it again
    await asyncio.wait_for(_until(lambda: len(runs) == 4), 5)
    await queue.stop()


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [Backoff(base=1, cap=10).delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize(("outcome", "failures", "delay"), [
    (Retry("not yet"), 1, 1.0),
    (Retry("not yet"), 4, 8.0),
    (Retry("not yet"), 30, 120.0),
    (Retry("name taken", after=30), 1, 30.0),
    (Retry("name taken", after=30), 7, 64.0),
])
def test_retry_delay_is_the_longer_of_the_asked_delay_and_the_backoff(outcome: Retry, failures: int,
                                                                       delay: float) -> None:
    assert retry_delay(outcome, failures, Backoff()) == delay


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():  # noqa: ASYNC110 - the handlers under test signal nothing else
        await asyncio.sleep(0.005)
