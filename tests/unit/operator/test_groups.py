"""Group lifecycle decisions, table-driven: what the operator does to a group given what it sees."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from argosy_operator.groups import DesiredGroup, GroupPlan, plan_groups, rollout_view

NOW = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.UTC)
NAMES = json.dumps(["llama-405b"])
REV_OLD, REV_NEW = "g0-6d4f", "g0-8b9c"


def _ts(seconds_ago: float) -> str:
    return (NOW - datetime.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    group: str,
    ordinal: int,
    *,
    age: float = 600,
    ready: bool = True,
    restarts: int = 0,
    phase: str = "Running",
    deleting: bool = False,
    revision: str = REV_OLD,
    leader: bool | None = None,
) -> dict[str, Any]:
    labelled_leader = ordinal == 0 if leader is None else leader
    labels = {
        "argosy.dev/deployment": "llama-405b",
        "argosy.dev/group": group,
        "argosy.dev/role": "leader" if labelled_leader else "worker",
        "apps.kubernetes.io/pod-index": str(ordinal),
        "controller-revision-hash": revision,
    }
    meta: dict[str, Any] = {
        "name": f"{group}-{ordinal}",
        "uid": f"uid-{group}-{ordinal}-{age}",
        "labels": labels,
        "creationTimestamp": _ts(age),
        "annotations": {"argosy.dev/served-model-names": NAMES} if labelled_leader else {},
    }
    if deleting:
        meta["deletionTimestamp"] = _ts(1)
    return {
        "metadata": meta,
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "vllm", "restartCount": restarts}],
        },
    }


def sts(group: str, *, revision: str = REV_OLD, generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {
        "kind": "StatefulSet",
        "metadata": {"name": group, "generation": generation},
        "status": {"observedGeneration": observed, "updateRevision": revision},
    }


def whole(group: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [pod(group, 0, **kwargs), pod(group, 1, **kwargs)]


@dataclass(frozen=True)
class Case:
    id: str
    pods: list[dict[str, Any]]
    statefulsets: list[dict[str, Any]] = field(default_factory=lambda: [sts("g0"), sts("g1")])
    previous: list[dict[str, Any]] = field(default_factory=list)
    groups: int = 2
    # expected
    restart: dict[str, str] = field(default_factory=dict)
    """group -> restart reason"""
    ready: int = 2
    leaders: tuple[str, ...] = ()
    waits: bool = False


CASES = [
    Case("both-groups-serving", whole("g0") + whole("g1")),
    Case("worker-container-restarted", [*whole("g0"), pod("g1", 0), pod("g1", 1, restarts=1)],
         restart={"g1": "MemberRestarted"}, ready=1),
    Case("leader-container-restarted", [pod("g0", 0, restarts=2), pod("g0", 1), *whole("g1")],
         restart={"g0": "MemberRestarted"}, ready=1),
    Case("worker-failed", [*whole("g0"), pod("g1", 0), pod("g1", 1, phase="Failed", ready=False)],
         restart={"g1": "MemberFailed"}, ready=1),
    Case("worker-being-deleted", [*whole("g0"), pod("g1", 0), pod("g1", 1, deleting=True)],
         restart={"g1": "MemberLost"}, ready=1),
    Case("worker-gone-beyond-the-grace", [*whole("g0"), pod("g1", 0)], restart={"g1": "MemberLost"}, ready=1),
    Case("worker-not-created-yet", [*whole("g0"), pod("g1", 0, age=5, ready=False)], ready=1, waits=True),
    Case("worker-replaced-by-a-new-pod", [*whole("g0"), pod("g1", 0), pod("g1", 1, age=20, ready=False)],
         restart={"g1": "MemberReplaced"}, ready=1),
    Case("fresh-group-starting", whole("g0") + whole("g1", age=10, ready=False), ready=1),
    Case("restart-in-progress-everything-terminating", whole("g0") + whole("g1", deleting=True), ready=1),
    Case(
        "no-second-restart-within-the-interval",
        [*whole("g0"), pod("g1", 0, deleting=True), pod("g1", 1)],
        previous=[{"name": "g1", "restarts": 1, "lastRestart": {"reason": "MemberLost", "message": "x",
                                                                 "time": _ts(5)}}],
        ready=1,
        waits=True,
    ),
    Case(
        "crash-looping-group-restarts-again-after-the-interval",
        [*whole("g0"), pod("g1", 0, restarts=1, age=40), pod("g1", 1, age=40)],
        previous=[{"name": "g1", "restarts": 3, "lastRestart": {"reason": "MemberRestarted", "message": "x",
                                                                 "time": _ts(45)}}],
        restart={"g1": "MemberRestarted"},
        ready=1,
    ),
    # A spec change: both StatefulSets have a new revision; pods still run the old one.
    Case("spec-change-replaces-the-first-group", whole("g0") + whole("g1"),
         statefulsets=[sts("g0", revision=REV_NEW), sts("g1", revision=REV_NEW)],
         restart={"g0": "SpecChanged"}, ready=1),
    Case("spec-change-waits-while-the-replaced-group-starts",
         whole("g0", revision=REV_NEW, age=20, ready=False) + whole("g1"),
         statefulsets=[sts("g0", revision=REV_NEW), sts("g1", revision=REV_NEW)], ready=1),
    Case("spec-change-continues-once-the-replaced-group-is-ready",
         whole("g0", revision=REV_NEW, age=200) + whole("g1"),
         statefulsets=[sts("g0", revision=REV_NEW), sts("g1", revision=REV_NEW)],
         restart={"g1": "SpecChanged"}, ready=1),
    Case("spec-change-not-seen-by-the-controller-yet", whole("g0") + whole("g1"),
         statefulsets=[sts("g0", generation=2, observed=1), sts("g1", generation=2, observed=1)]),
    Case("failure-restart-comes-first-and-holds-the-spec-change",
         [*whole("g0"), pod("g1", 0), pod("g1", 1, restarts=1)],
         statefulsets=[sts("g0", revision=REV_NEW), sts("g1", revision=REV_NEW)],
         restart={"g1": "MemberRestarted"}, ready=1),
    # Scale: a new group is simply desired (its StatefulSet is created); a removed one is not.
    Case("scale-up-new-group-pending", whole("g0") + whole("g1"), statefulsets=[sts("g0"), sts("g1")],
         groups=3, ready=2),
    Case("scale-down-ignores-the-removed-group", whole("g0") + whole("g1"), groups=1, ready=1),
    Case("leader-not-labelled-yet", [pod("g0", 0, leader=False), pod("g0", 1), *whole("g1")],
         leaders=("g0-0",)),
]


def _plan(case: Case) -> GroupPlan:
    desired = [DesiredGroup(f"g{i}", i, 2) for i in range(case.groups)]
    return plan_groups(desired, case.statefulsets, case.pods, NAMES, NOW, case.previous)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_group_decisions(case: Case) -> None:
    plan = _plan(case)
    assert {r.group: r.reason for r in plan.restarts} == case.restart
    assert plan.ready_groups == case.ready
    assert plan.leaders_to_label == case.leaders
    assert (plan.retry_after is not None) == case.waits
    for restart in plan.restarts:
        # The whole group goes: every member still there, each with its uid as the precondition.
        expected = sorted(
            (p["metadata"]["name"], p["metadata"]["uid"])
            for p in case.pods
            if p["metadata"]["labels"]["argosy.dev/group"] == restart.group and "deletionTimestamp" not in p["metadata"]
        )
        assert sorted(restart.pods) == expected
        assert "vLLM cannot recover a lost member" in restart.message or restart.reason == "SpecChanged"


def test_status_entries_per_group_and_restart_history() -> None:
    plan = _plan(next(c for c in CASES if c.id == "crash-looping-group-restarts-again-after-the-interval"))
    g0, g1 = plan.groups
    assert g0 == {"name": "g0", "pods": 2, "readyPods": 2, "ready": True, "upToDate": True}
    assert g1["ready"] is False and g1["restarts"] == 4
    assert g1["lastRestart"]["reason"] == "MemberRestarted" and g1["lastRestart"]["time"] == "2026-12-01T10:00:00Z"
    assert plan.restarting is not None and plan.restarting.startswith("group g1 restarted: pod g1-0 restarted")


def test_a_recovering_group_keeps_reporting_its_restart_until_ready() -> None:
    history = [{"name": "g1", "restarts": 1, "lastRestart": {"reason": "MemberLost", "message": "pod g1-1 was deleted",
                                                              "time": _ts(50)}}]
    starting = _plan(Case("x", whole("g0") + whole("g1", age=40, ready=False), previous=history))
    assert starting.restarts == () and starting.restarting == (
        "group g1 restarted at " + _ts(50) + ": pod g1-1 was deleted"
    )
    recovered = _plan(Case("y", whole("g0") + whole("g1", age=40), previous=history))
    assert recovered.restarting is None and recovered.groups[1]["restarts"] == 1


def test_the_rollout_of_groups_is_named_after_their_statefulsets() -> None:
    two = _plan(next(c for c in CASES if c.id == "crash-looping-group-restarts-again-after-the-interval"))
    assert rollout_view(two, 2).workload == "the StatefulSets"
    one = _plan(Case("one", whole("g0")))
    assert rollout_view(one, 1).workload == "the StatefulSet"
