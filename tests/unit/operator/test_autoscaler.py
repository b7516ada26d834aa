"""The autoscaler's decision function: load in, replicas out, looked at every 5 s like the operator does."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import pytest
from argosy_operator.autoscaler import (
    Decision,
    Observation,
    PodSample,
    Settings,
    State,
    decide,
    persisted_differs,
)

LOOK = 5.0  # seconds between looks in these tables
T0 = 1_800_000_000.0

SETTINGS = Settings(
    min_replicas=1,
    max_replicas=5,
    target_in_flight_per_replica=10,
    scale_up_window_seconds=15,
    scale_down_window_seconds=60,
    scale_to_zero_after_seconds=120,
)
TO_ZERO = dataclasses.replace(SETTINGS, min_replicas=0)


def samples(in_flight: float, pods: int, finished: float | None = None) -> tuple[PodSample, ...]:
    """``in_flight`` spread evenly over ``pods`` pods, 3/4 running and 1/4 waiting."""
    if pods == 0:
        return ()
    each = in_flight / pods
    return tuple(PodSample(f"pod-{i}", each * 0.75, each * 0.25, finished) for i in range(pods))


def run(
    settings: Settings,
    loads: Sequence[float],
    *,
    start: int = 1,
    held: Sequence[int] = (),
    state: State | None = None,
) -> list[int]:
    """Replicas after each look, with every decision applied and every pod ready at once."""
    replicas, state = start, state or State(desired_replicas=start)
    seen: list[int] = []
    for i, load in enumerate(loads):
        observation = Observation(
            now=T0 + i * LOOK,
            current_replicas=replicas,
            ready_replicas=replicas,
            samples=samples(load, replicas),
            held=held[i] if i < len(held) else 0,
        )
        decision = decide(settings, observation, state)
        replicas, state = decision.replicas, decision.state
        seen.append(replicas)
    return seen


@pytest.mark.parametrize(
    ("name", "settings", "loads", "start", "expected"),
    [
        ("steady at target stays", SETTINGS, [10] * 6, 1, [1] * 6),
        ("within the 10% tolerance stays", SETTINGS, [21, 19, 22, 18], 2, [2, 2, 2, 2]),
        # 3 looks of 30 in flight: the up-window (15 s) must see only 3s before replicas rise.
        ("sustained load scales up after the up-window", SETTINGS, [30] * 5, 1, [1, 1, 1, 3, 3]),
        ("one spike buys nothing", SETTINGS, [10, 50, 10, 10, 10], 1, [1] * 5),
        ("capped at maxReplicas", SETTINGS, [500] * 5, 1, [1, 1, 1, 5, 5]),
        # Down-window 60 s = 12 looks: the high recommendation holds replicas until it leaves the window.
        ("load drop scales down after the down-window", SETTINGS, [30] + [10] * 14, 3, [3] * 13 + [1, 1]),
        ("never below minReplicas", SETTINGS, [0] * 30, 2, [2] * 12 + [1] * 18),
        ("above maxReplicas comes down at once", SETTINGS, [10] * 3, 8, [5, 5, 5]),
        ("below minReplicas goes up at once", dataclasses.replace(SETTINGS, min_replicas=2), [0] * 2, 1, [2, 2]),
    ],
)
def test_replicas_follow_the_load(
    name: str, settings: Settings, loads: list[float], start: int, expected: list[int]
) -> None:
    assert run(settings, loads, start=start) == expected, name


@pytest.mark.parametrize(
    "loads",
    [
        [40, 0] * 20,  # alternating every look
        [40, 40, 0, 0] * 10,  # alternating every two looks (10 s < the 15 s up-window)
        [25, 5, 25, 5, 25, 5] * 6,
    ],
    ids=["every-look", "every-two-looks", "mild"],
)
def test_flapping_load_does_not_flap_replicas(loads: list[float]) -> None:
    seen = run(SETTINGS, loads, start=2)
    changes = sum(1 for a, b in itertools.pairwise(seen) if a != b)
    assert changes == 0, seen


def test_flapping_after_a_rise_changes_replicas_once() -> None:
    # Sustained high load raises replicas; then the load flaps: the down-window keeps the high
    # recommendation in view, so replicas do not go down and up again.
    seen = run(SETTINGS, [40] * 5 + [40, 0] * 15, start=1)
    changes = [(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(seen)) if a != b]
    assert changes == [(2, 1, 4)], seen


def test_scale_to_zero_after_no_traffic_for_the_configured_time() -> None:
    seen = run(TO_ZERO, [10, 10] + [0] * 40, start=1)
    # Last traffic at the second look (t=5 s); 120 s later (look 25) the model sleeps.
    assert seen[:25] == [1] * 25
    assert seen[25:] == [0] * (len(seen) - 25)


def test_min_replicas_one_never_sleeps() -> None:
    assert run(SETTINGS, [0] * 60, start=1) == [1] * 60


def test_traffic_between_looks_resets_the_idle_clock() -> None:
    # In flight is 0 at every look, but the finished counter grows: requests came and went.
    state = State(desired_replicas=1, last_active=T0 - 1000, request_counts={"pod-0": 5})
    observation = Observation(T0, 1, 1, (PodSample("pod-0", 0, 0, finished=6),))
    decision = decide(TO_ZERO, observation, state)
    assert decision.replicas == 1
    assert decision.state.last_active == T0
    # Without new finished requests the same idle model sleeps.
    idle = Observation(T0, 1, 1, (PodSample("pod-0", 0, 0, finished=5),))
    assert decide(TO_ZERO, idle, state).replicas == 0


def test_a_model_woken_by_the_gateway_is_not_put_back_before_it_served() -> None:
    # Asleep (we wrote 0 long ago), then the gateway patched replicas to 1; the pod takes longer
    # to load than scaleToZeroAfterSeconds.
    state = State(desired_replicas=0, last_active=T0 - 10_000)
    replicas = 1
    decisions: list[Decision] = []
    for i in range(40):  # 200 s of loading, longer than scaleToZeroAfterSeconds
        decision = decide(TO_ZERO, Observation(T0 + i * LOOK, replicas, 0, held=3), state)
        decisions.append(decision)
        replicas, state = decision.replicas, decision.state
    assert {d.replicas for d in decisions} == {1}
    assert decisions[0].reason == "Woken" and "woken by a request" in decisions[0].message
    # Ready and serving the held requests, then idle: the idle clock starts only now.
    t = T0 + 40 * LOOK
    decision = decide(TO_ZERO, Observation(t, 1, 1, samples(3, 1)), state)
    assert decision.replicas == 1
    state = decision.state
    later = decide(TO_ZERO, Observation(t + 119, 1, 1, samples(0, 1)), state)
    assert later.replicas == 1
    assert decide(TO_ZERO, Observation(t + 120, 1, 1, samples(0, 1)), later.state).replicas == 0


def test_held_requests_wake_a_sleeping_model_and_count_as_load() -> None:
    state = State(desired_replicas=0, last_active=T0 - 10_000)
    decision = decide(TO_ZERO, Observation(T0, 0, 0, held=25), state)
    assert (decision.replicas, decision.reason) == (1, "ScaledUp")
    assert "held in gateway 25" in decision.message
    # A sleeping model without demand stays asleep.
    assert decide(TO_ZERO, Observation(T0, 0, 0), state).replicas == 0


def test_twenty_held_requests_wake_to_one_replica_first() -> None:
    # The wake-up goes to one replica; more come only if the load lasts the up-window.
    seen = run(TO_ZERO, [0, 0, 0, 0], start=0, held=[20, 20, 20, 20], state=State(desired_replicas=0))
    assert seen[0] == 1
    assert seen[:3] == [1, 1, 1]


def test_pods_without_metrics_count_at_target_for_scale_down_only() -> None:
    state = State(desired_replicas=3, recommendations=((T0 - 600, 3),))
    # One of three ready pods answered, idle; the two silent ones are counted at target.
    silent = decide(SETTINGS, Observation(T0, 3, 3, samples(0, 1), unreachable=2), state)
    assert silent.recommendation == 2
    assert "2 pods without metrics counted at target" in silent.message
    answered = decide(SETTINGS, Observation(T0, 3, 3, samples(0, 3)), state)
    assert answered.recommendation == 1
    # Scaling up never counts the silent pods: 25 in flight on 2 replicas -> 3, not 4.
    up_state = State(desired_replicas=2, recommendations=((T0 - 600, 3),))
    up = decide(SETTINGS, Observation(T0, 2, 3, samples(25, 2), unreachable=1), up_state)
    assert up.recommendation == 3


def test_the_event_message_carries_the_numbers() -> None:
    state = State(desired_replicas=1, recommendations=((T0 - 100, 3),))
    decision = decide(SETTINGS, Observation(T0, 1, 1, samples(28, 1), held=2), state)
    assert decision.changed and decision.reason == "ScaledUp"
    assert decision.in_flight == 30
    for fragment in ("replicas 1 -> 3", "in flight 30", "running 21", "waiting 7", "held in gateway 2",
                     "target 10/replica -> recommends 3", "up 15s min 3", "down 60s max 3"):
        assert fragment in decision.message, decision.message


def test_history_keeps_one_entry_per_change_and_forgets_what_no_window_sees() -> None:
    state = State(desired_replicas=1)
    for i in range(100):
        state = decide(SETTINGS, Observation(T0 + i * LOOK, 1, 1, samples(10, 1)), state).state
    assert len(state.recommendations) == 1
    assert state.recommendations[0][0] == T0  # the first look that recommended 1


def test_steady_traffic_does_not_rewrite_status_every_look() -> None:
    before = decide(TO_ZERO, Observation(T0, 1, 1, samples(10, 1)), State(desired_replicas=1)).state
    writes = 0
    state = before
    persisted = before
    for i in range(1, 25):  # 120 s of steady traffic
        state = decide(TO_ZERO, Observation(T0 + i * LOOK, 1, 1, samples(10, 1)), state).state
        if persisted_differs(persisted, state, TO_ZERO):
            writes += 1
            persisted = state
    # The idle clock is stored when it lags by scaleToZeroAfterSeconds / 20 = 6 s: every second
    # look (5 s apart), not every look, and never not at all.
    assert 0 < writes <= 12


def test_a_restarted_operator_decides_as_the_old_one_would() -> None:
    # Replicas were raised to 3 a few looks ago; the operator restarts and reads status back
    # (seconds only, no counters): it must not drop replicas before the down-window passes.
    state = State(desired_replicas=1)
    replicas = 1
    for i, load in enumerate([30] * 4 + [0] * 3):
        decision = decide(SETTINGS, Observation(T0 + i * LOOK, replicas, replicas, samples(load, replicas)), state)
        replicas, state = decision.replicas, decision.state
    assert replicas == 3
    restored = State(
        desired_replicas=state.desired_replicas,
        last_active=int(state.last_active or 0),
        recommendations=tuple((int(t), r) for t, r in state.recommendations),
    )
    now = T0 + 7 * LOOK
    assert decide(SETTINGS, Observation(now, 3, 3, samples(0, 3)), restored).replicas == 3
    assert decide(SETTINGS, Observation(now + 60, 3, 3, samples(0, 3)), restored).replicas == 1
