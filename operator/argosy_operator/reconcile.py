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
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from argosy_operator import apply, backendkey, builders, chattemplate, diffplan, group_builders, groups, status, sticky
from argosy_operator.api import LLMDeploymentSpec, ModelFacts, PlacementStatus, served_names
from argosy_operator.hubfacts import HubFacts
from argosy_operator.kubeapi import ApiError, KubeApi
from argosy_operator.metrics import OperatorMetrics
from argosy_operator.observe import Observation
from argosy_operator.planner import GpuPool, PlacementError, inventory_from_nodes, plan_for_spec
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
    backend_keys: bool = True
    """False (the install turned backend keys off): no key, and no Secret read or written."""
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
                  chat_template: builders.ChatTemplateMount | None = None,
                  backend_key_id: str | None = None) -> builders.ServerInputs:
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
        pods_per_replica=placement.pods_per_replica,
        backend_key_id=backend_key_id,
        max_surge=spec.rollout.max_surge,
        max_unavailable=spec.rollout.max_unavailable,
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
    backend_key_id: str | None = None,
    gpus: tuple[sticky.NodeGpus, ...] | None = None,
    pools: tuple[GpuPool, ...] | None = None,
) -> Decision:
    """Parse the spec, keep or plan its placement, and render the desired children.

    `previous` is the status the last pass wrote: its placement is kept while the spec
    (without replicas) is the one it was planned for and no re-plan is requested
    (sticky.py). `facts` is what the hub lookup found for a model the planner does not
    ship (or why it failed); None lets the planner use the inline facts or its own table.
    Without a placement the Service is still desired and an existing Deployment is kept.
    `chat_template` is spec.engine.chatTemplate resolved (chattemplate.resolve); a missing
    ConfigMap or key keeps any existing Deployment and starts no new pod. `backend_key_id` is
    the key the pods start with (backendkey.plan_keys), None for none. `gpus` and `pools`
    are sticky.node_table(nodes) and the planner's inventory_from_nodes(nodes), when the
    caller keeps them from pass to pass (they change only with the nodes).
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
            inventory = list(pools) if pools is not None else inventory_from_nodes([dict(n) for n in nodes])
            planned = plan_for_spec(spec, inventory, facts=facts)
        except PlacementError as e:
            return no_placement(str(e.reason or "NoPlacement"), str(e.message))
        placement = sticky.record(planned.to_status(), max_model_len=planned.max_model_len, generation=generation,
                                  digest=digest, request=request, nodes=nodes if gpus is None else gpus, now=now)
    assert placement is not None
    try:
        mount = chat_template.mount if chat_template is not None else None
        inputs = server_inputs(name, namespace, uid, spec, placement, mount, backend_key_id)
        # A Deployment, or a group (StatefulSet + headless Service) per replica; and the Service
        # in front of the serving pods (the groups' leaders).
        children = group_builders.build_workload(inputs, spec.engine.distributed_executor)
    except ValueError as e:  # a URI the admission rules let through but we cannot map
        return no_placement("InvalidSpec", str(e))
    capacity = sticky.capacity_problem(name, placement, spec.replicas, nodes if gpus is None else gpus,
                                       spec.scheduling.node_selector)
    owned = (chat_template.owned_config_map,) if chat_template and chat_template.owned_config_map else ()
    return Decision(spec=spec, placement=placement, desired=(*children, *owned), replanned=cause,
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
    key_id: str | None = None
    if isinstance(parsed, LLMDeploymentSpec):
        key_step = await _backend_key(ctx, obs, parsed.backend_key.enabled) if ctx.backend_keys else None
        if isinstance(key_step, Retry):
            return key_step  # no pod may name a key the Secret does not hold
        key_id = key_step
    decision = decide(body, obs.nodes, facts, previous=previous, now=now, chat_template=template,
                      backend_key_id=key_id, gpus=obs.gpus, pools=obs.pools)
    keep, desired = decision.keep, decision.desired
    kept_groups = groups.observed_group_refs(obs.children)
    if diffplan.ChildRef("Deployment", name) in keep and kept_groups:
        # The kept workload is groups: keep them, and the Service that selects their leaders.
        keep |= kept_groups | {diffplan.ChildRef("Service", builders.service_name(name))}
        desired = tuple(d for d in desired if diffplan.ref_of(d) not in keep)
    plan = diffplan.plan_children(uid, desired, obs.children, keep=keep)
    result = await apply.execute_plan(ctx.api, namespace, uid, plan, ctx.metrics)
    group_plan = await _run_groups(ctx, obs, decision, previous)
    if group_plan is not None:
        result.written += group_plan[1].written
        result.error = result.error or group_plan[1].error
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
    pods = tuple(status.pod_view(p) for p in obs.pods)
    selector = builders.label_selector(name)
    groups_now = group_plan[0] if group_plan is not None else None
    if groups_now is not None and spec is not None:
        # Replicas are groups: one per StatefulSet, ready when every member is.
        rollout = groups.rollout_view(groups_now, spec.replicas)
        changed = [s for s in plan.apply if s.ref.kind == "StatefulSet" and s.reason != diffplan.ApplyReason.MISSING]
        if changed and not result.error:
            rollout = dataclasses.replace(rollout, observed_generation=0)  # the controller has yet to see it
        pods = groups.replica_views(groups_now, obs.pods)
        selector = builders.label_selector(name, group_builders.ROLE_LEADER)
    new_status = status.compute_status(
        status.StatusInputs(
            name=name,
            generation=generation,
            # Without a spec, a kept Deployment's own replicas are what should be serving.
            desired_replicas=spec.replicas if spec is not None else int(
                (observed_deployment or {}).get("spec", {}).get("replicas") or 0),
            served_model_names=tuple(served_names(spec, name)) if spec is not None else (name,),
            selector=selector,
            now=now,
            placement=decision.placement.to_api() if decision.placement is not None else None,
            placement_failure=decision.failure,
            kept_workload=decision.failure is not None and (
                observed_deployment is not None or bool(groups.observed_group_refs(obs.children))),
            capacity_problem=decision.capacity_problem,
            deployment=rollout,
            pods=pods,
            apply_error=result.error,
            conflicts=tuple(result.conflicts),
            groups=groups_now.groups if groups_now is not None else (),
            group_restart=groups_now.restarting if groups_now is not None else None,
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
        events += groups.restart_events(groups_now) if groups_now is not None else []
        if events:
            await apply.post_events(ctx.api, body, events, now)

    if result.error:
        return Retry(result.error) if result.retryable else WaitForChange(result.error)
    if result.conflicts:
        return Retry("; ".join(result.conflicts), after=CONFLICT_RETRY_SECONDS)
    if decision.spec is None and decision.failure is not None:
        return WaitForChange(decision.failure.message)
    if groups_now is not None and groups_now.retry_after is not None:
        return Retry("a group decision waits on time", after=groups_now.retry_after)
    return Done()


async def _backend_key(ctx: ReconcileContext, obs: Observation, enabled: bool) -> str | Retry | None:
    """Bring the backend-key Secret to the plan's state; the key id new pods get (None: no key).

    The plan is made from the watch cache. A new Secret is created in one call: the API
    server refuses a second one (409), and only then is it read. Any other write reads
    the Secret again first and writes with its resourceVersion, so a cache that lags our
    own last write never rotates twice or drops a key just added.
    """
    assert obs.llmdeployment is not None
    meta = obs.llmdeployment["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    request = backendkey.rotation_request(obs.llmdeployment)
    in_use = backendkey.pod_key_ids(obs.pods)

    def ours(secret: Mapping[str, Any] | None) -> backendkey.ObservedKeys | None:
        keys = backendkey.observed(secret)
        return keys if keys is not None and keys.owner_uid == uid else None

    plan = backendkey.plan_keys(enabled, ours(obs.backend_key), request, in_use)
    if not plan.writes:
        return plan.current
    try:
        if plan.create:
            try:
                logger.info("backend key of %s/%s: %s; %s", namespace, name, plan.reason,
                            await apply.write_backend_key(ctx.api, name, namespace, uid, plan, None))
                return plan.current
            except ApiError as e:
                if e.status != 409:
                    raise
                # It exists after all (the cache lags, or the name is taken): decide on what is there.
        fresh = await apply.read_secret(ctx.api, namespace, backendkey.secret_name(name))
        keys = ours(fresh)
        if fresh is not None and keys is None:
            return Retry(f"Secret {backendkey.secret_name(name)} exists and is not owned by this LLMDeployment; "
                         "rename or delete it", after=CONFLICT_RETRY_SECONDS)
        plan = backendkey.plan_keys(enabled, keys, request, in_use)
        if plan.writes:
            logger.info("backend key of %s/%s: %s; %s", namespace, name, plan.reason,
                        await apply.write_backend_key(ctx.api, name, namespace, uid, plan, keys))
    except ApiError as e:
        return Retry(f"writing the backend-key Secret failed: {e}")
    return plan.current


async def _run_groups(
    ctx: ReconcileContext, obs: Observation, decision: Decision, previous: Mapping[str, Any]
) -> tuple[groups.GroupPlan, apply.ExecuteResult] | None:
    """For replicas that span nodes: decide group restarts and leader labels (groups.py), and carry them out."""
    spec, placement = decision.spec, decision.placement
    if spec is None or decision.failure is not None or placement is None or placement.pods_per_replica < 2:
        return None
    assert obs.llmdeployment is not None
    meta = obs.llmdeployment["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    group_plan = groups.plan_groups(
        groups.desired_groups(name, spec.replicas, placement.pods_per_replica),
        [c for c in obs.children if c.get("kind") == "StatefulSet" and diffplan.controller_uid(c) == uid],
        obs.pods,
        json.dumps(served_names(spec, name)),
        ctx.clock(),
        previous.get("groups") or (),
    )
    leader = group_builders.leader_metadata(served_names(spec, name))
    return group_plan, await apply.execute_groups(ctx.api, namespace, group_plan, leader)
