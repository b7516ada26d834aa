"""The lifecycle of multi-node groups: when to restart or replace one, and how each is doing (pure).

A group is one replica on several nodes: a StatefulSet whose pods are one vLLM instance
together (group_builders.py). vLLM cannot take a lost rank back, so a group is whole or
broken:

- a member that restarted, failed, was deleted or was replaced by a new pod breaks
  the group: every member is deleted and the StatefulSet starts them afresh;
- a spec change reaches the StatefulSets at once, but they use `OnDelete`: the pods
  keep running the old revision until this module replaces the group, one group at a
  time and only while every other group is Ready, so serving capacity drops by at most
  one replica;
- scaling adds or removes whole StatefulSets (the desired objects; diffplan.py deletes
  the extra ones).

Input: the desired groups, the cached StatefulSets and pods, the clock and the previous
status entries. Output: the pods to delete and why, the leaders to label, and the
per-group status. Nothing here talks to the API.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from argosy_operator import diffplan, status
from argosy_operator.builders import ANNOTATION_SERVED_MODEL_NAMES, LABEL_ROLE
from argosy_operator.group_builders import LABEL_GROUP, POD_INDEX_LABEL, ROLE_LEADER, group_name

REVISION_LABEL = "controller-revision-hash"
# Members of one start are created within seconds of each other; one this much younger
# than the rest replaced a member that was deleted.
REPLACED_SKEW_SECONDS = 60.0
# A member may be missing this long after the others were created (the StatefulSet
# creates them one API call each) before it counts as lost.
MISSING_GRACE_SECONDS = 30.0
# A group is not restarted again sooner than this after its last restart: the deletions
# of that restart reach the cache one pod at a time, and a model that crashes at start-up
# is retried at this pace instead of in a tight loop.
MIN_RESTART_INTERVAL_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class DesiredGroup:
    name: str
    index: int
    size: int
    """Pods in the group (podsPerReplica)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One observed pod of a group."""

    name: str
    uid: str
    ordinal: int
    revision: str | None
    created: datetime.datetime | None
    terminating: bool
    failed: bool
    restarts: int
    ready: bool
    role: str | None
    served_names: str | None


@dataclasses.dataclass(frozen=True)
class Restart:
    """Delete these pods of `group` (the StatefulSet creates them anew)."""

    group: str
    reason: str
    """MemberRestarted, MemberFailed, MemberLost, MemberReplaced or SpecChanged."""
    message: str
    pods: tuple[tuple[str, str], ...]
    """(name, uid) of every member still there; the uid is the delete's precondition."""


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    restarts: tuple[Restart, ...] = ()
    leaders_to_label: tuple[str, ...] = ()
    groups: tuple[dict[str, Any], ...] = ()
    """status.groups entries, in group order."""
    ready_groups: int = 0
    existing_groups: int = 0
    """Groups with at least one member that is not terminating."""
    current_groups: int = 0
    """Groups whose every member runs the StatefulSet's current revision."""
    caught_up: bool = True
    """Every StatefulSet controller has seen its latest spec."""
    retry_after: float | None = None
    """Seconds until a decision that is waiting on time (a restart held back, a missing member's grace)."""

    @property
    def restarting(self) -> str | None:
        """The message of the first group restarted now or still recovering from a restart."""
        for restart in self.restarts:
            return f"group {restart.group} restarted: {restart.message}"
        for group in self.groups:
            last = group.get("lastRestart")
            if last and not group["ready"]:
                return f"group {group['name']} restarted at {last['time']}: {last['message']}"
        return None


def _timestamp(value: object) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def member(pod: Mapping[str, Any]) -> Member | None:
    """A pod as a group member, or None when it carries no pod-index label."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    try:
        ordinal = int(labels[POD_INDEX_LABEL])
    except (KeyError, ValueError):
        name = str(meta.get("name", ""))
        tail = name.rpartition("-")[2]
        if not tail.isdigit():
            return None
        ordinal = int(tail)
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
    return Member(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        ordinal=ordinal,
        revision=labels.get(REVISION_LABEL),
        created=_timestamp(meta.get("creationTimestamp")),
        terminating=bool(meta.get("deletionTimestamp")),
        failed=status.get("phase") == "Failed",
        restarts=sum(int(cs.get("restartCount") or 0) for cs in status.get("containerStatuses") or ()),
        ready=conditions.get("Ready") == "True",
        role=labels.get(LABEL_ROLE),
        served_names=(meta.get("annotations") or {}).get(ANNOTATION_SERVED_MODEL_NAMES),
    )


def _age(m: Member, now: datetime.datetime) -> float:
    return (now - m.created).total_seconds() if m.created else float("inf")


def _breakage(
    size: int, members: Sequence[Member], now: datetime.datetime
) -> tuple[str, str] | float | None:
    """Why a group is broken, seconds to wait before deciding, or None when it is whole."""
    live = [m for m in members if not m.terminating]
    if not live:
        return None  # nothing runs: a (re)start is under way
    failed = [m for m in live if m.failed]
    if failed:
        return "MemberFailed", f"pod {failed[0].name} failed"
    restarted = [m for m in live if m.restarts > 0]
    if restarted:
        m = restarted[0]
        return "MemberRestarted", f"pod {m.name} restarted ({m.restarts} container restarts)"
    gone = [m for m in members if m.terminating]
    if gone:
        return "MemberLost", f"pod {gone[0].name} is being deleted"
    present = {m.ordinal for m in live}
    missing = [o for o in range(size) if o not in present]
    if missing:
        waited = min(_age(m, now) for m in live)
        if waited < MISSING_GRACE_SECONDS:
            return MISSING_GRACE_SECONDS - waited
        return "MemberLost", f"member {missing[0]} of {size} is missing"
    created = [m.created for m in live if m.created]
    if created and (max(created) - min(created)).total_seconds() > REPLACED_SKEW_SECONDS:
        newest = max(live, key=lambda m: m.created or now)
        return "MemberReplaced", f"pod {newest.name} was replaced after the group started"
    return None


def _delete_all(group: str, members: Iterable[Member], reason: str, message: str) -> Restart:
    pods = tuple((m.name, m.uid) for m in sorted(members, key=lambda m: m.ordinal) if not m.terminating)
    return Restart(group=group, reason=reason, message=message, pods=pods)


def plan_groups(
    desired: Sequence[DesiredGroup],
    statefulsets: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    served_names: str,
    now: datetime.datetime,
    previous: Iterable[Mapping[str, Any]] = (),
) -> GroupPlan:
    """Decide restarts, leader labels and per-group status for one LLMDeployment's groups.

    `served_names` is the JSON list the leaders must carry; `previous` the status.groups
    entries of the last pass (their restart history carries over).
    """
    by_name = {str(s["metadata"]["name"]): s for s in statefulsets}
    members: dict[str, list[Member]] = {}
    for pod in pods:
        group = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_GROUP)
        m = member(pod)
        if group and m is not None:
            members.setdefault(str(group), []).append(m)
    history = {str(g.get("name")): g for g in previous}

    restarts: list[Restart] = []
    leaders: list[str] = []
    entries: list[dict[str, Any]] = []
    waits: list[float] = []
    outdated: list[tuple[DesiredGroup, list[Member]]] = []
    ready_groups = current_groups = existing_groups = 0
    caught_up = True
    for group in desired:
        sts = by_name.get(group.name)
        found = members.get(group.name, [])
        live = [m for m in found if not m.terminating]
        update_revision = ((sts or {}).get("status") or {}).get("updateRevision")
        sts_caught_up = sts is not None and int(((sts.get("status") or {}).get("observedGeneration")) or 0) >= int(
            (sts.get("metadata") or {}).get("generation") or 0
        )
        caught_up = caught_up and (sts is None or sts_caught_up)  # a missing one is being created
        current = (
            sts_caught_up
            and bool(update_revision)
            and len(live) == group.size
            and all(m.revision == update_revision for m in live)
        )
        ready = len(live) == group.size and all(m.ready for m in live)
        entry: dict[str, Any] = {
            "name": group.name,
            "pods": group.size,
            "readyPods": sum(1 for m in live if m.ready),
            "ready": ready,
            "upToDate": current,
        }
        last = history.get(group.name, {})
        if last.get("restarts"):
            entry["restarts"] = int(last["restarts"])
        if last.get("lastRestart"):
            entry["lastRestart"] = dict(last["lastRestart"])

        broken = _breakage(group.size, found, now)
        if isinstance(broken, float):
            waits.append(broken)
        elif broken is not None:
            since = _since_last_restart(entry, now)
            if since < MIN_RESTART_INTERVAL_SECONDS:
                # The last restart's deletions may still be arriving in the cache, or the
                # model fails at start-up again: decide once the interval is over.
                waits.append(MIN_RESTART_INTERVAL_SECONDS - since)
            else:
                reason, message = broken
                message += "; vLLM cannot recover a lost member, so every pod of the group starts again"
                restarts.append(_delete_all(group.name, found, reason, message))
                entry["ready"] = False
                _record_restart(entry, reason, message, now)
        elif not current and sts_caught_up and update_revision and live:
            outdated.append((group, found))

        leader = next((m for m in live if m.ordinal == 0), None)
        if leader is not None and (leader.role != ROLE_LEADER or leader.served_names != served_names):
            leaders.append(leader.name)
        ready_groups += entry["ready"]
        current_groups += current
        existing_groups += bool(live)
        entries.append(entry)

    # One spec-change replacement at a time, and only while every group serves.
    if outdated and not restarts and ready_groups == len(desired):
        group, found = outdated[0]
        message = "the spec changed; groups are replaced one at a time"
        restarts.append(_delete_all(group.name, found, "SpecChanged", message))
        entry = next(e for e in entries if e["name"] == group.name)
        entry["ready"] = False
        ready_groups -= 1
        _record_restart(entry, "SpecChanged", message, now)
    return GroupPlan(
        restarts=tuple(restarts),
        leaders_to_label=tuple(leaders),
        groups=tuple(entries),
        ready_groups=ready_groups,
        existing_groups=existing_groups,
        current_groups=current_groups,
        caught_up=caught_up,
        retry_after=min(waits) if waits else None,
    )


def _since_last_restart(entry: Mapping[str, Any], now: datetime.datetime) -> float:
    last = _timestamp((entry.get("lastRestart") or {}).get("time"))
    return (now - last).total_seconds() if last else float("inf")


def observed_group_refs(children: Iterable[Mapping[str, Any]]) -> frozenset[diffplan.ChildRef]:
    """The StatefulSets and headless Services of the groups among the observed children."""
    return frozenset(
        diffplan.ref_of(c)
        for c in children
        if c.get("kind") in ("StatefulSet", "Service")
        and LABEL_GROUP in ((c.get("metadata") or {}).get("labels") or {})
    )


def desired_groups(deployment: str, replicas: int, size: int) -> list[DesiredGroup]:
    """The groups `replicas` replicas of `size` pods each are."""
    return [DesiredGroup(group_name(deployment, index), index, size) for index in range(replicas)]


def rollout_view(plan: GroupPlan, desired: int) -> status.RolloutView:
    """The groups as the status code sees a Deployment: one replica per group."""
    return status.RolloutView(
        generation=1,
        observed_generation=1 if plan.caught_up else 0,
        replicas=plan.existing_groups,
        updated_replicas=min(plan.current_groups, desired),
        available_replicas=plan.ready_groups,
        workload="the StatefulSets" if plan.existing_groups != 1 else "the StatefulSet",
    )


def replica_views(plan: GroupPlan, pods: Iterable[Mapping[str, Any]]) -> tuple[status.PodView, ...]:
    """One view per group (a replica), carrying the first member problem the status should name."""
    members: dict[str, list[status.PodView]] = {}
    for pod in pods:
        group = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_GROUP)
        if group:
            members.setdefault(str(group), []).append(status.pod_view(pod))
    views = []
    for entry in plan.groups:
        found = [m for m in members.get(entry["name"], []) if not m.terminating]
        views.append(status.PodView(
            name=entry["name"],
            ready=bool(entry["ready"]),
            terminating=not found,  # a group with no member running is not a replica that exists
            unschedulable=next((m.unschedulable for m in found if m.unschedulable), None),
            failing=next((m.failing for m in found if m.failing), None),
        ))
    return tuple(views)


def restart_events(plan: GroupPlan) -> list[status.EventSpec]:
    return [
        status.EventSpec("Warning", "GroupRestarted", f"group {r.group} restarted: {r.message}")
        for r in plan.restarts
    ]


def _record_restart(entry: dict[str, Any], reason: str, message: str, now: datetime.datetime) -> None:
    entry["restarts"] = int(entry.get("restarts") or 0) + 1
    entry["lastRestart"] = {
        "reason": reason,
        "message": message,
        "time": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
