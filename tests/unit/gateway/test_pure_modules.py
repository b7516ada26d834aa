"""Pure building blocks: request checks, route table and static config, health, keys, rates, usage."""

from __future__ import annotations

import pytest
from argosy_gateway.auth import bearer_token, hash_key, parse_keys_file
from argosy_gateway.discovery.static import parse_static_config
from argosy_gateway.errors import GatewayError
from argosy_gateway.health import EndpointHealth
from argosy_gateway.parsing import CHAT, COMPLETIONS, EMBEDDINGS, parse_request, prompt_prefix
from argosy_gateway.ratelimit import TokenBuckets
from argosy_gateway.routetable import ModelRoute, RouteTable, endpoint_address
from argosy_gateway.usage import extract_usage


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (COMPLETIONS, b'{"model": "m"}', "prompt"),
        (COMPLETIONS, b'{"model": "m", "prompt": 5}', "prompt"),
        (EMBEDDINGS, b'{"model": "m"}', "input"),
        (CHAT, b'{"model": "m", "messages": [1]}', "messages[0]"),
        (CHAT, b'{"model": "m", "messages": []}', "messages"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "stop": [1]}', "stop"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "user": 1}', "user"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "n": 1.5}', "n"),
        (CHAT, b'{"model": "", "messages": [{"role": "user"}]}', "model"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "stream_options": true}', "stream_options"),
    ],
)
def test_bad_fields_are_400_naming_the_field(kind: str, body: bytes, param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_request(kind, body)
    assert caught.value.status == 400 and caught.value.param == param


def test_invalid_utf8_is_reported_as_such() -> None:
    with pytest.raises(GatewayError, match="UTF-8"):
        parse_request(CHAT, b'{"model": "\xc3\x28"}')


def test_a_good_request_yields_model_stream_and_user() -> None:
    parsed = parse_request(CHAT, b'{"model": "m", "messages": [{"role": "user"}], "stream": true, "user": "u1"}')
    assert (parsed.model, parsed.stream, parsed.user) == ("m", True, "u1")
    assert parse_request(COMPLETIONS, b'{"model": "m", "prompt": "x", "max_tokens": null}').stream is False


def test_prompt_prefix_reads_the_start_of_messages_and_prompts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": [{"type": "text", "text": "defgh"}]},
        ]
    }
    assert prompt_prefix(CHAT, body, 5) == "abc\x1ed"
    assert prompt_prefix(COMPLETIONS, {"prompt": ["hello world", "x"]}, 5) == "hello"
    assert prompt_prefix(COMPLETIONS, {"prompt": [1, 2, 3]}, 2) == "1,2"
    assert prompt_prefix(EMBEDDINGS, {"input": 3}, 5) == ""


def test_route_table_merges_the_same_name_and_reports_readiness() -> None:
    table = RouteTable.build(
        [ModelRoute("m", ("http://a:1",)), ModelRoute("m", ("http://a:1", "http://b:1")), ModelRoute("z", ())]
    )
    assert table.get("m") == ModelRoute("m", ("http://a:1", "http://b:1"))
    assert table.get("z") is not None and not table.get("z").ready  # type: ignore[union-attr]
    assert table.model_names() == ["m", "z"]
    assert endpoint_address("http://10.1.2.3:8000/") == "10.1.2.3:8000"


def test_static_config_parses_models_endpoints_and_policies() -> None:
    table = parse_static_config(
        "models:\n"
        "  - {name: a, endpoints: ['http://127.0.0.1:8001/', 'http://127.0.0.1:8002'], policy: round-robin}\n"
        "  - {name: b}\n",
        "least-outstanding",
    )
    assert table.get("a") == ModelRoute("a", ("http://127.0.0.1:8001", "http://127.0.0.1:8002"), "round-robin")
    assert table.get("b") == ModelRoute("b", (), "least-outstanding")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {a: 1}", "'models' list"),
        ("models: [{endpoints: []}]", "name"),
        ("models: [{name: a, endpoints: ['ftp://x']}]", "http://host:port"),
        ("models: [{name: a, endpoints: ['http://x:1/v1']}]", "without a path"),
        ("models: [{name: a, policy: fastest}]", "policy"),
        ("models: [", "not valid YAML"),
    ],
)
def test_static_config_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_static_config(text, "least-outstanding")


def test_endpoint_is_ejected_after_consecutive_failures_for_the_cooldown() -> None:
    health = EndpointHealth(failure_threshold=3, cooldown_seconds=10)
    endpoints = ["a", "b"]
    assert health.record_failure("a", 0) is False
    health.record_success("a")  # a success resets the count
    assert [health.record_failure("a", t) for t in (1, 2, 3)] == [False, False, True]
    assert health.usable(endpoints, 5) == ["b"]
    assert health.usable(endpoints, 13.5) == endpoints  # cool-down over
    assert health.usable(["a"], 5) == ["a"]  # every endpoint ejected: fail open


def test_health_state_is_bounded() -> None:
    health = EndpointHealth(failure_threshold=5, cooldown_seconds=1, max_tracked=10)
    for index in range(1000):
        health.record_failure(f"e{index}", 0)
    assert len(health._records) <= 10


def test_keys_file_parses_hashes_allow_lists_and_rates() -> None:
    store = parse_keys_file(
        f"keys:\n  - {{name: a, sha256: {hash_key('k1')}, models: [m1], requestsPerMinute: 60}}\n"
        f"  - {{name: b, sha256: {hash_key('k2')}}}\n"
    )
    a, b = store.lookup("k1"), store.lookup("k2")
    assert a is not None and a.name == "a" and a.allows("m1") and not a.allows("m2")
    assert a.requests_per_minute == 60
    assert b is not None and b.allows("anything") and b.requests_per_minute is None
    assert store.lookup("k3") is None


@pytest.mark.parametrize(
    "text",
    [
        "keys: [{name: a, sha256: abc}]",
        "keys: [{sha256: " + "0" * 64 + "}]",
        "keys: [{name: a, sha256: " + "0" * 64 + ", requestsPerMinute: 0}]",
        "keys: [{name: a, sha256: " + "0" * 64 + "}, {name: b, sha256: " + "0" * 64 + "}]",
        "keys: 5",
    ],
)
def test_bad_keys_files_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_keys_file(text)


@pytest.mark.parametrize(
    ("header", "token"),
    [(b"Bearer sk-1", "sk-1"), (b"bearer  sk-1 ", "sk-1"), (b"Basic abc", None), (b"Bearer ", None), (None, None)],
)
def test_bearer_token(header: bytes | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_token_bucket_allows_a_minute_of_burst_then_refills() -> None:
    buckets = TokenBuckets()
    assert [buckets.acquire("k", 3, 0.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.acquire("k", 3, 0.0) == 20  # one token per 20 s
    assert buckets.acquire("k", 3, 10.0) == 10
    assert buckets.acquire("k", 3, 20.0) == 0
    assert buckets.acquire("other", 3, 20.0) == 0  # keys are independent


def test_usage_is_read_from_the_last_usage_object() -> None:
    stream_tail = (
        b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert extract_usage(stream_tail) == (12, 28)
    assert extract_usage(b'{"data":[],"usage":{"prompt_tokens":3,"total_tokens":3}}') == (3, None)
    assert extract_usage(b'{"choices":[]}') == (None, None)
