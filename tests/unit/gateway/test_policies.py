"""Routing policies: pure, table-driven."""

from __future__ import annotations

from collections import Counter

import pytest
from argosy_gateway.policies import LeastOutstanding, PrefixAffinity, RoundRobin, SessionAffinity, build_policies
from argosy_gateway.routetable import POLICY_NAMES

E = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


def test_every_policy_name_has_an_implementation() -> None:
    assert set(build_policies()) == set(POLICY_NAMES)


@pytest.mark.parametrize(
    ("outstanding", "expected"),
    [
        ({E[0]: 3, E[1]: 1, E[2]: 2}, E[1]),
        ({E[0]: 0, E[1]: 5, E[2]: 5}, E[0]),
        ({E[0]: 4, E[1]: 4}, E[2]),  # missing = 0 outstanding
    ],
)
def test_least_outstanding_picks_the_least_loaded(outstanding: dict[str, int], expected: str) -> None:
    assert LeastOutstanding().choose("m", E[:3], outstanding, None) == expected


def test_least_outstanding_spreads_ties() -> None:
    policy = LeastOutstanding()
    picks = Counter(policy.choose("m", E, {}, None) for _ in range(400))
    assert set(picks) == set(E) and min(picks.values()) == 100


def test_round_robin_cycles_per_model() -> None:
    policy = RoundRobin()
    assert [policy.choose("a", E[:3], {}, None) for _ in range(4)] == [E[0], E[1], E[2], E[0]]
    assert policy.choose("b", E[:3], {}, None) == E[0]  # another model has its own turn


def test_round_robin_state_is_bounded() -> None:
    policy = RoundRobin(max_models=10)
    for index in range(100):
        policy.choose(f"model-{index}", E, {}, None)
    assert len(policy._next) == 10


def test_prefix_affinity_keeps_a_prefix_on_one_endpoint() -> None:
    policy = PrefixAffinity()
    picks = {policy.choose("m", E, {}, "You are a helpful assistant. Q1") for _ in range(20)}
    assert len(picks) == 1


def test_prefix_affinity_spreads_different_prefixes() -> None:
    policy = PrefixAffinity()
    picks = Counter(policy.choose("m", E, {}, f"system prompt number {i}") for i in range(400))
    assert set(picks) == set(E)
    assert min(picks.values()) > 50  # roughly even: 100 each


def test_prefix_affinity_spills_over_one_and_a_quarter_fair_share() -> None:
    policy = PrefixAffinity(load_factor=1.25)
    home = policy.choose("m", E, {}, "shared prefix")
    # 6 in flight over 4 endpoints: the 7th request's cap is ceil(1.25 * 7 / 4) = 3, and the
    # prefix's home endpoint already carries 3, so the request spills to the next one.
    at_cap = {home: 3, **{e: 1 for e in E if e != home}}
    assert policy.choose("m", E, at_cap, "shared prefix") != home
    # 8 in flight: the 9th request's cap is ceil(1.25 * 9 / 4) = 3; home carries 2, so it stays.
    below_cap = {home: 2, **{e: 2 for e in E if e != home}}
    assert policy.choose("m", E, below_cap, "shared prefix") == home


def test_prefix_affinity_moves_only_the_keys_of_a_removed_endpoint() -> None:
    policy = PrefixAffinity()
    keys = [f"prompt {i}" for i in range(300)]
    before = {k: policy.choose("m", E, {}, k) for k in keys}
    after = {k: policy.choose("m", E[:3], {}, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == E[3] for k in moved)


def test_prefix_affinity_is_the_same_in_every_process() -> None:
    # Stable hashing (not Python's randomised hash): all gateway replicas agree.
    assert PrefixAffinity().choose("m", E, {}, "abc") == PrefixAffinity().choose("m", E, {}, "abc")
    assert PrefixAffinity().choose("m", E, {}, "abc") == "http://10.0.0.3:8000"


def test_session_affinity_sticks_regardless_of_load() -> None:
    policy = SessionAffinity()
    home = policy.choose("m", E, {}, "session-42")
    assert policy.choose("m", E, {home: 100}, "session-42") == home


def test_session_affinity_without_a_session_uses_the_least_loaded() -> None:
    loads = {E[0]: 5, E[1]: 0, E[2]: 5, E[3]: 5}
    assert SessionAffinity().choose("m", E, loads, None) == E[1]


def test_single_endpoint_is_always_chosen() -> None:
    for policy in build_policies().values():
        assert policy.choose("m", E[:1], {E[0]: 99}, "k") == E[0]
