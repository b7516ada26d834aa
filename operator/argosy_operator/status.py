"""The LLMDeployment status of one reconcile pass, and the Events its transitions deserve.

Pure: everything the status depends on (placement, the cached Deployment and pods,
the outcome of the apply step, the clock) comes in as values. The status is built
through api.LLMDeploymentStatus, the model the CRD's status schema is generated from,
so what is written is what the schema promises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from argosy_operator.api import Condition, GroupStatus, LLMDeploymentStatus, PlacementStatus

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
PLACEMENT_FOUND = "PlacementFound"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, PLACEMENT_FOUND)

# Container states that will not heal by waiting; they make the deployment Degraded.
FAILING_WAITING_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


@dataclasses.dataclass(frozen=True)
class PodView:
    """What the status needs to know about one serving pod."""

    name: str
    ready: bool
    terminating: bool = False
    unschedulable: str | None = None
    """The scheduler's message when it could not place the pod."""
    failing: str | None = None
    """`Reason: message` of a container stuck in a failing state."""


@dataclasses.dataclass(frozen=True)
class RolloutView:
    """The cached Deployment, reduced to what decides Progressing."""

    generation: int
    observed_generation: int
    replicas: int
    updated_replicas: int
    available_replicas: int
    deadline_exceeded: bool = False
    workload: str = "the Deployment"
    """What runs the replicas, as the messages name it ("the StatefulSets" for groups)."""


@dataclasses.dataclass(frozen=True)
class PlacementFailure:
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class StatusInputs:
    name: str
    generation: int
    desired_replicas: int
    served_model_names: tuple[str, ...]
    selector: str
    now: str
    """RFC 3339 timestamp used as lastTransitionTime of conditions that change now."""
    placement: Mapping[str, Any] | None = None
    """status.placement: the placement the children use (kept or new), with what it was planned for."""
    placement_failure: PlacementFailure | None = None
    kept_workload: bool = False
    """A serving Deployment from an earlier placement runs on although no placement is found now."""
    capacity_problem: str | None = None
    """Why some pods of the kept placement could not be scheduled again (cordon, NotReady, pool gone)."""
    deployment: RolloutView | None = None
    pods: tuple[PodView, ...] = ()
    apply_error: str | None = None
    conflicts: tuple[str, ...] = ()
    groups: tuple[Mapping[str, Any], ...] = ()
    """status.groups: one entry per replica that spans nodes (groups.py)."""
    group_restart: str | None = None
    """A group restarted after a member failed and is not Ready yet."""


@dataclasses.dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def pod_view(pod: Mapping[str, Any]) -> PodView:
    """Reduce a Pod object to a PodView."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    ready = conditions.get("Ready", {}).get("status") == "True"
    scheduled = conditions.get("PodScheduled", {})
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = str(scheduled.get("message") or "no node fits the pod")
    failing = None
    for cs in status.get("containerStatuses") or ():
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_WAITING_REASONS:
            failing = f"{waiting['reason']}: {waiting.get('message') or 'see the pod events'}"
            break
    return PodView(
        name=str(meta.get("name", "")),
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")) or status.get("phase") in ("Succeeded", "Failed"),
        unschedulable=unschedulable,
        failing=failing,
    )


def rollout_view(deployment: Mapping[str, Any]) -> RolloutView:
    """Reduce a Deployment object to a RolloutView."""
    status = deployment.get("status") or {}
    deadline = any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or ()
    )
    return RolloutView(
        generation=int((deployment.get("metadata") or {}).get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        replicas=int(status.get("replicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        deadline_exceeded=deadline,
    )


def _condition(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message}


def _replica_phrase(ready: int, desired: int) -> str:
    return f"{ready}/{desired} replicas ready"


def _failure_message(inputs: StatusInputs) -> str:
    assert inputs.placement_failure is not None
    message = inputs.placement_failure.message
    if inputs.kept_workload:
        basis = (inputs.placement or {}).get("plannedFor") or {}
        planned = f" planned for generation {basis['generation']}" if basis.get("generation") is not None else ""
        message += (f" The serving pods keep running with the earlier placement{planned}; "
                    "nothing is deleted because of this.")
    return message


def _degraded(inputs: StatusInputs, live: Sequence[PodView]) -> dict[str, Any]:
    if inputs.conflicts:
        return _condition(DEGRADED, True, "ChildConflict", "; ".join(inputs.conflicts))
    if inputs.apply_error:
        return _condition(DEGRADED, True, "ApplyFailed", inputs.apply_error)
    if inputs.placement_failure is not None:
        return _condition(DEGRADED, True, "PlacementFailed", _failure_message(inputs))
    if inputs.group_restart:
        return _condition(DEGRADED, True, "GroupRestarted", inputs.group_restart)
    failing = [p for p in live if p.failing]
    if failing:
        p = failing[0]
        more = f" (and {len(failing) - 1} more pods)" if len(failing) > 1 else ""
        return _condition(DEGRADED, True, "ContainerFailing", f"pod {p.name}: {p.failing}{more}")
    if inputs.capacity_problem:
        return _condition(DEGRADED, True, "PoolUnavailable", inputs.capacity_problem)
    unschedulable = [p for p in live if p.unschedulable]
    if unschedulable:
        p = unschedulable[0]
        more = f" (and {len(unschedulable) - 1} more pods)" if len(unschedulable) > 1 else ""
        return _condition(DEGRADED, True, "Unschedulable", f"pod {p.name}: {p.unschedulable}{more}")
    if inputs.deployment is not None and inputs.deployment.deadline_exceeded:
        return _condition(DEGRADED, True, "ProgressDeadlineExceeded",
                          "the rollout has not progressed within its deadline")
    return _condition(DEGRADED, False, "Healthy", "no problems detected")


def _progressing(inputs: StatusInputs, live: Sequence[PodView], ready: int) -> dict[str, Any]:
    desired = inputs.desired_replicas
    if inputs.placement_failure is not None:
        return _condition(PROGRESSING, False, "PlacementFailed",
                          "the serving pods keep their earlier placement; nothing rolls out until a placement "
                          "is found" if inputs.kept_workload else "no workload runs until a placement is found")
    d = inputs.deployment
    if d is None:
        return _condition(PROGRESSING, True, "Creating", "creating the serving Deployment")
    if d.observed_generation < d.generation:
        return _condition(PROGRESSING, True, "RollingOut", f"the new spec is reaching {d.workload}")
    if d.replicas > d.updated_replicas:
        return _condition(PROGRESSING, True, "RollingOut",
                          f"{min(d.updated_replicas, desired)}/{desired} replicas run the current spec")
    if len(live) > desired or d.replicas > desired:
        return _condition(PROGRESSING, True, "ScalingDown", f"scaling down to {desired} replicas")
    if len(live) < desired or d.updated_replicas < desired:
        return _condition(PROGRESSING, True, "ScalingUp", f"{len(live)}/{desired} replicas created")
    if ready < desired or d.available_replicas < desired:
        return _condition(PROGRESSING, True, "WaitingForReadiness",
                          f"{_replica_phrase(ready, desired)}; waiting for the model to load")
    return _condition(PROGRESSING, False, "RolloutComplete", f"all {desired} replicas run the current spec")


def _ready(inputs: StatusInputs, ready: int) -> dict[str, Any]:
    desired = inputs.desired_replicas
    if inputs.placement_failure is not None and not inputs.kept_workload:
        return _condition(READY, False, "PlacementFailed", inputs.placement_failure.message)
    if desired == 0:
        return _condition(READY, False, "ScaledToZero", "spec.replicas is 0")
    if ready >= desired:
        return _condition(READY, True, "ReplicasReady", _replica_phrase(ready, desired))
    return _condition(READY, False, "ReplicasNotReady", _replica_phrase(ready, desired))


def _placement_found(inputs: StatusInputs) -> dict[str, Any]:
    if inputs.placement_failure is not None:
        return _condition(PLACEMENT_FOUND, False, inputs.placement_failure.reason, _failure_message(inputs))
    reason = str((inputs.placement or {}).get("reason") or "placement computed")
    return _condition(PLACEMENT_FOUND, True, "Placed", reason)


def compute_status(inputs: StatusInputs, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The whole status object for this pass.

    lastTransitionTime moves only when a condition's status flips, so a condition that
    stays True keeps the time it became True.
    """
    live = [p for p in inputs.pods if not p.terminating]
    ready = sum(1 for p in live if p.ready)
    fresh = [
        _ready(inputs, ready),
        _progressing(inputs, live, ready),
        _degraded(inputs, live),
        _placement_found(inputs),
    ]
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or ()}
    conditions = []
    for cond in fresh:
        before = old.get(cond["type"])
        unchanged = before is not None and before.get("status") == cond["status"]
        since = before.get("lastTransitionTime") if before is not None and unchanged else None
        conditions.append({
            **cond,
            "lastTransitionTime": since or inputs.now,
            "observedGeneration": inputs.generation,
        })
    return LLMDeploymentStatus(
        observed_generation=inputs.generation,
        replicas=len(live),
        ready_replicas=ready,
        selector=inputs.selector,
        served_model_names=list(inputs.served_model_names),
        conditions=[Condition.model_validate(c) for c in conditions],
        placement=PlacementStatus.model_validate(inputs.placement) if inputs.placement is not None else None,
        groups=[GroupStatus.model_validate(g) for g in inputs.groups],
    ).to_api()


def _merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) from `old` to `new`: nested objects merge, so a key
    that disappears inside one (status.placement.plannedFor.replanRequest) must be sent as null."""
    changes: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if key in old and before == value:
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            changes[key] = _merge_diff(before, value)
        else:
            changes[key] = value
    changes.update({key: None for key in old if key not in new})
    return changes


def status_patch(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch body that turns `previous` into `new`, or None when they are equal."""
    previous = previous or {}
    # Keys another writer owns (status.autoscaling) are never removed by the reconcile.
    kept = {k: v for k, v in previous.items() if k in WRITTEN_ELSEWHERE}
    changes = _merge_diff(previous, {**kept, **new})
    return {"status": changes} if changes else None


# status keys another writer owns: the reconcile never removes them.
WRITTEN_ELSEWHERE = frozenset({"autoscaling"})  # the autoscaler's (autoscaling_loop.py)


def _is_bad(cond: Mapping[str, Any]) -> bool:
    ctype, status = cond.get("type"), cond.get("status")
    return (
        (ctype == PLACEMENT_FOUND and status == "False")
        or (ctype == DEGRADED and status == "True")
        or (ctype == READY and status == "False")
    )


def transition_events(
    previous: Sequence[Mapping[str, Any]] | None, new: Sequence[Mapping[str, Any]]
) -> list[EventSpec]:
    """Events for conditions that flipped (and for first-time problems) in this pass.

    A rollout that ends as the replicas become ready (Progressing to False with Ready to
    True, as every new object's does) is one fact: only the Ready Event is recorded.
    """
    old = {c.get("type"): c for c in previous or ()}
    became_ready = any(c.get("type") == READY and c.get("status") == "True"
                       and (old.get(READY) or {}).get("status") != "True" for c in new)
    events: list[EventSpec] = []
    for cond in new:
        before = old.get(cond.get("type"))
        if became_ready and cond.get("type") == PROGRESSING and cond.get("reason") == "RolloutComplete":
            continue
        flipped = before is not None and before.get("status") != cond.get("status")
        first_time = before is None and (
            (_is_bad(cond) and cond.get("type") != READY)
            or (cond.get("type") == READY and cond.get("status") == "True")
        )
        new_problem = (
            before is not None and not flipped and cond.get("type") == DEGRADED
            and cond.get("status") == "True" and before.get("reason") != cond.get("reason")
        )
        if flipped or first_time or new_problem:
            events.append(EventSpec(
                type="Warning" if _is_bad(cond) else "Normal",
                reason=str(cond.get("reason")),
                message=f"{cond.get('type')}={cond.get('status')}: {cond.get('message')}",
            ))
    return events
