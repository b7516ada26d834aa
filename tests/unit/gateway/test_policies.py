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
    # 6 in flight over 4 endpoints: the 7th request's cap is ceil(1.25 * 7 / 4) = 3 (and the
    # least loaded carries 1, plus a headroom of 2, is 3 too); the prefix's home endpoint
    # already carries 3, so the request spills to the next one.
    at_cap = {home: 3, **{e: 1 for e in E if e != home}}
    assert policy.choose("m", E, at_cap, "shared prefix") != home
    # 8 in flight: the 9th request's cap is 4 (the least loaded 2, plus 2); home carries 2, so it stays.
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


SYSTEM = "You are the support assistant of the Argosy platform team. " * 10  # 590 chars: 4 blocks


def conversation_key(system: str, *turns: str) -> str:
    # The shape prompt_prefix gives a chat request: the messages' contents, in order.
    return "\x1e".join((system, *turns))


def test_prefix_affinity_sends_a_conversations_next_turn_where_its_history_is_cached() -> None:
    policy = PrefixAffinity()
    first_turn = conversation_key(SYSTEM, "How do I scale a model to zero? " * 5)
    home = policy.choose("m", E, {}, first_turn)
    # Another endpoint served the same system prompt for someone else meanwhile ...
    other = next(e for e in E if e != home)
    busy = {e: 9 for e in E if e != other}
    assert policy.choose("m", E, busy, conversation_key(SYSTEM, "unrelated question " * 8)) == other
    # ... but the second turn's prompt extends the first one, so it goes back home, even when
    # home is a little busier than the endpoint that only shares the system prompt.
    second_turn = conversation_key(
        SYSTEM, "How do I scale a model to zero? " * 5, "Set replicas to 0. " * 8, "And back?"
    )
    assert policy.choose("m", E, {home: 1, other: 0}, second_turn) == home


def test_prefix_affinity_spreads_conversations_over_the_endpoints_sharing_a_system_prompt() -> None:
    policy = PrefixAffinity()
    for endpoint in E[:2]:  # two endpoints have served this system prompt
        busy = {e: 9 for e in E if e != endpoint}
        assert policy.choose("m", E, busy, conversation_key(SYSTEM, f"warm-up on {endpoint}")) == endpoint
    # A new conversation goes to the less loaded of the two, not to a cold endpoint.
    assert policy.choose("m", E, {E[0]: 2, E[1]: 1}, conversation_key(SYSTEM, "new question")) == E[1]
    assert policy.choose("m", E, {E[0]: 1, E[1]: 2}, conversation_key(SYSTEM, "another one")) == E[0]


def test_prefix_affinity_leaves_an_overloaded_endpoint_even_with_the_longest_prefix() -> None:
    policy = PrefixAffinity(load_factor=1.25)
    key = conversation_key(SYSTEM, "a long conversation " * 20)
    home = policy.choose("m", E, {}, key)
    # 8 in flight, all on home: the cap is ceil(1.25 * 9 / 4) = 3, so home is skipped.
    assert policy.choose("m", E, {home: 8}, key + "\x1emore") != home


def test_prefix_affinity_memory_is_bounded() -> None:
    policy = PrefixAffinity(max_blocks=50)
    for index in range(100):
        policy.choose("m", E, {}, f"{index:04d} " + "x" * 1000)  # 7 blocks each
    assert policy.remembered_blocks == 50
