"""GPU planner: sizes a vLLM replica from model facts and the cluster's GPU inventory (pure)."""

from argosy_operator.planner.errors import PlacementError, PlacementReason
from argosy_operator.planner.facts import (
    ShippedModel,
    facts_from_hf_config,
    find_shipped,
    parameter_count,
    parameter_counts,
    remote_code_classes,
    remote_code_note,
    resolve_facts,
    shipped_models,
)
from argosy_operator.planner.inventory import GpuPool, inventory_from_nodes
from argosy_operator.planner.memory import EngineSettings, MemoryEstimate, estimate
from argosy_operator.planner.sizing import (
    Placement,
    PlanRequest,
    plan,
    plan_for_spec,
    request_from_spec,
    tensor_problem,
    valid_tensor_sizes,
)

__all__ = [
    "EngineSettings",
    "GpuPool",
    "MemoryEstimate",
    "Placement",
    "PlacementError",
    "PlacementReason",
    "PlanRequest",
    "ShippedModel",
    "estimate",
    "facts_from_hf_config",
    "find_shipped",
    "inventory_from_nodes",
    "parameter_count",
    "parameter_counts",
    "plan",
    "plan_for_spec",
    "remote_code_classes",
    "remote_code_note",
    "request_from_spec",
    "resolve_facts",
    "shipped_models",
    "tensor_problem",
    "valid_tensor_sizes",
]
