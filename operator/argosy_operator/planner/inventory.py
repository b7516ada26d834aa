"""GPU inventory from Kubernetes Nodes (plain dicts as the API returns them)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"


@dataclass(frozen=True)
class GpuPool:
    """Identical GPU nodes: `nodes` nodes, each with `gpus_per_node` GPUs of `memory_mib` MiB."""

    product: str
    memory_mib: int
    gpus_per_node: int
    nodes: int

    def describe(self) -> str:
        node_word = "node" if self.nodes == 1 else "nodes"
        return f"{self.nodes} {node_word} x {self.gpus_per_node} {self.product} ({self.memory_mib / 1024:.0f} GiB each)"


def _is_ready(node: dict[str, Any]) -> bool:
    for condition in node.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _whole_number(quantity: object) -> int:
    """A GPU count quantity ("8", 8); anything else counts as zero."""
    try:
        return int(str(quantity))
    except ValueError:
        return 0


def inventory_from_nodes(nodes: list[dict[str, Any]]) -> list[GpuPool]:
    """Group Ready, schedulable GPU nodes by product, GPU memory and allocatable GPU count.

    Nodes without the GFD memory label cannot be sized and are left out.
    """
    groups: Counter[tuple[str, int, int]] = Counter()
    for node in nodes:
        if node.get("spec", {}).get("unschedulable") or not _is_ready(node):
            continue
        gpus = _whole_number(node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0))
        labels = node.get("metadata", {}).get("labels") or {}
        memory = _whole_number(labels.get(MEMORY_LABEL, 0))
        if gpus <= 0 or memory <= 0:
            continue
        groups[(labels.get(PRODUCT_LABEL) or "unknown", memory, gpus)] += 1
    return sorted(
        (GpuPool(product=p, memory_mib=m, gpus_per_node=g, nodes=n) for (p, m, g), n in groups.items()),
        key=lambda pool: (pool.product, pool.gpus_per_node, pool.memory_mib),
    )
