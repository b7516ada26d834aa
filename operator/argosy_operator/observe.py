"""What a reconcile pass reads: trimmed copies of watched objects, grouped per LLMDeployment.

kopf's indexes keep these copies up to date from watch streams, so a pass reads
memory, not the API server. The functions here only shape the copies (pure).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from argosy_operator.builders import LABEL_DEPLOYMENT
from argosy_operator.planner.inventory import GpuPool, inventory_from_nodes
from argosy_operator.sticky import NodeGpus, node_table

ObjectKey = tuple[str, str]
"""(namespace, LLMDeployment name)."""


def _copy(value: Any) -> Any:
    """An independent copy of JSON-shaped data (mappings, lists, scalars).

    kopf hands out read-only views over its own dicts. copy.deepcopy did this too, at
    several times the cost (its memo and dispatch), on every watch event of every object.
    """
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def _copy_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) for k, v in obj.items()}


def _plain(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object without metadata.managedFields (never read, and the largest part), copied."""
    copied = {k: _copy(v) for k, v in obj.items() if k != "metadata"}
    meta = obj.get("metadata")
    if meta is not None:
        copied["metadata"] = {k: _copy(v) for k, v in meta.items() if k != "managedFields"}
    return copied


def trim_llmdeployment(body: Mapping[str, Any]) -> dict[str, Any]:
    return _plain(body)


def trim_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node that describe its GPUs and whether pods may land on it."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return _copy_dict({
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {"unschedulable": bool(spec.get("unschedulable")), "taints": list(spec.get("taints") or [])},
        "status": {
            "capacity": dict(status.get("capacity") or {}),
            "allocatable": dict(status.get("allocatable") or {}),
            # Only type and status: heartbeat timestamps would make every copy differ.
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or () if c.get("type") == "Ready"
            ],
        },
    })


def gpu_view(node: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a trimmed node matters to placement (heartbeats change nothing here)."""
    labels = node["metadata"]["labels"]
    return (
        node["metadata"]["name"],
        tuple(sorted((k, v) for k, v in labels.items() if k.startswith("nvidia.com/"))),
        node["spec"]["unschedulable"],
        node["status"]["allocatable"].get("nvidia.com/gpu"),
        tuple(c.get("status") for c in node["status"].get("conditions") or ()),
    )


def trim_child(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Deployment, StatefulSet, Service or ConfigMap as we compare it with the desired one (minus bookkeeping)."""
    return _plain(body)


def trim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return _copy_dict({
        "metadata": {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            # Ours only (the served names a group leader must carry), not every tool's.
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("argosy.dev/")},
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")}
                for c in status.get("conditions") or ()
            ],
            "containerStatuses": [
                {"name": cs.get("name"), "ready": cs.get("ready"),
                 "restartCount": cs.get("restartCount"), "state": cs.get("state")}
                for cs in status.get("containerStatuses") or ()
            ],
        },
    })


def trim_backend_key(body: Mapping[str, Any]) -> dict[str, Any]:
    """The backend-key Secret without its values: entry names and bookkeeping (backendkey.py).

    The operator never needs a key after it made it, so none is kept in memory.
    """
    meta = body.get("metadata") or {}
    return _copy_dict({
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion", "labels",
                                              "annotations", "ownerReferences", "deletionTimestamp")
                     if meta.get(k) is not None},
        "data": {k: "" for k in body.get("data") or {}},
    })


def owner_key(body: Mapping[str, Any]) -> ObjectKey | None:
    """The LLMDeployment a labelled child belongs to, from its argosy.dev/deployment label."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(LABEL_DEPLOYMENT)
    namespace = meta.get("namespace")
    if not owner or not namespace:
        return None
    return (str(namespace), str(owner))


@dataclasses.dataclass(frozen=True)
class Observation:
    """Everything one reconcile pass of one LLMDeployment looks at."""

    key: ObjectKey
    llmdeployment: Mapping[str, Any] | None
    nodes: tuple[Mapping[str, Any], ...] = ()
    children: tuple[Mapping[str, Any], ...] = ()
    pods: tuple[Mapping[str, Any], ...] = ()
    backend_key: Mapping[str, Any] | None = None
    """The backend-key Secret (trimmed: no values), when one exists."""
    gpus: tuple[NodeGpus, ...] | None = None
    """sticky.node_table(nodes) when the caller keeps one per inventory (None: computed from nodes)."""
    pools: tuple[GpuPool, ...] | None = None
    """The planner's inventory_from_nodes(nodes), kept the same way."""


@dataclasses.dataclass(frozen=True)
class NodeTables:
    """What passes read of the GPU nodes, computed once for one set of node objects."""

    nodes: tuple[Mapping[str, Any], ...] = ()
    gpus: tuple[NodeGpus, ...] = ()
    pools: tuple[GpuPool, ...] = ()

    def current(self, nodes: tuple[Mapping[str, Any], ...]) -> NodeTables:
        """These tables when `nodes` are the very objects they were made from (kopf replaces a node's
        object on every event for it), else new ones."""
        if len(nodes) == len(self.nodes) and all(a is b for a, b in zip(nodes, self.nodes, strict=True)):
            return self
        return NodeTables(nodes, node_table(nodes), tuple(inventory_from_nodes([dict(n) for n in nodes])))


def _values(index: Mapping[Any, Iterable[Any]] | None, key: Any) -> tuple[Any, ...]:
    if index is None:
        return ()
    store = index.get(key)
    return tuple(store) if store is not None else ()


def observe(
    key: ObjectKey,
    llmdeployments: Mapping[Any, Iterable[Any]] | None,
    nodes: Mapping[Any, Iterable[Any]] | None,
    children: Mapping[Any, Iterable[Any]] | None,
    pods: Mapping[Any, Iterable[Any]] | None,
    backend_keys: Mapping[Any, Iterable[Any]] | None = None,
) -> Observation:
    """Assemble an Observation from kopf's indexes (or any mapping of key -> values)."""
    found = _values(llmdeployments, key)
    secrets = [s for s in _values(backend_keys, key) if not s["metadata"].get("deletionTimestamp")]
    return Observation(
        key=key,
        llmdeployment=found[0] if found else None,
        nodes=_values(nodes, None),
        children=_values(children, key),
        pods=_values(pods, key),
        backend_key=secrets[0] if secrets else None,
    )
