"""Desired vs observed children -> what to apply and what to delete (pure, table-tested).

The execute step (apply.py) carries the plan out; nothing here talks to the API.
Applying is idempotent, so "apply everything every pass" would be correct too. The
plan skips an object only when both hold:

- the hash of the desired object equals the hash recorded on the live child when it
  was last applied (annotation argosy.dev/applied-hash). A field we stopped sending
  (a removed env entry, toleration, nodeSelector key, ...) changes the hash, and the
  next server-side apply removes it: the field manager owned it and no longer sends it;
- the live state still contains every field we want, so a hand edit of a field we own
  is repaired (an edit of a field we do not set is not drift: server-side apply would
  leave it alone as well).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

APPLIED_HASH_ANNOTATION = "argosy.dev/applied-hash"
"""On every child: a hash of the object the operator applied (minus this annotation)."""


@dataclasses.dataclass(frozen=True, order=True)
class ChildRef:
    kind: str
    name: str


class ApplyReason(enum.StrEnum):
    MISSING = "missing"
    """Not in the cache: created, or re-created after a deletion. Ownership is unknown."""
    CHANGED = "changed"
    """Ours, but what we want differs from what we last applied (spec change, removed field)."""
    DRIFTED = "drifted"
    """Ours and applied as wanted, but a field we set differs on the live object (hand edit)."""


@dataclasses.dataclass(frozen=True)
class ApplyStep:
    ref: ChildRef
    body: Mapping[str, Any]
    reason: ApplyReason


@dataclasses.dataclass(frozen=True)
class DeleteStep:
    ref: ChildRef
    api_version: str
    uid: str
    """Delete precondition: never remove an object that was replaced meanwhile."""


@dataclasses.dataclass(frozen=True)
class Conflict:
    ref: ChildRef
    message: str


@dataclasses.dataclass(frozen=True)
class ChildPlan:
    apply: tuple[ApplyStep, ...] = ()
    delete: tuple[DeleteStep, ...] = ()
    conflicts: tuple[Conflict, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not (self.apply or self.delete)


def ref_of(obj: Mapping[str, Any]) -> ChildRef:
    return ChildRef(kind=str(obj["kind"]), name=str(obj["metadata"]["name"]))


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def applied_hash(obj: Mapping[str, Any]) -> str:
    """A stable hash of a desired object, ignoring the applied-hash annotation itself."""
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_HASH_ANNOTATION}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    canonical = json.dumps({**obj, "metadata": meta}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def stamped(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with its applied-hash annotation, as it is sent to the API server."""
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH_ANNOTATION: applied_hash(obj)}
    return {**obj, "metadata": meta}


def recorded_hash(live: Mapping[str, Any]) -> str | None:
    value = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
    return str(value) if value is not None else None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping | list) and not value)


def contains(desired: Any, observed: Any) -> bool:
    """True when every field of `desired` is present in `observed` with the same value.

    Extra fields in `observed` (defaults, other managers' fields, status) are fine.
    Lists whose items all carry a `name` are matched by name, like server-side apply's
    map-lists (containers, env, ports, volumes); other lists must match item by item.
    """
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return _is_empty(desired) and _is_empty(observed)
        for key, value in desired.items():
            if key not in observed:
                if _is_empty(value):
                    continue
                return False
            if not contains(value, observed[key]):
                return False
        return True
    if isinstance(desired, list):
        if observed is None:
            return not desired
        if not isinstance(observed, list):
            return False
        if desired and all(isinstance(d, Mapping) and "name" in d for d in desired):
            by_name = {o.get("name"): o for o in observed if isinstance(o, Mapping)}
            return all(d["name"] in by_name and contains(d, by_name[d["name"]]) for d in desired)
        return len(desired) == len(observed) and all(
            contains(d, o) for d, o in zip(desired, observed, strict=True)
        )
    return bool(desired == observed)


def plan_children(
    owner_uid: str,
    desired: Iterable[Mapping[str, Any]],
    observed: Iterable[Mapping[str, Any]],
    keep: frozenset[ChildRef] = frozenset(),
) -> ChildPlan:
    """Compare the builders' output with the cached children of one LLMDeployment.

    `observed` are the objects labelled as this LLMDeployment's children; only those
    whose controller reference is `owner_uid` are ever changed or deleted. The bodies in
    the plan carry the applied-hash annotation. Children named in `keep` are left as
    they are: neither applied nor deleted (a serving workload the operator has no
    placement for must not be taken down by it).
    """
    observed_by_ref: dict[ChildRef, Mapping[str, Any]] = {}
    for obj in observed:
        if obj.get("metadata", {}).get("deletionTimestamp"):
            continue  # already going away; treat as absent
        observed_by_ref[ref_of(obj)] = obj

    applies: list[ApplyStep] = []
    conflicts: list[Conflict] = []
    desired_refs: set[ChildRef] = set()
    for wanted in desired:
        ref = ref_of(wanted)
        desired_refs.add(ref)
        body = stamped(wanted)
        live = observed_by_ref.get(ref)
        if live is None:
            applies.append(ApplyStep(ref, body, ApplyReason.MISSING))
            continue
        owner = controller_uid(live)
        if owner != owner_uid:
            conflicts.append(Conflict(ref, (
                f"{ref.kind} {ref.name} exists but is controlled by "
                f"{'another object (uid ' + owner + ')' if owner else 'no LLMDeployment'}; "
                "it is left untouched until it is removed"
            )))
            continue
        if recorded_hash(live) != recorded_hash(body):
            applies.append(ApplyStep(ref, body, ApplyReason.CHANGED))
        elif not contains(body, live):
            applies.append(ApplyStep(ref, body, ApplyReason.DRIFTED))

    deletes = [
        DeleteStep(ref, str(obj.get("apiVersion", "")), str(obj["metadata"].get("uid", "")))
        for ref, obj in sorted(observed_by_ref.items())
        if ref not in desired_refs and ref not in keep and controller_uid(obj) == owner_uid
    ]
    return ChildPlan(apply=tuple(applies), delete=tuple(deletes), conflicts=tuple(conflicts))
