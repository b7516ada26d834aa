"""A whole reconcile pass against a recording fake of the API: plan, execute, status, events."""

from __future__ import annotations

import datetime
import json
from typing import Any

import httpx2
from argosy_operator.kubeapi import ApiError, KubeApi
from argosy_operator.observe import Observation
from argosy_operator.reconcile import ReconcileContext, reconcile
from argosy_operator.workqueue import Done, Retry, WaitForChange
from lightkube import KubeConfig
from lightkube.config.models import Cluster, User


def _node(name: str, product: str, memory_mib: int, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product,
                                              "nvidia.com/gpu.memory": str(memory_mib)}},
        "spec": {"unschedulable": False},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "conditions": [{"type": "Ready", "status": "True"}]},
    }


NODES = (_node("h100-0", "NVIDIA-H100-80GB-HBM3", 81559, 8), _node("l4-0", "NVIDIA-L4", 23034, 1))

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class FakeApi:
    """The real client (KubeApi on lightkube) against a recording fake API server.

    Records every request as (method, path, query, body); objects do not exist until
    applied; applies can be made to fail with a Kubernetes Status.
    """

    def __init__(self, fail_apply: ApiError | None = None,
                 existing: dict[str, dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[str, str, dict[str, Any] | None, Any]] = []
        self.fail_apply = fail_apply
        self.existing = existing or {}  # path -> object someone else created
        config = KubeConfig.from_one(cluster=Cluster(server="http://127.0.0.1:6443"), user=User(token="t")).get()
        self.kube = KubeApi(config, transport=httpx2.MockTransport(self._serve))

    def _serve(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, dict(request.url.params) or None, body))
        path = request.url.path
        if request.method == "GET":
            if path in self.existing:
                return httpx2.Response(200, json=self.existing[path])
            return _status(ApiError(404, "NotFound", "not found"))
        applying = request.headers.get("content-type") == "application/apply-patch+yaml"
        if applying and self.fail_apply:
            return _status(self.fail_apply)
        if applying and path in self.existing and request.url.params.get("force") != "true":
            return _status(ApiError(409, "Conflict", 'Apply failed with 1 conflict: conflict with "kubectl"'))
        if request.method == "PATCH" and "/secrets/" in path and path in self.existing:
            stored = _merge(self.existing[path], body)
            stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
            self.existing[path] = stored
            return httpx2.Response(200, json=stored)
        if request.method == "DELETE" and path in self.existing:
            del self.existing[path]
            return httpx2.Response(200, json={})
        if request.method == "POST" and path.endswith("/secrets"):  # the backend key: kept, as a server would
            if f"{path}/{body['metadata']['name']}" in self.existing:
                return _status(ApiError(409, "AlreadyExists", "secrets already exists"))
            stored = {**body, "metadata": {**body["metadata"], "uid": "uid-secret", "resourceVersion": "1"}}
            self.existing[f"{path}/{body['metadata']['name']}"] = stored
            return httpx2.Response(201, json=stored)
        return httpx2.Response(201 if request.method == "POST" else 200, json=body or {})

    def backend_key(self) -> dict[str, Any] | None:
        """The backend-key Secret as the watch cache would hold it."""
        return self.existing.get("/api/v1/namespaces/ns/secrets/m-backend-key")

    def of(self, method: str, suffix: str = "") -> list[tuple[str, str, dict[str, Any] | None, Any]]:
        return [c for c in self.calls if c[0] == method and c[1].endswith(suffix)]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _status(error: ApiError) -> httpx2.Response:
    return httpx2.Response(error.status, json={"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                               "code": error.status, "reason": error.reason,
                                               "message": error.message})


def lld(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
           "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "10"},
           "spec": spec}
    if status:
        obj["status"] = status
    return obj


SMALL = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "gpu": {"products": ["NVIDIA-L4"]}}


def ctx(api: FakeApi) -> ReconcileContext:
    return ReconcileContext(api=api.kube, clock=lambda: NOW)


async def test_new_object_gets_its_children_applied_and_a_status() -> None:
    api = FakeApi()
    result = await reconcile(ctx(api), Observation(("ns", "m"), lld(SMALL), NODES))
    assert result == Done()
    applies = [c for c in api.of("PATCH") if not c[1].endswith("/status")]
    assert sorted(c[1] for c in applies) == ["/api/v1/namespaces/ns/services/m",
                                             "/apis/apps/v1/namespaces/ns/deployments/m"]
    # Missing from the cache: the first apply is not forced (it creates, and cannot take over), one call each.
    assert all(c[2] == {"fieldManager": "argosy-operator"} for c in applies)
    # The backend key: created in one call (no read first); the pods read it as VLLM_API_KEY.
    assert api.of("GET") == []
    ((_, _, _, secret),) = api.of("POST", "/secrets")
    key_id = secret["metadata"]["annotations"]["argosy.dev/backend-key-current"]
    (deployment,) = [c[3] for c in applies if c[1].endswith("/deployments/m")]
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["argosy.dev/backend-key-id"] == key_id
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "m-backend-key", "key": f"key-{key_id}"}}} \
        in template["spec"]["containers"][0]["env"]
    ((_, _, _, patch),) = api.of("PATCH", "/llmdeployments/m/status")
    status = patch["status"]
    assert status["observedGeneration"] == 1
    assert status["placement"]["gpuProduct"] == "NVIDIA-L4"
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Progressing"] == ("True", "Creating")
    assert conditions["PlacementFound"] == ("True", "Placed")


async def test_a_same_named_object_someone_else_made_is_reported_not_taken_over() -> None:
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "other", "uid": "someone-else", "controller": True}
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "m", "namespace": "ns", "ownerReferences": [other]}}
    api = FakeApi(existing={"/api/v1/namespaces/ns/services/m": foreign})
    outcome = await reconcile(ctx(api), Observation(("ns", "m"), lld(SMALL), NODES))
    assert isinstance(outcome, Retry) and "Service m already exists and is not owned" in outcome.reason
    service_applies = api.of("PATCH", "/services/m")
    assert [c[2] for c in service_applies] == [{"fieldManager": "argosy-operator"}]  # never forced
    assert api.of("GET", "/services/m")  # looked, after the refused apply, to say whose it is
    assert api.of("PATCH", "/deployments/m")  # the other child is not held up


async def test_a_pass_before_the_cache_catches_up_does_not_repeat_status_or_events() -> None:
    api = FakeApi()
    context = ctx(api)
    impossible = {"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"}, "gpu": {"products": ["NVIDIA-L4"]}}
    assert await reconcile(context, Observation(("ns", "m"), lld(impossible), NODES)) == Done()
    assert len(api.of("PATCH", "/status")) == 1
    warnings = [c[3] for c in api.of("POST", "/events")]
    assert {(e["type"], e["reason"]) for e in warnings} == {
        ("Warning", "InsufficientGpuMemory"), ("Warning", "PlacementFailed")}
    assert not api.of("PATCH", "/deployments/m")

    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), lld(impossible), NODES))  # same stale body
    assert not api.of("PATCH", "/status") and not api.of("POST", "/events")


async def test_failed_write_is_retried_and_reported_as_degraded() -> None:
    api = FakeApi(fail_apply=ApiError(403, "Forbidden", "deployments.apps is forbidden"))
    outcome = await reconcile(ctx(api), Observation(("ns", "m"), lld(SMALL), NODES))
    assert isinstance(outcome, Retry) and "forbidden" in outcome.reason and outcome.after is None
    ((_, _, _, patch),) = api.of("PATCH", "/status")
    degraded = next(c for c in patch["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    assert "forbidden" in degraded["message"]


async def test_an_object_the_api_server_refuses_waits_for_a_change() -> None:
    api = FakeApi(fail_apply=ApiError(422, "Invalid", "spec.template.spec.priorityClassName: Invalid value"))
    outcome = await reconcile(ctx(api), Observation(("ns", "m"), lld(SMALL), NODES))
    assert isinstance(outcome, WaitForChange) and "priorityClassName" in outcome.reason


async def test_invalid_object_waits_for_a_change_and_writes_no_children() -> None:
    api = FakeApi()
    outcome = await reconcile(ctx(api), Observation(("ns", "m"), lld({**SMALL, "replicas": -3}), NODES))
    assert isinstance(outcome, WaitForChange) and "replicas" in outcome.reason
    assert [c[1] for c in api.calls if c[0] == "PATCH"] == [
        "/apis/argosy.dev/v1alpha1/namespaces/ns/llmdeployments/m/status"]


async def test_deleted_object_is_left_to_the_garbage_collector() -> None:
    api = FakeApi()
    assert await reconcile(ctx(api), Observation(("ns", "m"), None, NODES)) == Done("gone")
    assert api.calls == []


class CountingHub:
    def __init__(self) -> None:
        self.lookups = 0

    async def facts(self, namespace: str, spec: Any) -> None:
        self.lookups += 1


def applied_children(api: FakeApi) -> tuple[dict[str, Any], ...]:
    """The children as the API server holds them after the recorded applies (ours to control)."""
    return tuple({**c[3], "metadata": {**c[3]["metadata"], "uid": f"uid-{c[3]['kind']}"}}
                 for c in api.of("PATCH") if c[2] and c[2].get("fieldManager") and not c[1].endswith("/status"))


async def test_cordoned_pool_degrades_the_model_and_touches_no_child() -> None:
    api = FakeApi()
    hub = CountingHub()
    context = ReconcileContext(api=api.kube, clock=lambda: NOW, hub=hub)  # type: ignore[arg-type]
    spec = {**SMALL, "replicas": 1}
    await reconcile(context, Observation(("ns", "m"), lld(spec), NODES))
    written = api.of("PATCH", "/status")[0][3]["status"]
    children = applied_children(api)
    assert {c["kind"] for c in children} == {"Deployment", "Service"} and hub.lookups == 1

    api.calls.clear()
    cordoned = tuple({**n, "spec": {"unschedulable": n["metadata"]["name"] == "l4-0"}} for n in NODES)
    body = {**lld(spec, status=written), "metadata": {**lld(spec)["metadata"], "resourceVersion": "11"}}
    observed = Observation(("ns", "m"), body, cordoned, children, backend_key=api.backend_key())
    assert await reconcile(context, observed) == Done()
    assert [c[0] for c in api.calls if not c[1].endswith(("/status", "/events"))] == []  # no apply, no delete
    assert hub.lookups == 1  # a kept placement needs no model facts
    ((_, _, _, patch),) = api.of("PATCH", "/status")
    degraded = next(c for c in patch["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PoolUnavailable")
    assert degraded["message"].startswith("1 of 1 pod cannot be rescheduled: pool NVIDIA-L4 (22 GiB GPUs) cordoned")
    assert "placement" not in patch["status"]  # unchanged: still the recorded one
    assert [(e[3]["type"], e[3]["reason"]) for e in api.of("POST", "/events")] == [("Warning", "PoolUnavailable")]


async def test_an_invalid_spec_leaves_the_serving_deployment_and_reports_its_pods() -> None:
    api = FakeApi()
    context = ctx(api)
    await reconcile(context, Observation(("ns", "m"), lld(SMALL), NODES))
    written = api.of("PATCH", "/status")[0][3]["status"]
    children = applied_children(api)
    pods = ({"metadata": {"name": "m-a"}, "status": {"phase": "Running",
                                                      "conditions": [{"type": "Ready", "status": "True"}]}},)
    api.calls.clear()
    body = {**lld({**SMALL, "replicas": -1}, status=written),
            "metadata": {**lld(SMALL)["metadata"], "generation": 2, "resourceVersion": "12"}}
    outcome = await reconcile(context, Observation(("ns", "m"), body, NODES, children, pods))
    assert isinstance(outcome, WaitForChange)
    assert [c for c in api.calls if not c[1].endswith(("/status", "/events"))] == []
    status = api.of("PATCH", "/status")[0][3]["status"]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("True", "ReplicasReady")
    assert "keep" in by_type["Progressing"]["message"] and "placement" not in status  # placement unchanged


H100_PAIR = (_node("h100-0", "NVIDIA-H100-80GB-HBM3", 81559, 8), _node("h100-1", "NVIDIA-H100-80GB-HBM3", 81559, 8))
BIG = {"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"}, "engine": {"maxModelLen": 8192}}


def _member(ordinal: int, *, restarts: int = 0, leader: bool = False) -> dict[str, Any]:
    labels = {"argosy.dev/deployment": "m", "argosy.dev/group": "m-g0", "apps.kubernetes.io/pod-index": str(ordinal),
              "argosy.dev/role": "leader" if leader else "worker", "controller-revision-hash": "m-g0-1"}
    return {
        "metadata": {"name": f"m-g0-{ordinal}", "uid": f"pod-{ordinal}", "labels": labels,
                     "annotations": {"argosy.dev/served-model-names": '["m"]'} if leader else {},
                     "creationTimestamp": "2025-12-31T23:00:00Z"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "vllm", "restartCount": restarts}]},
    }


async def test_a_new_group_gets_its_statefulset_headless_service_and_leader_service() -> None:
    api = FakeApi()
    assert await reconcile(ctx(api), Observation(("ns", "m"), lld(BIG), H100_PAIR)) == Done()
    applied = sorted(c[1] for c in api.of("PATCH") if not c[1].endswith("/status"))
    assert applied == ["/api/v1/namespaces/ns/services/m", "/api/v1/namespaces/ns/services/m-g0",
                       "/apis/apps/v1/namespaces/ns/statefulsets/m-g0"]
    ((_, _, _, patch),) = api.of("PATCH", "/llmdeployments/m/status")
    status = patch["status"]
    assert status["placement"]["podsPerReplica"] == 2
    assert status["selector"] == "argosy.dev/deployment=m,argosy.dev/role=leader"
    assert status["groups"] == [{"name": "m-g0", "pods": 2, "readyPods": 0, "ready": False, "upToDate": False,
                                 "restarts": 0}]
    assert (status["replicas"], status["readyReplicas"]) == (0, 0)  # replicas count groups, none runs yet
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "ScalingUp")


async def test_a_group_whose_worker_restarted_is_restarted_whole() -> None:
    api = FakeApi()
    first = await reconcile(ctx(api), Observation(("ns", "m"), lld(BIG), H100_PAIR))
    assert first == Done()
    children = tuple(c[3] for c in api.of("PATCH") if not c[1].endswith("/status"))
    (status_patch,) = (c[3] for c in api.of("PATCH", "/llmdeployments/m/status"))
    sts = next(c for c in children if c["kind"] == "StatefulSet")
    sts = {**sts, "metadata": {**sts["metadata"], "generation": 1},
           "status": {"observedGeneration": 1, "updateRevision": "m-g0-1"}}
    observed = (*(c for c in children if c["kind"] != "StatefulSet"), sts)
    pods = (_member(0, leader=True), _member(1, restarts=1))
    api.calls.clear()
    body = lld(BIG, status=status_patch["status"])
    result = await reconcile(ctx(api), Observation(("ns", "m"), body, H100_PAIR, observed, pods))
    assert result == Done()
    deletes = sorted((c[1], c[3]["preconditions"]["uid"]) for c in api.of("DELETE"))
    assert deletes == [("/api/v1/namespaces/ns/pods/m-g0-0", "pod-0"), ("/api/v1/namespaces/ns/pods/m-g0-1", "pod-1")]
    events = [c[3] for c in api.of("POST", "/events")]
    assert any(e["reason"] == "GroupRestarted" and "pod m-g0-1 restarted" in e["message"] for e in events)
    (patch,) = (c[3] for c in api.of("PATCH", "/llmdeployments/m/status"))
    (group,) = patch["status"]["groups"]
    assert group["restarts"] == 1 and group["lastRestart"]["reason"] == "MemberRestarted"
    degraded = next(c for c in patch["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "GroupRestarted")


async def test_an_unlabelled_leader_gets_the_leader_role_and_the_served_names() -> None:
    api = FakeApi()
    await reconcile(ctx(api), Observation(("ns", "m"), lld(BIG), H100_PAIR))
    api.calls.clear()
    pods = (_member(0), _member(1))
    await reconcile(ctx(api), Observation(("ns", "m"), lld(BIG), H100_PAIR, (), pods))
    ((_, path, _, body),) = [c for c in api.of("PATCH") if "/pods/" in c[1]]
    assert path == "/api/v1/namespaces/ns/pods/m-g0-0"
    assert body == {"metadata": {"labels": {"argosy.dev/role": "leader"},
                                 "annotations": {"argosy.dev/served-model-names": '["m"]'}}}


def _key_pod(name: str, key_id: str | None) -> dict[str, Any]:
    annotations = {"argosy.dev/backend-key-id": key_id} if key_id else {}
    return {"metadata": {"name": name, "annotations": annotations},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def _template(api: FakeApi) -> dict[str, Any]:
    (deployment,) = [c[3] for c in api.of("PATCH", "/deployments/m")]
    return dict(deployment["spec"]["template"])


def _with_annotation(body: dict[str, Any], value: str, version: str) -> dict[str, Any]:
    meta = body["metadata"]
    return {**body, "metadata": {**meta, "resourceVersion": version,
                                 "annotations": {"argosy.dev/rotate-backend-key": value}}}


async def _keyed_start() -> tuple[FakeApi, ReconcileContext, dict[str, Any], str]:
    """A first pass: the API, its context, the backend-key Secret it made and its key id."""
    api = FakeApi()
    context = ctx(api)
    await reconcile(context, Observation(("ns", "m"), lld(SMALL), NODES))
    secret = api.backend_key()
    assert secret is not None
    return api, context, secret, secret["metadata"]["annotations"]["argosy.dev/backend-key-current"]


async def test_a_rotation_adds_a_key_rolls_the_pods_and_drops_the_old_key_once_no_pod_uses_it() -> None:
    api, context, first, old = await _keyed_start()
    written = api.of("PATCH", "/status")[0][3]["status"]
    children = applied_children(api)

    # A restarted operator (a new context) with the Secret in its cache: the same key, nothing written to it.
    api.calls.clear()
    body = {**lld(SMALL, status=written), "metadata": {**lld(SMALL)["metadata"], "resourceVersion": "11"}}
    await reconcile(ctx(api), Observation(("ns", "m"), body, NODES, children, (_key_pod("m-a", old),),
                                          backend_key=api.backend_key()))
    assert not [c for c in api.calls if "/secrets" in c[1]]
    assert not api.of("PATCH", "/deployments/m")  # the pods keep their key: no roll

    # Rotation requested while the old pod serves: a new key next to the old one, the template names it.
    api.calls.clear()
    rotating = _with_annotation(body, "2026-01-01", "12")
    await reconcile(context, Observation(("ns", "m"), rotating, NODES, children, (_key_pod("m-a", old),),
                                         backend_key=api.backend_key()))
    ((_, _, _, patch),) = api.of("PATCH", "/secrets/m-backend-key")
    assert patch["metadata"]["resourceVersion"] == "1"  # written against what was read
    rotated = api.backend_key()
    assert rotated is not None
    new = rotated["metadata"]["annotations"]["argosy.dev/backend-key-current"]
    assert new != old and set(rotated["data"]) == {f"key-{old}", f"key-{new}"}
    assert rotated["data"][f"key-{old}"] == first["data"][f"key-{old}"]  # the old key is unchanged
    assert rotated["metadata"]["annotations"]["argosy.dev/backend-key-rotated-for"] == "2026-01-01"
    assert _template(api)["metadata"]["annotations"]["argosy.dev/backend-key-id"] == new

    # A pass whose cache still shows the Secret before the rotation: read afresh, no second rotation.
    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), rotating, NODES, children,
                                         (_key_pod("m-a", old), _key_pod("m-b", new)), backend_key=first))
    assert not api.of("PATCH", "/secrets/m-backend-key") and api.backend_key() == rotated

    # The roll is over: no pod carries the old id, so its entry goes.
    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), rotating, NODES, children, (_key_pod("m-b", new),),
                                         backend_key=rotated))
    ((_, _, _, patch),) = api.of("PATCH", "/secrets/m-backend-key")
    assert patch["data"] == {f"key-{old}": None}
    final = api.backend_key()
    assert final is not None and set(final["data"]) == {f"key-{new}"}


async def test_turning_the_key_off_starts_pods_without_it_and_deletes_the_secret_once_unused() -> None:
    api, context, secret, old = await _keyed_start()
    off = {**SMALL, "backendKey": {"enabled": False}}
    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), lld(off), NODES, (), (_key_pod("m-a", old),),
                                         backend_key=secret))
    template = _template(api)
    assert "argosy.dev/backend-key-id" not in template["metadata"]["annotations"]
    assert "VLLM_API_KEY" not in {e["name"] for e in template["spec"]["containers"][0].get("env") or ()}
    assert api.backend_key() is not None  # the old pod still needs it
    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), lld(off), NODES, (), (_key_pod("m-b", None),),
                                         backend_key=secret))
    assert api.of("DELETE", "/secrets/m-backend-key") and api.backend_key() is None


async def test_an_install_without_backend_keys_touches_no_secret_and_starts_pods_without_a_key() -> None:
    api = FakeApi()
    context = ReconcileContext(api=api.kube, clock=lambda: NOW, backend_keys=False)
    assert await reconcile(context, Observation(("ns", "m"), lld(SMALL), NODES)) == Done()
    assert not [c for c in api.calls if "/secrets" in c[1]]
    template = _template(api)
    assert "argosy.dev/backend-key-id" not in template["metadata"]["annotations"]
    assert "VLLM_API_KEY" not in {e["name"] for e in template["spec"]["containers"][0].get("env") or ()}


async def test_a_backend_key_the_cache_has_not_seen_yet_is_kept_not_replaced() -> None:
    # A pass right after the one that created the Secret, its cache still without it: the
    # create is refused (409), the Secret read, and its key used; nothing else is written to it.
    api, context, secret, key_id = await _keyed_start()
    api.calls.clear()
    await reconcile(context, Observation(("ns", "m"), lld(SMALL), NODES))
    assert [c[0] for c in api.calls if "/secrets" in c[1]] == ["POST", "GET"]
    assert api.backend_key() == secret
    assert _template(api)["metadata"]["annotations"]["argosy.dev/backend-key-id"] == key_id


async def test_a_backend_key_name_taken_by_another_secret_is_reported_not_taken_over() -> None:
    taken = {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": "m-backend-key", "namespace": "ns", "uid": "someone", "resourceVersion": "3"},
             "data": {"token": "eA=="}}
    api = FakeApi(existing={"/api/v1/namespaces/ns/secrets/m-backend-key": taken})
    result = await reconcile(ctx(api), Observation(("ns", "m"), lld(SMALL), NODES))
    assert isinstance(result, Retry) and "not owned by this LLMDeployment" in result.reason
    assert [c[0] for c in api.calls if "/secrets" in c[1]] == ["POST", "GET"]
    assert api.backend_key() == taken
    assert not api.of("PATCH", "/deployments/m")  # no pod may name a key the Secret does not hold
