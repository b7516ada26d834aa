"""One reconcile pass: observe -> plan -> build -> diff -> apply -> status.

The same pass runs for a new object, an edited one, a child that changed or vanished,
a restarted operator and the periodic resync; it never remembers what it did before,
it only compares what should exist with what does.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import pydantic

from argosy_operator import apply, builders, diffplan, status
from argosy_operator.api import LLMDeploymentSpec, ModelFacts, served_names
from argosy_operator.hubfacts import HubFacts
from argosy_operator.kubeapi import KubeApi
from argosy_operator.metrics import OperatorMetrics
from argosy_operator.observe import Observation
from argosy_operator.planner import PlacementError, inventory_from_nodes, plan_for_spec

logger = logging.getLogger(__name__)

CONFLICT_RETRY_SECONDS = 30.0


class ChildWriteError(Exception):
    """Writing a child failed in a way a later attempt may not; retried with backoff."""


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class ReconcileContext:
    api: KubeApi
    metrics: OperatorMetrics | None = None
    hub: HubFacts | None = None
    clock: Callable[[], datetime.datetime] = utc_now
    written: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    """(namespace, name) -> (uid, resourceVersion the status was computed from, the status written).

    The watch cache lags our own status writes; a pass that runs before it catches up
    must compare with what we wrote, or it would write (and announce) the same
    transition twice.
    """


@dataclasses.dataclass(frozen=True)
class Decision:
    """Pure outcome of the plan step for one LLMDeployment."""

    spec: LLMDeploymentSpec | None
    placement: Any = None  # planner.Placement
    failure: status.PlacementFailure | None = None
    desired: tuple[Mapping[str, Any], ...] = ()


def server_inputs(name: str, namespace: str, uid: str, spec: LLMDeploymentSpec, placement: Any) -> (
        builders.ServerInputs):
    """Adapt the API model and the planner's placement to the builders' input."""
    engine = spec.engine
    secret = spec.hf_token_secret_ref
    return builders.ServerInputs(
        name=name,
        namespace=namespace,
        owner_uid=uid,
        model_uri=spec.model.uri,
        served_model_names=tuple(served_names(spec, name)),
        replicas=spec.replicas,
        image=engine.image,
        tensor_parallel_size=int(placement.tensor_parallel_size),
        pipeline_parallel_size=int(placement.pipeline_parallel_size),
        # The planner resolves the default (the model's context) and sized the KV cache
        # for it; pass it on so vLLM and the status agree.
        max_model_len=engine.max_model_len or (int(placement.max_model_len) or None),
        gpu_memory_utilization=engine.gpu_memory_utilization,
        gpu_product=placement.gpu_product,
        revision=spec.model.revision,
        dtype=engine.dtype,
        quantization=engine.quantization,
        kv_cache_dtype=engine.kv_cache_dtype,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        enforce_eager=engine.enforce_eager,
        extra_args=tuple(engine.args),
        env=tuple(e.to_api() for e in engine.env),
        hf_token_secret=builders.SecretKeyRef(secret.name, secret.key) if secret else None,
        node_selector=dict(spec.scheduling.node_selector),
        tolerations=tuple(t.to_api() for t in spec.scheduling.tolerations),
        priority_class_name=spec.scheduling.priority_class_name,
    )


def _validation_message(error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"spec.{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts)


def parse_spec(body: Mapping[str, Any]) -> LLMDeploymentSpec | status.PlacementFailure:
    try:
        return LLMDeploymentSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as e:
        return status.PlacementFailure("InvalidSpec", _validation_message(e))


def decide(
    body: Mapping[str, Any],
    nodes: tuple[Mapping[str, Any], ...],
    facts: ModelFacts | PlacementError | None = None,
) -> Decision:
    """Parse the spec, size it against the GPU inventory, and render the desired children.

    `facts` is what the hub lookup found for a model the planner does not ship (or why
    it failed); None lets the planner use the inline facts or its own table.
    """
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = parse_spec(body)
    if isinstance(spec, status.PlacementFailure):
        return Decision(spec=None, failure=spec)
    service = builders.build_service(name, namespace, uid)
    try:
        if isinstance(facts, PlacementError):
            raise facts
        placement = plan_for_spec(spec, inventory_from_nodes([dict(n) for n in nodes]), facts=facts)
    except PlacementError as e:
        failure = status.PlacementFailure(str(e.reason or "NoPlacement"), str(e.message))
        return Decision(spec=spec, failure=failure, desired=(service,))
    if placement.pods_per_replica > 1:
        failure = status.PlacementFailure("MultiNodeNotYetSupported", (
            f"one replica needs {placement.pods_per_replica} nodes of {placement.gpu_product} "
            f"(tensor {placement.tensor_parallel_size} x pipeline {placement.pipeline_parallel_size}); "
            "replicas that span nodes are not supported yet. Allow a GPU product with more memory per "
            "node, quantize the weights, or shorten engine.maxModelLen"
        ))
        return Decision(spec=spec, placement=placement, failure=failure, desired=(service,))
    try:
        deployment = builders.build_deployment(server_inputs(name, namespace, uid, spec, placement))
    except ValueError as e:  # a URI the admission rules let through but we cannot map
        return Decision(spec=spec, failure=status.PlacementFailure("InvalidSpec", str(e)), desired=(service,))
    return Decision(spec=spec, placement=placement, desired=(deployment, service))


def _owned_deployment(obs: Observation, name: str, uid: str) -> Mapping[str, Any] | None:
    for child in obs.children:
        if (child.get("kind") == "Deployment" and child["metadata"].get("name") == name
                and diffplan.controller_uid(child) == uid
                and not child["metadata"].get("deletionTimestamp")):
            return child
    return None


async def reconcile(ctx: ReconcileContext, obs: Observation) -> str:
    """Run one pass for `obs.key`; returns the result label for metrics.

    Raises kopf.TemporaryError to be retried after its delay, ChildWriteError to be
    retried with backoff, and kopf.PermanentError when only a new spec can help.
    """
    body = obs.llmdeployment
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        ctx.written.pop(obs.key, None)
        return "gone"  # ownerReferences let the garbage collector remove the children
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = int(meta.get("generation") or 0)

    facts: ModelFacts | PlacementError | None = None
    parsed = parse_spec(body)
    if ctx.hub is not None and isinstance(parsed, LLMDeploymentSpec):
        try:
            facts = await ctx.hub.facts(namespace, parsed)
        except PlacementError as e:
            facts = e
    decision = decide(body, obs.nodes, facts)
    plan = diffplan.plan_children(uid, decision.desired, obs.children)
    result = await apply.execute_plan(ctx.api, namespace, uid, plan, ctx.metrics)
    if result.written:
        logger.info("reconciled %s/%s: %s", namespace, name, ", ".join(result.written))

    now = rfc3339(ctx.clock())
    deployment_written = any(s.ref.kind == "Deployment" for s in plan.apply) and not result.error
    observed_deployment = _owned_deployment(obs, name, uid)
    rollout = status.rollout_view(observed_deployment) if observed_deployment is not None else None
    if deployment_written and rollout is not None:
        # The cache predates our write: the Deployment controller has yet to see it.
        rollout = dataclasses.replace(rollout, generation=rollout.observed_generation + 1)
    spec = decision.spec
    previous = body.get("status") or {}
    version = str(meta.get("resourceVersion", ""))
    remembered = ctx.written.get(obs.key)
    if remembered is not None and remembered[:2] == (uid, version):
        previous = remembered[2]
    new_status = status.compute_status(
        status.StatusInputs(
            name=name,
            generation=generation,
            desired_replicas=spec.replicas if spec is not None else 0,
            served_model_names=tuple(served_names(spec, name)) if spec is not None else (name,),
            selector=builders.label_selector(name),
            now=now,
            placement=decision.placement.to_status() if decision.placement is not None else None,
            placement_failure=decision.failure,
            deployment=rollout,
            pods=tuple(status.pod_view(p) for p in obs.pods),
            apply_error=result.error,
            conflicts=tuple(result.conflicts),
        ),
        previous,
    )
    patch = status.status_patch(previous, new_status)
    if patch is not None:
        still_there = await apply.write_status(ctx.api, namespace, name, patch)
        if not still_there:
            ctx.written.pop(obs.key, None)
            return "gone"
        ctx.written[obs.key] = (uid, version, new_status)
        events = status.transition_events(previous.get("conditions"), new_status["conditions"])
        if events:
            await apply.post_events(ctx.api, body, events, now)

    if result.error:
        if result.retryable:
            raise ChildWriteError(result.error)
        raise kopf.PermanentError(result.error)
    if result.conflicts:
        raise kopf.TemporaryError("; ".join(result.conflicts), delay=CONFLICT_RETRY_SECONDS)
    if decision.spec is None and decision.failure is not None:
        raise kopf.PermanentError(decision.failure.message)
    return "success"
