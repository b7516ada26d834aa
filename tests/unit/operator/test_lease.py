"""Leader election's decisions: who may take the Lease, and what each write says."""

from __future__ import annotations

import pytest
from argosy_operator.lease import Action, LeaseRecord, LeaseTimings, decide, lease_body, released_body

ME, OTHER = "operator-a_1", "operator-b_2"


def held(holder: str, *, duration: int = 10, version: str = "7", transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_seconds=duration, acquire_time="t0", renew_time="t1",
                       transitions=transitions, resource_version=version)


@pytest.mark.parametrize(("record", "unchanged_for", "action"), [
    (None, 0.0, Action.CREATE),                      # first replica ever
    (held(ME), 0.0, Action.RENEW),                   # ours: renew
    (held(ME), 60.0, Action.RENEW),                  # ours even when we were slow to renew
    (held(OTHER), 0.0, Action.WAIT),                 # a live leader
    (held(OTHER), 9.9, Action.WAIT),                 # not yet expired on our clock
    (held(OTHER), 10.0, Action.TAKE),                # unchanged for a whole leaseDuration: the leader is gone
    (held(""), 0.0, Action.TAKE),                    # released on a clean shutdown: take it at once
])
def test_who_may_take_the_lease(record: LeaseRecord | None, unchanged_for: float, action: Action) -> None:
    assert decide(record, ME, unchanged_for=unchanged_for) is action


def test_a_renewal_keeps_acquire_time_and_transitions_and_carries_the_resource_version() -> None:
    body = lease_body("argosy-operator", "argosy-system", ME, "t2", LeaseTimings(), held(ME))
    assert body["metadata"] == {"name": "argosy-operator", "namespace": "argosy-system", "resourceVersion": "7"}
    assert body["spec"] == {"holderIdentity": ME, "leaseDurationSeconds": 10, "acquireTime": "t0",
                            "renewTime": "t2", "leaseTransitions": 3}


def test_a_takeover_counts_a_transition_and_restarts_acquire_time() -> None:
    spec = lease_body("l", "ns", ME, "t2", LeaseTimings(), held(OTHER))["spec"]
    assert (spec["holderIdentity"], spec["acquireTime"], spec["leaseTransitions"]) == (ME, "t2", 4)


def test_creating_the_lease_needs_no_resource_version() -> None:
    body = lease_body("l", "ns", ME, "t2", LeaseTimings(duration=15, renew_deadline=10), None)
    assert "resourceVersion" not in body["metadata"]
    assert body["spec"]["leaseDurationSeconds"] == 15 and body["spec"]["leaseTransitions"] == 0


def test_releasing_empties_the_holder_so_a_standby_need_not_wait() -> None:
    spec = released_body("l", "ns", "t3", held(ME))["spec"]
    assert spec["holderIdentity"] == "" and decide(LeaseRecord.from_lease({"spec": spec}), OTHER,
                                                     unchanged_for=0.0) is Action.TAKE


def test_a_record_that_changed_only_its_resource_version_is_the_same_record() -> None:
    assert held(OTHER, version="7").same_as(held(OTHER, version="8"))
    assert not held(OTHER).same_as(held(ME))
    assert not held(OTHER).same_as(None)


@pytest.mark.parametrize(("duration", "deadline", "period"), [(10, 10, 2), (10, 7, 7), (10, 7, 0)])
def test_timings_that_could_let_two_leaders_overlap_are_refused(duration: float, deadline: float,
                                                                 period: float) -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaseTimings(duration=duration, renew_deadline=deadline, retry_period=period)
