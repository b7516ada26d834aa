"""Routing policies: pure, table-driven."""

from __future__ import annotations

from collections import Counter

import pytest
from argosy_gateway.podload import PodLoad, PodReport, parse_vllm_metrics, pod_load
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


# -- prefix affinity with the pods' own load (podload.PodLoad, from their /metrics) ------------


def _home(key: str) -> str:
    """Where a new prefix goes when nothing is loaded (its rendezvous home)."""
    return PrefixAffinity().choose("m", E, {}, key)


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # Nothing reported: the home endpoint, as without pod loads.
        ({}, "home"),
        # The home pod queues requests (its batch is full): elsewhere, whatever it caches.
        ({"home": PodLoad(hidden=20, waiting=4, kv_cache_usage=0.5)}, "not home"),
        # Busy with others' requests but nothing queued: affinity wins (a spilled prefix costs its cache).
        ({"home": PodLoad(hidden=6, waiting=0, kv_cache_usage=0.5)}, "home"),
        # The home pod's KV cache is full: not chosen while another has room.
        ({"home": PodLoad(hidden=0, waiting=0, kv_cache_usage=0.97)}, "not home"),
        # Every pod is overloaded: the request still goes somewhere (home).
        ({e: PodLoad(hidden=0, waiting=2, kv_cache_usage=0.99) for e in E}, "home"),
    ],
)
def test_prefix_affinity_avoids_pods_that_report_overload(pods: dict[str, PodLoad], expected: str) -> None:
    key = "You are a pirate. " * 20
    home = _home(key)
    loads = {(home if e == "home" else e): load for e, load in pods.items()}
    chosen = PrefixAffinity(pod_loads=loads).choose("m", E, {}, key)
    assert (chosen == home) == (expected == "home")


def test_prefix_affinity_sends_a_cached_conversation_back_unless_its_pod_is_overloaded() -> None:
    pods: dict[str, PodLoad] = {}
    policy = PrefixAffinity(pod_loads=pods)
    first = policy.choose("m", E, {}, "system " * 100 + "turn 1")
    assert policy.choose("m", E, {}, "system " * 100 + "turn 1 reply turn 2") == first
    pods[first] = PodLoad(hidden=16, waiting=3, kv_cache_usage=0.5)  # others filled its batch meanwhile
    moved = policy.choose("m", E, {}, "system " * 100 + "turn 1 reply turn 2 reply turn 3")
    assert moved != first
    pods.clear()  # no report any more (the scrape failed): own counts only, back to the longest cache
    assert policy.choose("m", E, {}, "system " * 100 + "turn 1 reply turn 2 reply turn 3 more") in (first, moved)


def test_between_equal_holders_the_pod_with_less_load_from_others_wins() -> None:
    pods: dict[str, PodLoad] = {}
    policy = PrefixAffinity(pod_loads=pods)
    prompt = "shared system prompt " * 40
    first = policy.choose("m", E, {}, prompt)
    second = policy.choose("m", E, {first: 3}, prompt)  # over the bound at 3 (headroom 2): a second holder
    assert second != first
    pods[first] = PodLoad(hidden=5, waiting=0, kv_cache_usage=0.3)
    assert policy.choose("m", E, {}, prompt + " next") == second
    pods[first], pods[second] = PodLoad(0, 0, 0.3), PodLoad(5, 0, 0.3)
    assert policy.choose("m", E, {}, prompt + " next") == first


def test_pod_load_is_what_the_pod_runs_beyond_our_own_requests() -> None:
    report = PodReport(running=5.0, waiting=3.0, kv_cache_usage=0.4)
    assert pod_load(report, ours=2) == PodLoad(hidden=6, waiting=3, kv_cache_usage=0.4)
    assert pod_load(report, ours=10).hidden == 0  # our count is newer than the report
    assert pod_load(PodReport(0, 0, 1.7), 0).kv_cache_usage == 1.0
    assert not PodLoad(9, 0, 0.5).overloaded(0.95) and PodLoad(0, 1, 0.5).overloaded(0.95)


VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 7.0
"""


def test_vllm_metrics_page_is_read_per_engine() -> None:
    assert parse_vllm_metrics(VLLM_PAGE) == PodReport(running=5.0, waiting=4.0, kv_cache_usage=0.75)


@pytest.mark.parametrize("page", ["", "# a page without vLLM's gauges\nup 1\n", "<html>not metrics</html>"])
def test_a_page_without_vllm_gauges_reports_nothing(page: str) -> None:
    assert parse_vllm_metrics(page) is None
