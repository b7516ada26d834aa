"""Sticky placement: a running model stays where it is until its spec changes or a user asks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from argosy_operator import sticky
from argosy_operator.api import LLMDeploymentSpec
from argosy_operator.diffplan import ChildRef, plan_children, stamped
from argosy_operator.reconcile import decide

UID = "11111111-2222-3333-4444-555555555555"
H100 = "NVIDIA-H100-80GB-HBM3"
L4 = "NVIDIA-L4"


def node(name: str, product: str, memory_mib: int, gpus: int, *, ready: bool = True, cordoned: bool = False,
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product,
                                              "nvidia.com/gpu.memory": str(memory_mib), **(labels or {})}},
        "spec": {"unschedulable": cordoned, "taints": []},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def h100(i: int, **kw: Any) -> dict[str, Any]:
    return node(f"h100-{i}", H100, 81559, 8, **kw)


def l4(i: int, **kw: Any) -> dict[str, Any]:
    return node(f"l4-{i}", L4, 23034, 1, **kw)


SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "replicas": 2}


def lld(spec: dict[str, Any], *, generation: int = 1, replan: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "namespace": "ns", "uid": UID, "generation": generation}
    if replan is not None:
        meta["annotations"] = {sticky.REPLAN_ANNOTATION: replan}
    return {"metadata": meta, "spec": spec}


def placed_on_h100() -> tuple[dict[str, Any], dict[str, Any]]:
    """The model placed on the only pool (H100); returns (Deployment, the status that recorded it)."""
    first = decide(lld(SPEC), (h100(0), h100(1)), now="2026-01-01T00:00:00Z")
    assert first.failure is None and first.placement is not None and first.placement.gpu_product == H100
    return dict(first.desired[0]), {"placement": first.placement.to_api()}


@pytest.mark.parametrize("nodes", [
    pytest.param((h100(0, cordoned=True), h100(1, cordoned=True)), id="pool cordoned"),
    pytest.param((h100(0, ready=False), h100(1, ready=False)), id="pool NotReady"),
    pytest.param((), id="pool gone"),
    pytest.param((h100(0), h100(1), l4(0), l4(1), l4(2)), id="a cheaper pool appeared"),
    pytest.param((h100(0, cordoned=True), h100(1, cordoned=True), l4(0), l4(1)),
                 id="pool cordoned while a cheaper one appeared"),
])
def test_inventory_changes_never_move_or_delete_a_placed_model(nodes: tuple[dict[str, Any], ...]) -> None:
    deployment, previous = placed_on_h100()
    d = decide(lld(SPEC), nodes, previous=previous, now="2026-01-02T00:00:00Z")
    assert d.replanned is None and d.failure is None
    assert d.desired[0] == deployment
    assert d.placement is not None and d.placement.to_api() == previous["placement"]
    # The children already running are left exactly as they are.
    live = [stamped(deployment), stamped(dict(d.desired[1]))]
    assert plan_children(UID, d.desired, live, keep=d.keep).is_noop


def test_a_fresh_model_would_take_the_cheaper_pool_so_staying_is_stickiness() -> None:
    d = decide(lld(SPEC), (h100(0), h100(1), l4(0), l4(1)))
    assert d.placement is not None and d.placement.gpu_product == L4


@pytest.mark.parametrize(("nodes", "replicas", "message"), [
    pytest.param((h100(0, cordoned=True), h100(1, cordoned=True)), 2,
                 "2 of 2 pods cannot be rescheduled: pool NVIDIA-H100-80GB-HBM3 (80 GiB GPUs) cordoned (2 nodes)",
                 id="cordoned"),
    pytest.param((h100(0, ready=False), h100(1, cordoned=True)), 2,
                 "2 of 2 pods cannot be rescheduled: pool NVIDIA-H100-80GB-HBM3 (80 GiB GPUs): 1 node cordoned, "
                 "1 NotReady", id="one NotReady one cordoned"),
    pytest.param((), 1, "1 of 1 pod cannot be rescheduled: no node of pool NVIDIA-H100-80GB-HBM3 (80 GiB GPUs) is left",
                 id="pool gone"),
    pytest.param((h100(0, cordoned=True), l4(0), l4(1)), 2, "pool NVIDIA-H100-80GB-HBM3 (80 GiB GPUs) cordoned",
                 id="another product does not help"),
    pytest.param((h100(0), h100(1)), 2, None, id="all usable"),
    pytest.param((h100(0), h100(1, cordoned=True)), 2, None, id="one 8-GPU node holds both 1-GPU pods"),
    pytest.param((h100(0, cordoned=True),), 0, None, id="scaled to zero needs nothing"),
])
def test_capacity_problem(nodes: tuple[dict[str, Any], ...], replicas: int, message: str | None) -> None:
    _, previous = placed_on_h100()
    record = sticky.recorded_placement(previous)
    assert record is not None
    problem = sticky.capacity_problem("m", record, replicas, nodes)
    if message is None:
        assert problem is None
    else:
        assert problem is not None and message in problem
        assert "kubectl annotate lld/m argosy.dev/replan=" in problem


def test_node_selector_narrows_the_nodes_that_count() -> None:
    _, previous = placed_on_h100()
    record = sticky.recorded_placement(previous)
    assert record is not None
    nodes = (h100(0, labels={"zone": "a"}), h100(1, labels={"zone": "b"}))
    assert sticky.capacity_problem("m", record, 2, nodes, {"zone": "a"}) is None
    assert "2 of 2 pods" in (sticky.capacity_problem("m", record, 2, nodes, {"zone": "c"}) or "")


@pytest.mark.parametrize(("body", "cause"), [
    pytest.param(lld(SPEC), None, id="unchanged"),
    pytest.param(lld({**SPEC, "replicas": 7}, generation=2), None, id="only scaled: not a re-plan"),
    pytest.param(lld({**SPEC, "engine": {"maxModelLen": 4096}}, generation=2), "the spec changed since generation 1",
                 id="spec changed"),
    pytest.param(lld(SPEC, replan="2026-01-02"), "re-plan requested (argosy.dev/replan=2026-01-02)",
                 id="replan annotation"),
])
def test_replan_cause(body: dict[str, Any], cause: str | None) -> None:
    _, previous = placed_on_h100()
    record = sticky.recorded_placement(previous)
    spec = LLMDeploymentSpec.model_validate(body["spec"])
    assert sticky.replan_cause(record, sticky.spec_hash(spec), sticky.replan_request(body)) == cause


def test_a_replan_request_is_consumed_once() -> None:
    _, previous = placed_on_h100()
    cordoned = (h100(0, cordoned=True), h100(1, cordoned=True), l4(0), l4(1))
    moved = decide(lld(SPEC, replan="1"), cordoned, previous=previous)
    assert moved.replanned and moved.placement is not None and moved.placement.gpu_product == L4
    assert moved.placement.planned_for is not None and moved.placement.planned_for.replan_request == "1"
    again = decide(lld(SPEC, replan="1"), cordoned, previous={"placement": moved.placement.to_api()})
    assert again.replanned is None
    # Removing the annotation is not a request either.
    assert decide(lld(SPEC), cordoned, previous={"placement": moved.placement.to_api()}).replanned is None


@pytest.mark.parametrize("previous", [
    pytest.param({}, id="no status"),
    pytest.param({"placement": {"tensorParallelSize": 1, "pipelineParallelSize": 1, "gpusPerPod": 1,
                                "podsPerReplica": 1, "gpuProduct": H100, "weightsGiB": 2.3, "kvCacheTokens": 1,
                                "maxConcurrency": 1.0}}, id="a placement without what it was planned for"),
    pytest.param({"placement": {"tensorParallelSize": "x"}}, id="a malformed placement"),
])
def test_without_a_usable_record_the_model_is_planned(previous: dict[str, Any]) -> None:
    d = decide(lld(SPEC), (l4(0), l4(1)), previous=previous)
    assert d.replanned == "first placement" and d.placement is not None and d.placement.gpu_product == L4


def test_a_spec_change_that_cannot_be_placed_keeps_the_running_deployment() -> None:
    deployment, previous = placed_on_h100()
    cordoned = (h100(0, cordoned=True), h100(1, cordoned=True))
    d = decide(lld({**SPEC, "engine": {"maxModelLen": 4096}}, generation=2), cordoned, previous=previous)
    assert d.failure is not None and d.failure.reason == "NoMatchingGpus"
    assert ChildRef("Deployment", "m") in d.keep
    assert d.placement is not None and d.placement.to_api() == previous["placement"]
    running = stamped(deployment)
    running["metadata"] = {**copy.deepcopy(running["metadata"]), "uid": "child"}
    plan = plan_children(UID, d.desired, [running], keep=d.keep)
    assert not plan.delete and all(s.ref.kind != "Deployment" for s in plan.apply)


def test_spec_change_replans_onto_the_best_pool_now() -> None:
    _, previous = placed_on_h100()
    d = decide(lld({**SPEC, "engine": {"maxModelLen": 4096}}, generation=2), (h100(0), l4(0), l4(1)),
               previous=previous)
    assert d.replanned == "the spec changed since generation 1"
    assert d.placement is not None and d.placement.gpu_product == L4 and d.placement.max_model_len == 4096
    assert d.placement.planned_for is not None and d.placement.planned_for.generation == 2
    args = d.desired[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == "4096"


def test_an_invalid_spec_keeps_every_child_and_the_recorded_placement() -> None:
    _, previous = placed_on_h100()
    d = decide(lld({**SPEC, "replicas": -1}, generation=2), (h100(0),), previous=previous)
    assert d.failure is not None and d.failure.reason == "InvalidSpec" and d.desired == ()
    assert d.keep == {ChildRef("Deployment", "m"), ChildRef("Service", "m")}
    assert d.placement is not None and d.placement.to_api() == previous["placement"]


def test_node_tables_are_kept_while_the_node_objects_are_and_follow_a_cordon() -> None:
    """The operator keeps the node tables from pass to pass; a node event (a new object) must refresh them."""
    from argosy_operator.observe import NodeTables

    nodes = (h100(0), h100(1))
    tables = NodeTables().current(nodes)
    assert tables.current(nodes) is tables
    assert [n.cordoned for n in tables.gpus] == [False, False] and tables.pools[0].nodes == 2

    cordoned = (h100(0, cordoned=True), nodes[1])  # kopf's index holds a new object for the node
    after = tables.current(cordoned)
    assert after is not tables and [n.cordoned for n in after.gpus] == [True, False]
    assert after.pools[0].nodes == 1
    # Decisions read the kept tables exactly as they would read the nodes.
    _, previous = placed_on_h100()
    both_cordoned = (h100(0, cordoned=True), h100(1, cordoned=True))
    kept = NodeTables().current(both_cordoned)
    assert (decide(lld(SPEC), both_cordoned, previous=previous, gpus=kept.gpus, pools=kept.pools).capacity_problem
            == decide(lld(SPEC), both_cordoned, previous=previous).capacity_problem)
    assert decide(lld(SPEC), both_cordoned, previous=previous, gpus=kept.gpus).capacity_problem is not None
