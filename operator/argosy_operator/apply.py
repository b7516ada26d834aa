"""The execute step: the only module that writes to the Kubernetes API.

Children are written with server-side apply (field manager `argosy-operator`, force),
so each pass states the whole desired object and the API server merges it; the status
is one JSON merge patch per pass; Events are best effort.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from argosy_operator import backendkey
from argosy_operator.diffplan import ApplyReason, ApplyStep, ChildPlan, controller_uid
from argosy_operator.groups import GroupPlan
from argosy_operator.kubeapi import ApiError, KubeApi
from argosy_operator.metrics import OperatorMetrics
from argosy_operator.settings import API_VERSION, FIELD_MANAGER, KIND
from argosy_operator.status import EventSpec

logger = logging.getLogger(__name__)

EVENT_MESSAGE_LIMIT = 1024


@dataclasses.dataclass
class ExecuteResult:
    written: list[str] = dataclasses.field(default_factory=list)
    conflicts: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    retryable: bool = True


async def _get(api: KubeApi, body: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = body["metadata"]
    return await api.get(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])


async def read_config_map(api: KubeApi, namespace: str, name: str) -> dict[str, Any] | None:
    """A user's ConfigMap (a chat template), or None when it does not exist."""
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": namespace, "name": name}}
    return await _get(api, ref)


async def read_secret(api: KubeApi, namespace: str, name: str) -> dict[str, Any] | None:
    ref = {"apiVersion": "v1", "kind": "Secret", "metadata": {"namespace": namespace, "name": name}}
    return await _get(api, ref)


async def write_backend_key(api: KubeApi, name: str, namespace: str, owner_uid: str,
                            plan: backendkey.KeyPlan, keys: backendkey.ObservedKeys | None) -> str:
    """Carry out a KeyPlan on the Secret (create, merge-patch or delete); returns what was done.

    ApiError(409) when the Secret changed since `keys` was read (or was created meanwhile).
    """
    secret = backendkey.secret_name(name)
    if plan.create:
        await api.create(backendkey.build_secret(name, namespace, owner_uid, plan))
        return f"created Secret/{secret}"
    assert keys is not None
    if plan.delete:
        await api.delete("v1", "Secret", namespace, secret, uid=keys.uid)
        return f"deleted Secret/{secret}"
    await api.patch_merge("v1", "Secret", namespace, secret, backendkey.secret_patch(plan, keys.resource_version))
    changes = ([f"added key {plan.add}"] if plan.add else []) + [f"removed key {i}" for i in sorted(plan.remove)]
    return f"updated Secret/{secret} ({', '.join(changes)})"


async def server_side_apply(api: KubeApi, body: Mapping[str, Any]) -> None:
    await api.apply(body, force=True)


async def _apply_step(api: KubeApi, owner_uid: str, step: ApplyStep) -> str | None:
    """Apply one child; returns a conflict message instead when the name is taken."""
    if step.reason is ApplyReason.MISSING:
        # Not in our cache, so not labelled as ours, and an object of this name that someone
        # else created must not be taken over. The first apply is therefore not forced: it
        # creates a new object in one call, and fails on one held by another field manager
        # with different values (409) or by another controller (422: one controller only).
        try:
            await api.apply(step.body, force=False)
            return None
        except ApiError as e:
            if e.status not in (409, 422):
                raise
            live = await _get(api, step.body)
            if live is None:
                raise
            if controller_uid(live) != owner_uid:
                return (f"{step.ref.kind} {step.ref.name} already exists and is not owned by this "
                        "LLMDeployment; rename or delete it")
            # Ours (the cache lags behind, or someone changed a field we own): take it back.
    await server_side_apply(api, step.body)
    return None


async def execute_plan(
    api: KubeApi, namespace: str, owner_uid: str, plan: ChildPlan, metrics: OperatorMetrics | None = None
) -> ExecuteResult:
    """Carry out the child plan; API failures are reported in the result, not raised.

    The children are independent, so they are written concurrently: one pass costs one
    round trip, not one per child.
    """
    result = ExecuteResult(conflicts=[c.message for c in plan.conflicts])
    outcomes = await asyncio.gather(*(_apply_step(api, owner_uid, s) for s in plan.apply),
                                    return_exceptions=True)
    failures: list[ApiError] = []
    for step, outcome in zip(plan.apply, outcomes, strict=True):
        if isinstance(outcome, ApiError):
            failures.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        elif outcome is not None:
            result.conflicts.append(outcome)
        else:
            result.written.append(f"{step.reason.value} {step.ref.kind}/{step.ref.name}")
            if metrics is not None:
                metrics.child_writes.labels(step.ref.kind, step.reason.value).inc()
    try:
        for delete in plan.delete:
            # A UID precondition: a same-named object created since we looked is left alone.
            await api.delete(delete.api_version, delete.ref.kind, namespace, delete.ref.name, uid=delete.uid)
            result.written.append(f"deleted {delete.ref.kind}/{delete.ref.name}")
            if metrics is not None:
                metrics.child_writes.labels(delete.ref.kind, "deleted").inc()
    except ApiError as e:
        failures.append(e)
    if failures:
        result.error = "writing children failed: " + "; ".join(str(e) for e in failures)
        # 422/400: the object itself is invalid; retrying the same body will not help.
        result.retryable = any(e.status not in (400, 422) for e in failures)
    return result


async def write_status(api: KubeApi, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
    """Merge-patch the status subresource; False when the LLMDeployment is gone."""
    try:
        await api.patch_status(API_VERSION, KIND, namespace, name, patch)
    except ApiError as e:
        if e.status == 404:
            return False
        raise
    return True


async def post_events(
    api: KubeApi, owner: Mapping[str, Any], events: Iterable[EventSpec], now: str
) -> None:
    """Record condition transitions as core/v1 Events on the LLMDeployment (best effort)."""
    await asyncio.gather(*(_post_event(api, owner, event, now) for event in events))


async def _post_event(api: KubeApi, owner: Mapping[str, Any], event: EventSpec, now: str) -> None:
    meta = owner["metadata"]
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:EVENT_MESSAGE_LIMIT],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await api.create(body)
    except (ApiError, OSError) as e:
        logger.warning("could not record event %s on %s/%s: %s", event.reason,
                       meta["namespace"], meta["name"], e)


async def execute_groups(
    api: KubeApi, namespace: str, plan: GroupPlan, leader_metadata: Mapping[str, Any]
) -> ExecuteResult:
    """Restart the groups the plan names (delete every member) and label their leaders.

    `leader_metadata` is what every leader carries (group_builders.leader_metadata). A pod
    that is already gone or was replaced (404, or 409 on the UID precondition) is skipped.
    """
    result = ExecuteResult()
    steps: list[tuple[str, Any]] = []
    for restart in plan.restarts:
        for pod, uid in restart.pods:
            steps.append((f"restarted group {restart.group}: deleted Pod/{pod}",
                          api.delete("v1", "Pod", namespace, pod, uid=uid)))
    restarting = {pod for restart in plan.restarts for pod, _ in restart.pods}
    for pod in plan.leaders_to_label:
        if pod in restarting:
            continue
        # A merge patch, not an apply: it never creates a pod that has just gone away.
        steps.append((f"labelled Pod/{pod} leader",
                      api.patch_merge("v1", "Pod", namespace, pod, {"metadata": dict(leader_metadata)})))
    outcomes = await asyncio.gather(*(call for _, call in steps), return_exceptions=True)
    failures = []
    for (what, _), outcome in zip(steps, outcomes, strict=True):
        if isinstance(outcome, ApiError):
            if outcome.status not in (404, 409):
                failures.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        elif outcome is not False:  # False: the pod was gone or replaced already
            result.written.append(what)
    if failures:
        result.error = "restarting or labelling group pods failed: " + "; ".join(str(e) for e in failures)
    return result
