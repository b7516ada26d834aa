"""Simulated GPU node pools: what the sandbox's fake nodes look like to the scheduler and the operator.

Each GPU node carries the labels NVIDIA's GPU Feature Discovery puts on real nodes
(``nvidia.com/gpu.product``, ``nvidia.com/gpu.memory`` in MiB, ``nvidia.com/gpu.count``),
allocatable ``nvidia.com/gpu``, and the ``nvidia.com/gpu`` NoSchedule taint that GPU
node pools usually have, so only pods that tolerate it land there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POOL_LABEL = "argosy.dev/sandbox-pool"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


@dataclass(frozen=True)
class GpuSpec:
    product: str
    memory_mib: int
    count: int


@dataclass(frozen=True)
class NodePool:
    name: str
    nodes: int
    cpu: str
    memory: str
    gpu: GpuSpec | None = None
    taint_gpu_nodes: bool = True
    labels: dict[str, str] = field(default_factory=dict)


DEFAULT_POOLS = (
    NodePool("h100", 2, cpu="192", memory="2Ti", gpu=GpuSpec("NVIDIA-H100-80GB-HBM3", 81559, 8)),
    NodePool("a100", 2, cpu="96", memory="1152Gi", gpu=GpuSpec("NVIDIA-A100-SXM4-40GB", 40960, 8)),
    NodePool("l4", 4, cpu="16", memory="64Gi", gpu=GpuSpec("NVIDIA-L4", 23034, 1)),
    NodePool("cpu", 1, cpu="16", memory="64Gi"),
)


class PoolConfigError(ValueError):
    """The pools file is malformed; the message says where."""


def load_pools(path: Path) -> tuple[NodePool, ...]:
    """Read pools from YAML: ``pools: [{name, nodes, cpu, memory, gpu: {product, memoryMiB, count}}]``."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise PoolConfigError(f"cannot read pools file {path}: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("pools"), list):
        raise PoolConfigError(f"{path}: expected a mapping with a 'pools' list")
    pools = []
    for index, entry in enumerate(document["pools"]):
        where = f"{path}: pools[{index}]"
        if not isinstance(entry, dict):
            raise PoolConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "nodes", "cpu", "memory", "gpu", "taintGpuNodes", "labels"}
        if unknown:
            raise PoolConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            gpu = entry.get("gpu")
            pools.append(
                NodePool(
                    name=str(entry["name"]),
                    nodes=int(entry["nodes"]),
                    cpu=str(entry.get("cpu", "16")),
                    memory=str(entry.get("memory", "64Gi")),
                    gpu=GpuSpec(str(gpu["product"]), int(gpu["memoryMiB"]), int(gpu["count"])) if gpu else None,
                    taint_gpu_nodes=bool(entry.get("taintGpuNodes", True)),
                    labels={str(k): str(v) for k, v in (entry.get("labels") or {}).items()},
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PoolConfigError(f"{where}: {error!r}") from error
        if pools[-1].nodes < 0 or (pools[-1].gpu and pools[-1].gpu.count < 1):
            raise PoolConfigError(f"{where}: node and GPU counts must be positive")
    names = [pool.name for pool in pools]
    if len(set(names)) != len(names):
        raise PoolConfigError(f"{path}: pool names must be unique")
    return tuple(pools)


def node_name(pool: NodePool, index: int) -> str:
    return f"{pool.name}-{index}"


def node_manifests(pools: tuple[NodePool, ...]) -> list[dict[str, Any]]:
    """The Node objects (with status) for every pool."""
    nodes = []
    for pool in pools:
        for index in range(pool.nodes):
            name = node_name(pool, index)
            labels = {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                POOL_LABEL: pool.name,
                **pool.labels,
            }
            resources = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110"}
            taints = []
            if pool.gpu is not None:
                labels.update(
                    {
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": pool.gpu.product,
                        "nvidia.com/gpu.memory": str(pool.gpu.memory_mib),
                        "nvidia.com/gpu.count": str(pool.gpu.count),
                    }
                )
                resources["nvidia.com/gpu"] = str(pool.gpu.count)
                if pool.taint_gpu_nodes:
                    taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
                    "spec": {"taints": taints},
                    "status": {"capacity": dict(resources), "allocatable": dict(resources)},
                }
            )
    return nodes
