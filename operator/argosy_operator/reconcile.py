"""One reconcile pass: observe -> plan -> build -> diff -> apply -> status.

The same pass runs for a new object, an edited one, a child that changed or vanished,
a restarted operator and the periodic resync; it keeps nothing in memory between passes
that matters (the placement it chose is recorded in the object's status), it compares
what should exist with what does. It returns an Outcome for the work queue and never
raises for a condition it understands.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from argosy_operator import apply, builders, chattemplate, diffplan, status, sticky
from argosy_operator.api import LLMDeploymentSpec, ModelFacts, PlacementStatus, served_names
from argosy_operator.hubfacts import HubFacts
from argosy_operator.kubeapi import KubeApi
from argosy_operator.metrics import OperatorMetrics
from argosy_operator.observe import Observation
from argosy_operator.planner import PlacementError, inventory_from_nodes, plan_for_spec
from argosy_operator.workqueue import Done, Outcome, Retry, WaitForChange

logger = logging.getLogger(__name__)

CONFLICT_RETRY_SECONDS = 30.0
"""A child of this name owned by someone else: check again after this long (or the backoff)."""


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
    placement: PlacementStatus | None = None
    """The placement the desired children use: the recorded one, or a new plan. On a failed
    re-plan, the recorded one (its workload is kept, not rebuilt)."""
    failure: status.PlacementFailure | None = None
    desired: tuple[Mapping[str, Any], ...] = ()
    keep: frozenset[diffplan.ChildRef] = frozenset()
    """Existing children to leave exactly as they are (never deleted for want of a placement)."""
    replanned: str | None = None
    """Why a plan ran in this pass; None when the recorded placement was kept."""
    capacity_problem: str | None = None


def server_inputs(name: str, namespace: str, uid: str, spec: LLMDeploymentSpec, placement: PlacementStatus,
                  chat_template: builders.ChatTemplateMount | None = None) -> builders.ServerInputs:
    """Adapt the API model and the planner's placement to the builders' input."""
    engine = spec.engine
    secret = spec.hf_token_secret_ref
    defaults = engine.generation_defaults
    return builders.ServerInputs(
        name=name,
        namespace=namespace,
        owner_uid=uid,
        model_uri=spec.model.uri,
        served_model_names=tuple(served_names(spec, name)),
        replicas=spec.replicas,
        image=engine.image,
        tensor_parallel_size=placement.tensor_parallel_size,
        pipeline_parallel_size=placement.pipeline_parallel_size,
        # The planner resolves the default (the model's context) and sized the KV cache
        # for it; pass it on so vLLM and the status agree.
        max_model_len=engine.max_model_len or placement.max_model_len or None,
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
        trust_remote_code=spec.model.trust_remote_code,
        tokenizer=spec.model.tokenizer,
        tokenizer_mode=spec.model.tokenizer_mode,
        tokenizer_revision=spec.model.tokenizer_revision,
        chat_template=chat_template,
        generation_override=tuple(sorted(defaults.vllm_override().items())) if defaults else (),
        termination_grace_period_seconds=engine.termination_grace_period_seconds,
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


def needs_plan(body: Mapping[str, Any], spec: LLMDeploymentSpec, previous: Mapping[str, Any] | None) -> str | None:
    """Why this pass must plan (first placement, spec changed, re-plan requested), or None to keep it."""
    return sticky.replan_cause(sticky.recorded_placement(previous), sticky.spec_hash(spec), sticky.replan_request(body))


def decide(
    body: Mapping[str, Any],
    nodes: tuple[Mapping[str, Any], ...],
    facts: ModelFacts | PlacementError | None = None,
    *,
    previous: Mapping[str, Any] | None = None,
    now: str = "1970-01-01T00:00:00Z",
    chat_template: chattemplate.ResolvedTemplate | chattemplate.TemplateFailure | None = None,
) -> Decision:
    """Parse the spec, keep or plan its placement, and render the desired children.

    `previous` is the status the last pass wrote: its placement is kept while the spec
    (without replicas) is the one it was planned for and no re-plan is requested
    (sticky.py). `facts` is what the hub lookup found for a model the planner does not
    ship (or why it failed); None lets the planner use the inline facts or its own table.
    Without a placement the Service is still desired and an existing Deployment is kept.
    `chat_template` is spec.engine.chatTemplate resolved (chattemplate.resolve); a missing
    ConfigMap or key keeps any existing Deployment and starts no new pod.
    """
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = int(meta.get("generation") or 0)
    service = builders.build_service(name, namespace, uid)
    workload = diffplan.ChildRef("Deployment", name)
    spec = parse_spec(body)
    kept = sticky.recorded_placement(previous)
    if isinstance(spec, status.PlacementFailure):
        return Decision(spec=None, placement=kept, failure=spec,
                        keep=frozenset({workload, diffplan.ref_of(service)}))
    digest, request = sticky.spec_hash(spec), sticky.replan_request(body)
    cause = sticky.replan_cause(kept, digest, request)

    def no_placement(reason: str, message: str) -> Decision:
        return Decision(spec=spec, placement=kept, failure=status.PlacementFailure(reason, message),
                        desired=(service,), keep=frozenset({workload}), replanned=cause)

    if isinstance(chat_template, chattemplate.TemplateFailure):
        return no_placement(chat_template.reason, chat_template.message)
    placement = kept
    if cause is not None:
        try:
            if isinstance(facts, PlacementError):
                raise facts
            planned = plan_for_spec(spec, inventory_from_nodes([dict(n) for n in nodes]), facts=facts)
        except PlacementError as e:
            return no_placement(str(e.reason or "NoPlacement"), str(e.message))
        if planned.pods_per_replica > 1:
            return no_placement("MultiNodeNotYetSupported", (
                f"one replica needs {planned.pods_per_replica} nodes of {planned.gpu_product} "
                f"(tensor {planned.tensor_parallel_size} x pipeline {planned.pipeline_parallel_size}); "
                "replicas that span nodes are not supported yet. Allow a GPU product with more memory per "
                "node, quantize the weights, or shorten engine.maxModelLen"
            ))
        placement = sticky.record(planned.to_status(), max_model_len=planned.max_model_len, generation=generation,
                                  digest=digest, request=request, nodes=nodes, now=now)
    assert placement is not None
    try:
        mount = chat_template.mount if chat_template is not None else None
        deployment = builders.build_deployment(server_inputs(name, namespace, uid, spec, placement, mount))
    except ValueError as e:  # a URI the admission rules let through but we cannot map
        return no_placement("InvalidSpec", str(e))
    capacity = sticky.capacity_problem(name, placement, spec.replicas, nodes, spec.scheduling.node_selector)
    owned = (chat_template.owned_config_map,) if chat_template and chat_template.owned_config_map else ()
    return Decision(spec=spec, placement=placement, desired=(deployment, service, *owned), replanned=cause,
                    capacity_problem=capacity)


def _owned_deployment(obs: Observation, name: str, uid: str) -> Mapping[str, Any] | None:
    for child in obs.children:
        if (child.get("kind") == "Deployment" and child["metadata"].get("name") == name
                and diffplan.controller_uid(child) == uid
                and not child["metadata"].get("deletionTimestamp")):
            return child
    return None


async def reconcile(ctx: ReconcileContext, obs: Observation) -> Outcome:
    """Run one pass for `obs.key` and say what the work queue should do next."""
    body = obs.llmdeployment
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        ctx.written.pop(obs.key, None)
        return Done("gone")  # ownerReferences let the garbage collector remove the children
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = int(meta.get("generation") or 0)
    now = rfc3339(ctx.clock())

    previous = body.get("status") or {}
    version = str(meta.get("resourceVersion", ""))
    remembered = ctx.written.get(obs.key)
    if remembered is not None and remembered[:2] == (uid, version):
        previous = remembered[2]

    facts: ModelFacts | PlacementError | None = None
    parsed = parse_spec(body)
    if ctx.hub is not None and isinstance(parsed, LLMDeploymentSpec) and needs_plan(body, parsed, previous):
        try:
            facts = await ctx.hub.facts(namespace, parsed)
        except PlacementError as e:
            facts = e
    template = None
    if isinstance(parsed, LLMDeploymentSpec):
        template = await chattemplate.resolve(parsed.engine.chat_template, name, namespace, uid,
                                              functools.partial(apply.read_config_map, ctx.api))
    decision = decide(body, obs.nodes, facts, previous=previous, now=now, chat_template=template)
    plan = diffplan.plan_children(uid, decision.desired, obs.children, keep=decision.keep)
    result = await apply.execute_plan(ctx.api, namespace, uid, plan, ctx.metrics)
    if result.written:
        logger.info("reconciled %s/%s: %s", namespace, name, ", ".join(result.written))
    if decision.replanned and decision.failure is None and decision.placement is not None:
        logger.info("placed %s/%s (%s): %s", namespace, name, decision.replanned, decision.placement.reason)

    deployment_written = any(s.ref.kind == "Deployment" for s in plan.apply) and not result.error
    observed_deployment = _owned_deployment(obs, name, uid)
    rollout = status.rollout_view(observed_deployment) if observed_deployment is not None else None
    if deployment_written and rollout is not None:
        # The cache predates our write: the Deployment controller has yet to see it.
        rollout = dataclasses.replace(rollout, generation=rollout.observed_generation + 1)
    spec = decision.spec
    new_status = status.compute_status(
        status.StatusInputs(
            name=name,
            generation=generation,
            # Without a spec, a kept Deployment's own replicas are what should be serving.
            desired_replicas=spec.replicas if spec is not None else int(
                (observed_deployment or {}).get("spec", {}).get("replicas") or 0),
            served_model_names=tuple(served_names(spec, name)) if spec is not None else (name,),
            selector=builders.label_selector(name),
            now=now,
            placement=decision.placement.to_api() if decision.placement is not None else None,
            placement_failure=decision.failure,
            kept_workload=decision.failure is not None and observed_deployment is not None,
            capacity_problem=decision.capacity_problem,
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
            return Done("gone")
        ctx.written[obs.key] = (uid, version, new_status)
        events = status.transition_events(previous.get("conditions"), new_status["conditions"])
        if events:
            await apply.post_events(ctx.api, body, events, now)

    if result.error:
        return Retry(result.error) if result.retryable else WaitForChange(result.error)
    if result.conflicts:
        return Retry("; ".join(result.conflicts), after=CONFLICT_RETRY_SECONDS)
    if decision.spec is None and decision.failure is not None:
        return WaitForChange(decision.failure.message)
    return Done()
