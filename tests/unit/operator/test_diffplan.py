"""The plan step: which children to write or delete, from desired and cached objects."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from argosy_operator import builders
from argosy_operator.diffplan import (
    APPLIED_HASH_ANNOTATION,
    ApplyReason,
    ChildRef,
    contains,
    plan_children,
    stamped,
)
from argosy_operator.reconcile import decide

UID = "11111111-2222-3333-4444-555555555555"
OTHER_UID = "99999999-2222-3333-4444-555555555555"

INPUTS = builders.ServerInputs(
    name="m", namespace="ns", owner_uid=UID, model_uri="hf://org/m", served_model_names=("m",),
    replicas=1, image="vllm/vllm-openai:v0.32.0", tensor_parallel_size=1, pipeline_parallel_size=1,
    max_model_len=4096, gpu_memory_utilization=0.9, gpu_product="NVIDIA-L4",
)
DEPLOYMENT = builders.build_deployment(INPUTS)
SERVICE = builders.build_service("m", "ns", UID)


def live(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """What the API server returns after we applied `obj`: our fields plus defaults and status."""
    out = copy.deepcopy(stamped(obj))
    out["metadata"].update(uid="child-uid", resourceVersion="42", generation=1,
                           creationTimestamp="2026-01-01T00:00:00Z")
    if out["kind"] == "Deployment":
        spec = out["spec"]
        tmpl = spec["template"]["spec"]
        tmpl.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler",
                    securityContext={})
        tmpl.setdefault("terminationGracePeriodSeconds", 30)  # the API's default, when unset
        c = tmpl["containers"][0]
        c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
        c["readinessProbe"]["successThreshold"] = 1
        out["status"] = {"observedGeneration": 1, "replicas": 1}
    else:
        out["spec"].update(clusterIP="10.0.0.7", clusterIPs=["10.0.0.7"], sessionAffinity="None")
    for path, value in changes.items():
        target = out
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return out


DELETE = object()


def test_nothing_to_do_when_live_objects_contain_the_desired_fields() -> None:
    plan = plan_children(UID, [DEPLOYMENT, SERVICE], [live(DEPLOYMENT), live(SERVICE)])
    assert plan.is_noop and not plan.conflicts


@pytest.mark.parametrize(("observed", "expected"), [
    pytest.param([], {("Deployment", "m"): ApplyReason.MISSING, ("Service", "m"): ApplyReason.MISSING},
                 id="fresh object: create both"),
    pytest.param(["svc"], {("Deployment", "m"): ApplyReason.MISSING}, id="deleted Deployment comes back"),
    pytest.param(["dep"], {("Service", "m"): ApplyReason.MISSING}, id="deleted Service comes back"),
    pytest.param(["dep-image", "svc"], {("Deployment", "m"): ApplyReason.DRIFTED}, id="hand-edited image"),
    pytest.param(["dep-replicas", "svc"], {("Deployment", "m"): ApplyReason.DRIFTED},
                 id="someone scaled the Deployment directly"),
    pytest.param(["dep-args", "svc"], {("Deployment", "m"): ApplyReason.DRIFTED}, id="extra vLLM arg"),
    pytest.param(["dep-label", "svc"], {("Deployment", "m"): ApplyReason.DRIFTED}, id="label removed"),
    pytest.param(["dep", "svc-port"], {("Service", "m"): ApplyReason.DRIFTED}, id="service port edited"),
    pytest.param(["dep-terminating", "svc"], {("Deployment", "m"): ApplyReason.MISSING},
                 id="terminating child counts as missing"),
    pytest.param(["dep-extra-env", "svc"], {}, id="someone else's env var is not drift"),
    pytest.param(["dep-unstamped", "svc"], {("Deployment", "m"): ApplyReason.CHANGED},
                 id="applied by an operator that did not record a hash"),
])
def test_what_gets_applied(observed: list[str], expected: dict[tuple[str, str], ApplyReason]) -> None:
    variants = {
        "dep": live(DEPLOYMENT),
        "svc": live(SERVICE),
        "dep-image": live(DEPLOYMENT, spec__template__spec__containers__0__image="vllm/vllm-openai:latest"),
        "dep-replicas": live(DEPLOYMENT, spec__replicas=5),
        "dep-args": live(DEPLOYMENT, spec__template__spec__containers__0__args=[
            *DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["args"], "--enforce-eager"]),
        "dep-label": live(DEPLOYMENT, metadata__labels={"argosy.dev/deployment": "m",
                                                       "app.kubernetes.io/managed-by": "argosy-operator"}),
        "svc-port": live(SERVICE, spec__ports=[{"name": "http", "port": 80, "targetPort": "http",
                                                "protocol": "TCP"}]),
        "dep-terminating": live(DEPLOYMENT, metadata__deletionTimestamp="2026-01-01T00:00:01Z"),
        "dep-extra-env": live(DEPLOYMENT, spec__template__spec__containers__0__env=[
            {"name": "SIDECAR_HINT", "value": "1"}]),
        "dep-unstamped": live(DEPLOYMENT, metadata__annotations=DELETE),
    }
    plan = plan_children(UID, [DEPLOYMENT, SERVICE], [variants[o] for o in observed])
    got = {(s.ref.kind, s.ref.name): s.reason for s in plan.apply}
    assert got == expected
    assert not plan.delete
    for step in plan.apply:
        assert step.body in (stamped(DEPLOYMENT), stamped(SERVICE))


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


FULL = dataclasses.replace(
    INPUTS,
    hf_token_secret=builders.SecretKeyRef("hf-token", "token"),
    env=({"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "KEEP_ME", "value": "1"}),
    node_selector={"pool": "inference", "zone": "a"},
    tolerations=({"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},),
    priority_class_name="llm-high",
)


@pytest.mark.parametrize(("removed", "still_wanted", "gone"), [
    pytest.param({"hf_token_secret": None}, lambda p: p["containers"][0]["env"][0]["name"] == "VLLM_LOGGING_LEVEL",
                 lambda p: all(e["name"] != "HF_TOKEN" for e in p["containers"][0]["env"]), id="hfTokenSecretRef"),
    pytest.param({"env": ({"name": "KEEP_ME", "value": "1"},)},
                 lambda p: {"name": "KEEP_ME", "value": "1"} in p["containers"][0]["env"],
                 lambda p: all(e["name"] != "VLLM_LOGGING_LEVEL" for e in p["containers"][0]["env"]),
                 id="engine.env entry"),
    pytest.param({"node_selector": {"pool": "inference"}}, lambda p: p["nodeSelector"]["pool"] == "inference",
                 lambda p: "zone" not in p["nodeSelector"], id="nodeSelector key"),
    pytest.param({"tolerations": ()}, lambda p: p["tolerations"][0]["key"] == "nvidia.com/gpu",
                 lambda p: all(t.get("key") != "dedicated" for t in p["tolerations"]), id="toleration"),
    pytest.param({"priority_class_name": None}, lambda p: p["containers"],
                 lambda p: "priorityClassName" not in p, id="priorityClassName"),
])
def test_a_removed_field_is_applied_although_the_live_object_still_contains_the_rest(
        removed: dict[str, Any], still_wanted: Any, gone: Any) -> None:
    before = builders.build_deployment(FULL)
    after = builders.build_deployment(dataclasses.replace(FULL, **removed))
    applied = live(before)
    plan = plan_children(UID, [after, SERVICE], [applied, live(SERVICE)])
    ((step),) = plan.apply
    assert (step.ref, step.reason) == (ChildRef("Deployment", "m"), ApplyReason.CHANGED)
    # Server-side apply drops what the field manager owned and no longer sends.
    assert gone(_pod(dict(step.body))) and still_wanted(_pod(dict(step.body)))
    assert step.body["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] != (
        applied["metadata"]["annotations"][APPLIED_HASH_ANNOTATION])
    # Once applied, the next pass has nothing to do.
    assert plan_children(UID, [after, SERVICE], [live(after), live(SERVICE)]).is_noop


def test_cordoning_the_pool_keeps_the_serving_deployment_and_degrades() -> None:
    spec = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "gpu": {"products": ["NVIDIA-L4"]},
            "replicas": 2}
    placed = decide(lld(spec), NODES)
    assert placed.placement is not None and placed.capacity_problem is None
    running = [live(dict(o)) for o in placed.desired]
    cordoned = tuple({**n, "spec": {**n["spec"], "unschedulable": n["metadata"]["name"].startswith("l4")}}
                     for n in NODES)
    d = decide(lld(spec), cordoned, previous={"placement": placed.placement.to_api()})
    assert d.failure is None and d.desired == placed.desired
    plan = plan_children(UID, d.desired, running, keep=d.keep)
    assert plan.is_noop  # neither deleted nor rewritten
    assert d.capacity_problem is not None
    assert d.capacity_problem.startswith("2 of 2 pods cannot be rescheduled: pool NVIDIA-L4 (22 GiB GPUs) cordoned")


def test_without_a_placement_the_deployment_is_kept_not_deleted() -> None:
    plan = plan_children(UID, [SERVICE], [live(DEPLOYMENT), live(SERVICE)],
                         keep=frozenset({ChildRef("Deployment", "m")}))
    assert plan.is_noop


def test_stale_child_after_rename_is_deleted_but_foreign_ones_are_not() -> None:
    old = live(DEPLOYMENT, metadata__name="m-old")
    foreign = live(DEPLOYMENT, metadata__name="not-ours",
                   metadata__ownerReferences=[{"uid": OTHER_UID, "controller": True}])
    plan = plan_children(UID, [DEPLOYMENT, SERVICE], [live(DEPLOYMENT), live(SERVICE), old, foreign])
    assert [d.ref for d in plan.delete] == [ChildRef("Deployment", "m-old")]


def test_child_controlled_by_another_object_is_a_conflict_not_a_takeover() -> None:
    theirs = live(DEPLOYMENT, metadata__ownerReferences=[{"uid": OTHER_UID, "controller": True}])
    plan = plan_children(UID, [DEPLOYMENT, SERVICE], [theirs, live(SERVICE)])
    assert not plan.apply and not plan.delete
    (conflict,) = plan.conflicts
    assert conflict.ref == ChildRef("Deployment", "m")
    assert OTHER_UID in conflict.message


@pytest.mark.parametrize(("desired", "observed", "result"), [
    ({"a": 1}, {"a": 1, "b": 2}, True),
    ({"a": 1}, {"a": 2}, False),
    ({"a": {}}, {}, True),
    ({"a": []}, {}, True),
    ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),
    ({"a": [{"name": "x", "v": 1}]}, {"a": [{"name": "y"}, {"name": "x", "v": 1, "w": 0}]}, True),
    ({"a": [{"name": "x", "v": 1}]}, {"a": [{"name": "x", "v": 2}]}, False),
    ({"a": [{"k": 1}]}, {"a": [{"k": 1}, {"k": 2}]}, False),
    ({"a": "1"}, {"a": 1}, False),
])
def test_contains(desired: Any, observed: Any, result: bool) -> None:
    assert contains(desired, observed) is result


# decide(): spec + GPU nodes -> desired children (the planner in the loop).

def node(name: str, product: str, memory_mib: int, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product,
                                              "nvidia.com/gpu.memory": str(memory_mib),
                                              "nvidia.com/gpu.count": str(gpus)}},
        "spec": {"unschedulable": False, "taints": []},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "capacity": {"nvidia.com/gpu": str(gpus)},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


NODES = (
    *(node(f"h100-{i}", "NVIDIA-H100-80GB-HBM3", 81559, 8) for i in range(2)),
    *(node(f"a100-{i}", "NVIDIA-A100-SXM4-40GB", 40960, 8) for i in range(2)),
    *(node(f"l4-{i}", "NVIDIA-L4", 23034, 1) for i in range(4)),
)


def lld(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": UID, "generation": 1}, "spec": spec}


def test_small_model_restricted_to_l4_gets_one_l4_gpu() -> None:
    d = decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"},
                    "gpu": {"products": ["NVIDIA-L4"]}}), NODES)
    assert d.failure is None
    dep, svc = d.desired
    assert dep["kind"] == "Deployment" and svc["kind"] == "Service"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = pod["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == str(d.placement.max_model_len)


def test_70b_gets_tensor_parallel_pod_matching_placement() -> None:
    d = decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
                    "engine": {"maxModelLen": 8192}}), NODES)
    assert d.failure is None
    placement = d.placement.to_api()
    assert placement["tensorParallelSize"] >= 2 and placement["podsPerReplica"] == 1
    container = d.desired[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(placement["gpusPerPod"])
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == str(placement["tensorParallelSize"])
    assert d.desired[0]["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == (
        placement["gpuProduct"])


def test_impossible_spec_keeps_only_the_service_and_says_why() -> None:
    d = decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"},
                    "gpu": {"products": ["NVIDIA-L4"]}}), NODES)
    assert d.failure is not None and d.failure.reason == "InsufficientGpuMemory"
    assert "GiB" in d.failure.message
    assert [o["kind"] for o in d.desired] == ["Service"]


def test_replica_spanning_nodes_is_a_group_per_replica_behind_a_leader_service() -> None:
    d = decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"}, "replicas": 2,
                    "gpu": {"products": ["NVIDIA-H100-80GB-HBM3"]}, "engine": {"maxModelLen": 4096}}), NODES)
    assert d.failure is None and d.placement.pods_per_replica == 2
    assert sorted((o["kind"], o["metadata"]["name"]) for o in d.desired) == [
        ("Service", "m"), ("Service", "m-g0"), ("Service", "m-g1"), ("StatefulSet", "m-g0"), ("StatefulSet", "m-g1"),
    ]
    service = next(o for o in d.desired if o["kind"] == "Service" and o["metadata"]["name"] == "m")
    assert service["spec"]["selector"] == {"argosy.dev/deployment": "m", "argosy.dev/role": "leader"}
    sts = next(o for o in d.desired if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--distributed-executor-backend", "mp"]


def test_invalid_spec_desires_nothing() -> None:
    d = decide(lld({"model": {"uri": "hf://org/m"}, "replicas": -1}), NODES)
    assert d.failure is not None and d.failure.reason == "InvalidSpec"
    assert "replicas" in d.failure.message
    assert d.desired == ()


def test_no_gpu_nodes_is_a_placement_failure() -> None:
    d = decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}}), ())
    assert d.failure is not None and d.failure.reason == "NoMatchingGpus"


def test_node_heartbeats_do_not_count_as_inventory_changes_but_gpu_changes_do() -> None:
    from argosy_operator.observe import gpu_view, trim_node

    raw = node("l4-0", "NVIDIA-L4", 23034, 1)
    raw["status"]["conditions"] = [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t1"},
                                   {"type": "MemoryPressure", "status": "False"}]
    beat = copy.deepcopy(raw)
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "t2"
    beat["metadata"]["resourceVersion"] = "999"
    assert gpu_view(trim_node(raw)) == gpu_view(trim_node(beat))
    for change in ({"spec": {"unschedulable": True}},
                   {"status": {"allocatable": {"nvidia.com/gpu": "0"}}},
                   {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}):
        changed = copy.deepcopy(raw)
        for part, fields in change.items():
            changed[part].update(fields)
        assert gpu_view(trim_node(changed)) != gpu_view(trim_node(raw))
    # The planner reads the trimmed copy: a NotReady node offers no GPUs.
    assert decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}}),
                  (trim_node(raw),)).failure is None
    not_ready = copy.deepcopy(raw)
    not_ready["status"]["conditions"][0]["status"] = "False"
    assert decide(lld({"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}}),
                  (trim_node(not_ready),)).failure is not None
