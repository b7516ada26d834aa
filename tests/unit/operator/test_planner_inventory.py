"""GPU inventory from raw Node objects."""

from __future__ import annotations

from typing import Any

from argosy_operator.planner import GpuPool, inventory_from_nodes


def node(
    name: str,
    product: str | None = "NVIDIA-H100-80GB-HBM3",
    memory: str | None = "81559",
    gpus: str | None = "8",
    ready: str = "True",
    unschedulable: bool = False,
) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if product is not None:
        labels["nvidia.com/gpu.product"] = product
    if memory is not None:
        labels["nvidia.com/gpu.memory"] = memory
    allocatable = {"cpu": "96", "memory": "1Ti"}
    if gpus is not None:
        allocatable["nvidia.com/gpu"] = gpus
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {"allocatable": allocatable, "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_identical_nodes_form_one_pool() -> None:
    pools = inventory_from_nodes([node("h1"), node("h2"), node("l1", "NVIDIA-L4", "23034", "4")])
    assert pools == [
        GpuPool("NVIDIA-H100-80GB-HBM3", 81559, gpus_per_node=8, nodes=2),
        GpuPool("NVIDIA-L4", 23034, gpus_per_node=4, nodes=1),
    ]


def test_not_ready_cordoned_and_gpu_less_nodes_are_left_out() -> None:
    pools = inventory_from_nodes(
        [
            node("h1"),
            node("down", ready="False"),
            node("cordoned", unschedulable=True),
            node("cpu-only", product=None, memory=None, gpus=None),
            node("all-gpus-broken", gpus="0"),
        ]
    )
    assert pools == [GpuPool("NVIDIA-H100-80GB-HBM3", 81559, 8, 1)]


def test_allocatable_not_capacity_decides_the_gpu_count() -> None:
    # A node whose device plugin marks one GPU unhealthy allocates 7.
    pools = inventory_from_nodes([node("h1", gpus="7"), node("h2")])
    assert sorted((p.gpus_per_node, p.nodes) for p in pools) == [(7, 1), (8, 1)]


def test_nodes_without_the_memory_label_cannot_be_sized() -> None:
    assert inventory_from_nodes([node("h1", memory=None)]) == []


def test_missing_product_label_groups_as_unknown() -> None:
    assert inventory_from_nodes([node("x", product=None)])[0].product == "unknown"
