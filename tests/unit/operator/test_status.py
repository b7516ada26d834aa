"""Status conditions and Events a model owner reads in `kubectl describe lld`."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from argosy_operator.status import (
    PlacementFailure,
    PodView,
    RolloutView,
    StatusInputs,
    compute_status,
    pod_view,
    rollout_view,
    status_patch,
    transition_events,
)

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"
PLACEMENT = {"tensorParallelSize": 1, "pipelineParallelSize": 1, "gpusPerPod": 1, "podsPerReplica": 1,
             "gpuProduct": "NVIDIA-L4", "weightsGiB": 2.3, "kvCacheTokens": 100000, "maxConcurrency": 3.1,
             "reason": "1 x NVIDIA-L4 is the smallest footprint"}
DONE = RolloutView(generation=2, observed_generation=2, replicas=2, updated_replicas=2, available_replicas=2)
BASE = StatusInputs(name="m", generation=3, desired_replicas=2, served_model_names=("m",),
                    selector="argosy.dev/deployment=m,argosy.dev/role=server", now=T0,
                    placement=PLACEMENT, deployment=DONE,
                    pods=(PodView("m-a", ready=True), PodView("m-b", ready=True)))


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(("changes", "expected"), [
    pytest.param({}, {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                      "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")},
                 id="all ready"),
    pytest.param({"deployment": None, "pods": ()},
                 {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "Creating"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")}, id="just created"),
    pytest.param({"pods": (PodView("m-a", ready=True), PodView("m-b", ready=False))},
                 {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "WaitingForReadiness"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")}, id="loading"),
    pytest.param({"deployment": dataclasses.replace(DONE, generation=3)},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("True", "RollingOut"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")},
                 id="spec change not yet seen by the Deployment controller"),
    pytest.param({"desired_replicas": 3},
                 {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "ScalingUp"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")}, id="scaled up"),
    pytest.param({"desired_replicas": 1},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("True", "ScalingDown"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")}, id="scaled down"),
    pytest.param({"desired_replicas": 0, "pods": (), "deployment": dataclasses.replace(
        DONE, replicas=0, updated_replicas=0, available_replicas=0)},
                 {"Ready": ("False", "ScaledToZero"), "Progressing": ("False", "RolloutComplete"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")}, id="zero"),
    pytest.param({"placement": None, "deployment": None, "pods": (),
                  "placement_failure": PlacementFailure("InsufficientGpuMemory", "needs 756 GiB")},
                 {"Ready": ("False", "PlacementFailed"), "Progressing": ("False", "PlacementFailed"),
                  "Degraded": ("True", "PlacementFailed"),
                  "PlacementFound": ("False", "InsufficientGpuMemory")}, id="impossible"),
    pytest.param({"pods": (PodView("m-a", ready=True),
                           PodView("m-b", ready=False, unschedulable="0/9 nodes are available"))},
                 {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "WaitingForReadiness"),
                  "Degraded": ("True", "Unschedulable"), "PlacementFound": ("True", "Placed")},
                 id="no room for a pod"),
    pytest.param({"pods": (PodView("m-a", ready=False, failing="CrashLoopBackOff: back-off"),
                           PodView("m-b", ready=True))},
                 {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "WaitingForReadiness"),
                  "Degraded": ("True", "ContainerFailing"), "PlacementFound": ("True", "Placed")},
                 id="crash loop"),
    pytest.param({"deployment": dataclasses.replace(DONE, replicas=3, updated_replicas=1),
                  "pods": (PodView("m-a", ready=True), PodView("m-b", ready=True), PodView("m-c", ready=False))},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("True", "RollingOut"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")},
                 id="old pods still serve during a rollout"),
    pytest.param({"apply_error": "writing children failed: 403 Forbidden"},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                  "Degraded": ("True", "ApplyFailed"), "PlacementFound": ("True", "Placed")}, id="rbac"),
    pytest.param({"conflicts": ("Deployment m exists but is controlled by another object",)},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                  "Degraded": ("True", "ChildConflict"), "PlacementFound": ("True", "Placed")}, id="name clash"),
    pytest.param({"capacity_problem": "2 of 2 pods cannot be rescheduled: pool NVIDIA-L4 (22 GiB GPUs) cordoned"},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                  "Degraded": ("True", "PoolUnavailable"), "PlacementFound": ("True", "Placed")},
                 id="pool cordoned: still serving, degraded"),
    pytest.param({"placement_failure": PlacementFailure("NoMatchingGpus", "No Ready GPU nodes match"),
                  "kept_workload": True},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "PlacementFailed"),
                  "Degraded": ("True", "PlacementFailed"), "PlacementFound": ("False", "NoMatchingGpus")},
                 id="new spec cannot be placed: the old pods serve on"),
    pytest.param({"pods": (PodView("m-a", ready=True), PodView("m-b", ready=True),
                           PodView("m-old", ready=True, terminating=True))},
                 {"Ready": ("True", "ReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                  "Degraded": ("False", "Healthy"), "PlacementFound": ("True", "Placed")},
                 id="terminating pod ignored"),
])
def test_conditions(changes: dict[str, Any], expected: dict[str, tuple[str, str]]) -> None:
    status = compute_status(dataclasses.replace(BASE, **changes), None)
    assert conditions(status) == expected
    for c in status["conditions"]:
        assert c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 and c["message"]


def test_status_fields() -> None:
    status = compute_status(dataclasses.replace(
        BASE, pods=(PodView("a", ready=True), PodView("b", ready=False), PodView("c", ready=True,
                                                                               terminating=True))), None)
    assert status["observedGeneration"] == 3
    assert (status["replicas"], status["readyReplicas"]) == (2, 1)
    assert status["selector"] == "argosy.dev/deployment=m,argosy.dev/role=server"
    assert status["servedModelNames"] == ["m"]
    assert status["placement"] == PLACEMENT
    failed = compute_status(dataclasses.replace(
        BASE, placement=None, placement_failure=PlacementFailure("X", "y")), None)
    assert "placement" not in failed


def test_placement_failure_message_reaches_the_conditions() -> None:
    status = compute_status(dataclasses.replace(
        BASE, placement=None, placement_failure=PlacementFailure("InsufficientGpuMemory", "try H100")), None)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["PlacementFound"]["message"] == "try H100"
    assert by_type["Ready"]["message"] == "try H100"


def test_a_kept_workload_says_it_keeps_serving() -> None:
    placement = {**PLACEMENT, "maxModelLen": 4096, "plannedFor": {
        "generation": 2, "specHash": "abc", "gpusPerNode": 1, "gpuMemoryMiB": 23034}}
    status = compute_status(dataclasses.replace(
        BASE, placement=placement, kept_workload=True,
        placement_failure=PlacementFailure("NoMatchingGpus", "No Ready GPU nodes match spec.gpu.products.")), None)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["PlacementFound"]["message"].startswith("No Ready GPU nodes match spec.gpu.products.")
    assert "keep running with the earlier placement planned for generation 2" in by_type["Degraded"]["message"]
    assert status["placement"] == placement


def test_status_is_built_through_the_crd_status_model() -> None:
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        compute_status(dataclasses.replace(BASE, placement={**PLACEMENT, "tensorParallelSize": 0}), None)
    status = compute_status(BASE, None)
    assert status["conditions"][0]["lastTransitionTime"] == T0  # RFC 3339 in, the same string out


def test_transition_time_moves_only_when_status_flips() -> None:
    first = compute_status(BASE, None)
    loading = dataclasses.replace(BASE, now=T1, pods=(PodView("m-a", ready=True), PodView("m-b", ready=False)))
    second = compute_status(loading, first)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0, "PlacementFound": T0}


def test_status_patch_writes_only_changes_and_removes_stale_keys() -> None:
    first = compute_status(BASE, None)
    assert status_patch(first, compute_status(dataclasses.replace(BASE, now=T1), first)) is None
    failed = compute_status(dataclasses.replace(
        BASE, placement=None, placement_failure=PlacementFailure("X", "y")), first)
    patch = status_patch(first, failed)
    assert patch is not None
    assert patch["status"]["placement"] is None
    assert "selector" not in patch["status"]
    assert status_patch(None, first) == {"status": first}


def test_status_patch_nulls_keys_that_vanish_inside_the_placement() -> None:
    planned = {**PLACEMENT, "maxModelLen": 4096, "plannedFor": {
        "generation": 2, "specHash": "abc", "replanRequest": "1", "gpusPerNode": 1, "gpuMemoryMiB": 23034}}
    before = compute_status(dataclasses.replace(BASE, placement=planned), None)
    replanned = {**planned, "plannedFor": {**planned["plannedFor"], "generation": 3}}
    del replanned["plannedFor"]["replanRequest"]
    after = compute_status(dataclasses.replace(BASE, placement=replanned), before)
    patch = status_patch(before, after)
    assert patch == {"status": {"placement": {"plannedFor": {"generation": 3, "replanRequest": None}}}}


def test_events_on_transitions() -> None:
    assert [(e.type, e.reason) for e in transition_events(None, compute_status(BASE, None)["conditions"])] == [
        ("Normal", "ReplicasReady")]
    ready = compute_status(BASE, None)
    crashing = compute_status(dataclasses.replace(
        BASE, pods=(PodView("m-a", ready=False, failing="CrashLoopBackOff: x"), PodView("m-b", ready=True))),
        ready)
    events = transition_events(ready["conditions"], crashing["conditions"])
    assert sorted((e.type, e.reason) for e in events) == [
        ("Normal", "WaitingForReadiness"), ("Warning", "ContainerFailing"), ("Warning", "ReplicasNotReady")]
    assert transition_events(ready["conditions"], compute_status(BASE, ready)["conditions"]) == []
    # A new object's first pass, then the pass that sees its pods ready: one Event, Ready's (the
    # rollout completing is the same fact); a later rollout ending while Ready stays True has its own.
    creating = compute_status(dataclasses.replace(BASE, pods=(), deployment=None), None)
    assert transition_events(None, creating["conditions"]) == []
    assert [e.reason for e in transition_events(creating["conditions"], compute_status(BASE, creating)["conditions"])] \
        == ["ReplicasReady"]
    rolling = [{**c, "status": "True", "reason": "RollingOut"} if c["type"] == "Progressing" else c
               for c in ready["conditions"]]
    assert [e.reason for e in transition_events(rolling, ready["conditions"])] == ["RolloutComplete"]
    impossible = compute_status(dataclasses.replace(
        BASE, placement=None, placement_failure=PlacementFailure("InsufficientGpuMemory", "no")), None)
    assert sorted((e.type, e.reason) for e in transition_events(None, impossible["conditions"])) == [
        ("Warning", "InsufficientGpuMemory"), ("Warning", "PlacementFailed")]


def test_pod_view_reads_readiness_scheduling_and_failures() -> None:
    pending = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/9 nodes are available: 9 Insufficient nvidia.com/gpu."}]}})
    assert pending == PodView("p", ready=False,
                              unschedulable="0/9 nodes are available: 9 Insufficient nvidia.com/gpu.")
    crashing = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Running", "containerStatuses": [
        {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m"}}}]}})
    assert crashing.failing == "CrashLoopBackOff: back-off 5m"
    ready = pod_view({"metadata": {"name": "p", "deletionTimestamp": "x"}, "status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert ready.ready and ready.terminating


def test_rollout_view_reads_deadline() -> None:
    view = rollout_view({"metadata": {"generation": 4}, "status": {
        "observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}})
    assert view == RolloutView(4, 3, 2, 1, 1, deadline_exceeded=True)


def test_status_patch_leaves_the_autoscalers_state_alone() -> None:
    first = compute_status(BASE, None)
    with_autoscaler = {**first, "autoscaling": {"desiredReplicas": 0, "recommendations": [[1, 1]]}}
    # The reconcile computes no autoscaling key; its patch must not remove the autoscaler's.
    assert status_patch(with_autoscaler, first) is None


@pytest.mark.parametrize(("workload", "expected"), [
    pytest.param(DONE, "the new spec is reaching the Deployment", id="Deployment"),
    pytest.param(dataclasses.replace(DONE, workload="the StatefulSets"), "the new spec is reaching the StatefulSets",
                 id="groups"),
])
def test_progressing_names_the_workload_that_picks_up_a_spec_change(workload: RolloutView, expected: str) -> None:
    changed = dataclasses.replace(workload, generation=3)
    (progressing,) = (c for c in compute_status(dataclasses.replace(BASE, deployment=changed), None)["conditions"]
                      if c["type"] == "Progressing")
    assert (progressing["reason"], progressing["message"]) == ("RollingOut", expected)
