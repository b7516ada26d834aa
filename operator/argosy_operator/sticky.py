"""Sticky placement: keep a model where it was placed, and say when the cluster can no longer hold it (pure).

A placement is planned once for a spec and recorded in status.placement with what it was
planned for (status.placement.plannedFor). Later passes keep it while the spec (without
`replicas`) is unchanged and no re-plan was requested with the argosy.dev/replan
annotation. A change of the GPU inventory never re-plans: a cordoned, NotReady or
removed pool only makes the model Degraded (its running pods keep running), and a new,
cheaper pool does not move it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from argosy_operator.api import LLMDeploymentSpec, PlacementBasis, PlacementStatus
from argosy_operator.planner.inventory import GPU_RESOURCE, MEMORY_LABEL, PRODUCT_LABEL

REPLAN_ANNOTATION = "argosy.dev/replan"
"""Any value other than the one recorded in status.placement.plannedFor.replanRequest asks for one re-plan."""


def spec_hash(spec: LLMDeploymentSpec) -> str:
    """The hash a placement is recorded with: the whole spec but `replicas`, `backendKey` and `rollout`.

    Scaling (kubectl scale, an autoscaler, the gateway waking a model) bumps
    metadata.generation too, and must never move a serving model.
    """
    # Neither the backend key (turning it on or off only rolls the pods) nor the rollout strategy
    # (it reaches the Deployment, not the pods) changes what a replica needs.
    data = spec.model_dump(mode="json", by_alias=True, exclude={"replicas", "backend_key", "rollout"})
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def replan_request(body: Mapping[str, Any]) -> str | None:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(REPLAN_ANNOTATION)
    return str(value) if value is not None else None


def recorded_placement(status: Mapping[str, Any] | None) -> PlacementStatus | None:
    """status.placement when it carries what it was planned for; None otherwise (plan afresh)."""
    raw = (status or {}).get("placement")
    if not isinstance(raw, Mapping):
        return None
    try:
        record = PlacementStatus.model_validate(raw)
    except ValueError:
        return None
    return record if record.planned_for is not None and record.max_model_len is not None else None


def replan_cause(record: PlacementStatus | None, digest: str, request: str | None) -> str | None:
    """Why the placement must be planned (again), or None to keep the recorded one."""
    if record is None or record.planned_for is None:
        return "first placement"
    if record.planned_for.spec_hash != digest:
        return f"the spec changed since generation {record.planned_for.generation}"
    if request is not None and request != record.planned_for.replan_request:
        return f"re-plan requested ({REPLAN_ANNOTATION}={request})"
    return None


@dataclasses.dataclass(frozen=True)
class NodeGpus:
    """What of a Node decides whether a recorded placement's pods can run on it."""

    name: str
    product: str
    memory_mib: int
    gpus: int
    ready: bool
    cordoned: bool
    labels: Mapping[str, str]


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def node_gpus(node: Mapping[str, Any]) -> NodeGpus:
    meta = node.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    status = node.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return NodeGpus(
        name=str(meta.get("name", "")),
        product=labels.get(PRODUCT_LABEL, ""),
        memory_mib=_int(labels.get(MEMORY_LABEL, 0)),
        gpus=_int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0)),
        ready=ready,
        cordoned=bool((node.get("spec") or {}).get("unschedulable")),
        labels=labels,
    )


NodeLike = Mapping[str, Any] | NodeGpus
"""A Node (as watched), or its NodeGpus already computed (once per inventory change, not per pass)."""


def node_table(nodes: Iterable[NodeLike]) -> tuple[NodeGpus, ...]:
    return tuple(n if isinstance(n, NodeGpus) else node_gpus(n) for n in nodes)


def pool_basis(product: str | None, gpus_per_pod: int, nodes: Iterable[NodeLike]) -> tuple[int, int]:
    """(GPUs per node, MiB per GPU) of the pool a fresh placement on `product` was sized against.

    Pods are pinned to the product only, so the smallest GPU memory among that product's
    usable nodes is what the sizing can rely on.
    """
    usable = [n for n in node_table(nodes)
              if n.product == product and n.ready and not n.cordoned and n.gpus >= gpus_per_pod and n.memory_mib > 0]
    if not usable:
        return max(1, gpus_per_pod), 1
    return max(n.gpus for n in usable), min(n.memory_mib for n in usable)


def record(
    placement: Mapping[str, Any], *, max_model_len: int, generation: int, digest: str, request: str | None,
    nodes: Iterable[NodeLike], now: str,
) -> PlacementStatus:
    """The status.placement of a fresh plan (`placement` is the planner's Placement.to_status())."""
    gpus_per_node, memory = pool_basis(placement.get("gpuProduct"), int(placement["gpusPerPod"]), nodes)
    return PlacementStatus.model_validate({
        **placement,
        "maxModelLen": max_model_len,
        "plannedFor": PlacementBasis.model_validate({
            "generation": generation, "specHash": digest, "replanRequest": request, "gpusPerNode": gpus_per_node,
            "gpuMemoryMiB": memory, "plannedTime": now,
        }).to_api(),
    })


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def capacity_problem(
    name: str, placement: PlacementStatus, replicas: int, nodes: Iterable[NodeLike],
    node_selector: Mapping[str, str] | None = None,
) -> str | None:
    """Why some of the placement's pods could not be scheduled again, or None when the pool holds them all.

    Counts what the Ready, schedulable nodes of the recorded GPU product could hold
    (allocatable GPUs, not free ones: other workloads are the scheduler's business).
    """
    basis = placement.planned_for
    needed = replicas * placement.pods_per_replica
    if basis is None or needed <= 0:
        return None
    selector = dict(node_selector or {})
    matching = [
        n for n in node_table(nodes)
        if n.product == placement.gpu_product and n.memory_mib >= basis.gpu_memory_mi_b
        and n.gpus >= placement.gpus_per_pod and all(n.labels.get(k) == v for k, v in selector.items())
    ]
    usable = [n for n in matching if n.ready and not n.cordoned]
    holds = sum(n.gpus // placement.gpus_per_pod for n in usable)
    if holds >= needed:
        return None
    short = needed - holds
    pool = f"pool {placement.gpu_product} ({basis.gpu_memory_mi_b / 1024:.0f} GiB GPUs)"
    if not matching:
        why = f"no node of {pool} is left"
    else:
        parts = [f"{_count(sum(1 for n in matching if n.cordoned), 'node')} cordoned",
                 f"{sum(1 for n in matching if not n.ready)} NotReady"]
        if usable:
            parts.append(f"{_count(len(usable), 'usable node')} holding {_count(holds, 'pod')}")
        why = f"{pool}: " + ", ".join(parts)
        if not usable and all(n.cordoned for n in matching):
            why = f"{pool} cordoned ({_count(len(matching), 'node')})"
    return (
        f"{short} of {_count(needed, 'pod')} cannot be rescheduled: {why}. Running pods keep running and the "
        f"placement stays as it is until the nodes come back, the spec changes or a re-plan is requested "
        f"(kubectl annotate lld/{name} {REPLAN_ANNOTATION}=$(date +%s) --overwrite)"
    )
