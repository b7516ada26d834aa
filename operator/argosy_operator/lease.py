"""Leader election on a coordination.k8s.io Lease: the pure decisions (no I/O, no clock).

The algorithm is the one kube-controller-manager and controller-runtime use: the
holder renews `spec.renewTime` every retry period; a candidate takes the Lease only
when it has seen no change of the record for a whole `leaseDurationSeconds` on its
own clock (never comparing its clock with the holder's timestamps), or when the
holder released it. Writes carry the resourceVersion that was read, so of two
candidates racing for an expired Lease the API server lets exactly one win.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

LEASE_API_VERSION = "coordination.k8s.io/v1"


@dataclasses.dataclass(frozen=True)
class LeaseTimings:
    """Seconds. A dead leader is replaced within duration + retry_period."""

    duration: float = 10.0
    """leaseDurationSeconds: how long a candidate waits, seeing no renewal, before taking over."""
    renew_deadline: float = 7.0
    """The leader stops working when it could not renew for this long (< duration, so it has
    stopped before anyone else may start)."""
    retry_period: float = 2.0
    """How often the leader renews and candidates look."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError("lease timings need 0 < retry period < renew deadline < duration, got "
                             f"{self.retry_period} / {self.renew_deadline} / {self.duration}")


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    holder: str
    """spec.holderIdentity; empty when released."""
    duration_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    resource_version: str | None = None

    @classmethod
    def from_lease(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )

    def same_as(self, other: LeaseRecord | None) -> bool:
        """The record did not change (the holder did not renew, nobody took over)."""
        return other is not None and dataclasses.replace(self, resource_version=None) == dataclasses.replace(
            other, resource_version=None)


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # we hold it
    TAKE = "take"  # released, or expired on our clock
    WAIT = "wait"  # somebody else holds a live Lease


def decide(record: LeaseRecord | None, identity: str, *, unchanged_for: float) -> Action:
    """What a candidate does with the Lease it just read.

    `unchanged_for`: seconds (our monotonic clock) since we first saw this exact record.
    """
    if record is None:
        return Action.CREATE
    if record.holder == identity:
        return Action.RENEW
    if not record.holder or unchanged_for >= record.duration_seconds:
        return Action.TAKE
    return Action.WAIT


def lease_body(
    name: str,
    namespace: str,
    identity: str,
    now: str,
    timings: LeaseTimings,
    previous: LeaseRecord | None,
) -> dict[str, Any]:
    """The Lease we write to create, renew or take it (`now` in RFC 3339 with microseconds)."""
    ours = previous is not None and previous.holder == identity
    transitions = previous.transitions if previous is not None else 0
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if previous is not None and previous.resource_version:
        metadata["resourceVersion"] = previous.resource_version  # optimistic concurrency
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": int(timings.duration),
            "acquireTime": previous.acquire_time if ours and previous is not None else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or previous is None else transitions + 1,
        },
    }


def released_body(name: str, namespace: str, now: str, previous: LeaseRecord) -> dict[str, Any]:
    """Give the Lease up on a clean shutdown, so a standby takes over at its next look."""
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace,
                     **({"resourceVersion": previous.resource_version} if previous.resource_version else {})},
        "spec": {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": previous.acquire_time,
            "renewTime": now,
            "leaseTransitions": previous.transitions,
        },
    }
