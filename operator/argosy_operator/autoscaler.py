"""The autoscaler's decision: desired replicas of one LLMDeployment from its load (pure: no I/O).

Load is the number of requests in flight: vLLM's ``vllm:num_requests_running`` +
``vllm:num_requests_waiting`` summed over the ready serving pods (leaders only for
multi-node replicas), plus the requests the gateway holds while the model wakes.

    recommendation = ceil(in_flight / targetInFlightPerReplica)      (within a 10 % tolerance
                                                                      of the current replicas)
    desired        = HPA-style stabilization of the recommendations:
                     up   to the lowest  recommendation of the last scaleUpWindowSeconds,
                     down to the highest recommendation of the last scaleDownWindowSeconds
    zero           = only with minReplicas 0, after scaleToZeroAfterSeconds without traffic,
                     counted while a replica is ready (a model the gateway just woke is not
                     put back to sleep before it could serve)

Ready pods whose metrics could not be read count as carrying the target load when
that keeps replicas up, and as idle when that would add replicas (as an HPA treats
missing metrics). The history is a run-length list of (time, recommendation), one
entry per change, so steady load writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Final

# Like the HPA's --horizontal-pod-autoscaler-tolerance: within 10 % of the target, stay.
TOLERANCE: Final = 0.1
MAX_HISTORY: Final = 512  # status.autoscaling.recommendations maxItems


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """spec.autoscaling, as plain numbers."""

    min_replicas: int
    max_replicas: int
    target_in_flight_per_replica: int
    scale_up_window_seconds: float
    scale_down_window_seconds: float
    scale_to_zero_after_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class PodSample:
    """One ready serving pod's vLLM metrics at one look."""

    pod: str
    running: float
    waiting: float
    finished: float | None = None
    """Sum of ``vllm:request_success_total``; None when the pod does not export it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    now: float
    """Unix seconds."""
    current_replicas: int
    """spec.replicas as it is now (the scale subresource), whoever wrote it."""
    ready_replicas: int
    samples: tuple[PodSample, ...] = ()
    unreachable: int = 0
    """Ready serving pods whose /metrics could not be read."""
    held: int = 0
    """Requests the gateway holds for this model (waiting for a ready replica)."""


@dataclasses.dataclass(frozen=True, slots=True)
class State:
    """What the autoscaler remembers between looks (status.autoscaling, plus the counters)."""

    desired_replicas: int | None = None
    last_active: float | None = None
    recommendations: tuple[tuple[float, int], ...] = ()
    request_counts: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Finished-request counter per pod at the last look (kept in memory only)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    """Desired replicas."""
    previous: int
    """Replicas before this decision (the current scale)."""
    reason: str
    """ScaledUp, ScaledDown, ScaledToZero, Woken or Unchanged (the Event reason)."""
    message: str
    """The numbers behind the decision (the Event message)."""
    in_flight: int
    recommendation: int
    state: State

    @property
    def changed(self) -> bool:
        return self.replicas != self.previous


def _traffic_seen(samples: tuple[PodSample, ...], before: Mapping[str, float]) -> bool:
    for sample in samples:
        if sample.finished is None:
            continue
        previous = before.get(sample.pod)
        # A pod seen for the first time with finished requests served them since it started;
        # a counter that went down is a restarted server, whose new count is all new traffic.
        if previous is None or sample.finished < previous:
            if sample.finished > 0:
                return True
        elif sample.finished > previous:
            return True
    return False


def _record(
    history: tuple[tuple[float, int], ...], now: float, value: int, keep_seconds: float
) -> tuple[tuple[float, int], ...]:
    """Append a change point and drop the ones no window can see any more."""
    points = list(history)
    if not points or points[-1][1] != value:
        points.append((now, value))
    # A point lasts until the next one starts; it is still visible while that start is in the window.
    horizon = now - keep_seconds
    first = 0
    while first + 1 < len(points) and points[first + 1][0] <= horizon:
        first += 1
    return tuple(points[first:][-MAX_HISTORY:])


def _window(history: tuple[tuple[float, int], ...], now: float, seconds: float) -> list[int]:
    """The recommendations in effect at some time within the last ``seconds``."""
    start = now - seconds
    values: list[int] = []
    for i, (_, value) in enumerate(history):
        ends = history[i + 1][0] if i + 1 < len(history) else math.inf
        if ends > start:
            values.append(value)
    return values


def _recommend(in_flight: float, current: int, target: int) -> int:
    if in_flight <= 0:
        return 0
    if current > 0 and abs(in_flight / (current * target) - 1.0) <= TOLERANCE:
        return current
    return math.ceil(in_flight / target)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def decide(settings: Settings, observation: Observation, state: State) -> Decision:
    """Desired replicas for one look at the load, and the state for the next look."""
    s, o = settings, observation
    now, current = o.now, o.current_replicas
    running = sum(p.running for p in o.samples)
    waiting = sum(p.waiting for p in o.samples)
    in_flight = running + waiting + o.held
    in_flight_count = math.ceil(in_flight)

    woken = current > 0 and state.desired_replicas == 0
    loading = current > 0 and o.ready_replicas == 0
    busy = in_flight > 0 or _traffic_seen(o.samples, state.request_counts)
    last_active = state.last_active if state.last_active is not None else now
    if busy or woken or loading:
        last_active = now
    idle_for = now - last_active

    # Missing metrics: idle when that would scale up, at target when that would scale down.
    rec_up = _recommend(in_flight, current, s.target_in_flight_per_replica)
    rec_down = _recommend(
        in_flight + o.unreachable * s.target_in_flight_per_replica, current, s.target_in_flight_per_replica
    )
    raw = rec_up if rec_up > current else max(rec_up, min(rec_down, current))
    # The history never holds 0: zero is the idle clock's decision, not a window's.
    recommendation = _clamp(raw, max(s.min_replicas, 1), s.max_replicas)
    keep = max(s.scale_up_window_seconds, s.scale_down_window_seconds)
    # No history yet (first look, or autoscaling just turned on): the replicas as they are
    # stand for the recommendations before now, so the first look cannot jump.
    seed = state.recommendations or ((now, _clamp(current, max(s.min_replicas, 1), s.max_replicas)),)
    history = _record(seed, now, recommendation, keep)

    up_to = min(_window(history, now, s.scale_up_window_seconds))
    down_to = max(_window(history, now, s.scale_down_window_seconds))
    if current < up_to:
        desired = up_to
    elif current > down_to:
        desired = down_to
    else:
        desired = current
    desired = _clamp(desired, s.min_replicas, s.max_replicas)

    to_zero = (
        s.min_replicas == 0
        and in_flight == 0
        and not loading
        and not woken
        and idle_for >= s.scale_to_zero_after_seconds
    )
    if to_zero:
        desired = 0
    elif current == 0 and in_flight > 0:
        # Asleep with demand the gateway reported but did not (yet) act on: wake.
        desired = max(desired, 1)
    elif current == 0:
        desired = 0 if s.min_replicas == 0 else desired

    if desired > current:
        reason = "ScaledUp"
    elif desired < current:
        reason = "ScaledToZero" if desired == 0 else "ScaledDown"
    elif woken:
        reason = "Woken"
    else:
        reason = "Unchanged"

    pods = len(o.samples) + o.unreachable
    parts = [
        f"in flight {in_flight:g} (running {running:g}, waiting {waiting:g}, held in gateway {o.held})"
        f" on {pods} ready pod{'s' if pods != 1 else ''}",
        f"target {s.target_in_flight_per_replica}/replica -> recommends {recommendation}",
        f"windows: up {s.scale_up_window_seconds:g}s min {up_to}, down {s.scale_down_window_seconds:g}s max {down_to}",
    ]
    if o.unreachable:
        parts.append(f"{o.unreachable} pod{'s' if o.unreachable != 1 else ''} without metrics counted at target")
    if s.min_replicas == 0:
        parts.append(f"idle {idle_for:.0f}s of {s.scale_to_zero_after_seconds:g}s before zero")
    if woken:
        parts.append("woken by a request")
    message = f"replicas {current} -> {desired}: " + "; ".join(parts)

    counts = {p.pod: p.finished for p in o.samples if p.finished is not None}
    return Decision(
        replicas=desired,
        previous=current,
        reason=reason,
        message=message,
        in_flight=in_flight_count,
        recommendation=recommendation,
        state=State(
            desired_replicas=desired,
            last_active=last_active,
            recommendations=history,
            request_counts=counts,
        ),
    )


def persisted_differs(before: State, after: State, settings: Settings) -> bool:
    """Whether status.autoscaling must be written: the decision or the windows changed, or
    the stored scale-to-zero clock lags by more than a twentieth of scaleToZeroAfterSeconds
    (so steady traffic does not write status on every look)."""
    if before.desired_replicas != after.desired_replicas:
        return True
    if [(int(t), r) for t, r in before.recommendations] != [(int(t), r) for t, r in after.recommendations]:
        return True
    if after.last_active is None:
        return False
    if before.last_active is None:
        return True
    quantum = max(1.0, settings.scale_to_zero_after_seconds / 20)
    return after.last_active - before.last_active >= quantum
