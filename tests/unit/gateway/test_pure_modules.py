"""Pure building blocks: request checks, route table and static config, health, keys, rates, usage."""

from __future__ import annotations

import json

import pytest
from argosy_gateway.auth import bearer_token, hash_key, parse_keys_file
from argosy_gateway.discovery.static import parse_static_config
from argosy_gateway.errors import GatewayError
from argosy_gateway.health import EndpointHealth
from argosy_gateway.parsing import JSON_BODY, MULTIPART_BODY, multipart_fields, parse_request, prompt_prefix
from argosy_gateway.ratelimit import TokenBuckets
from argosy_gateway.responsestore import ResponseLocations, StoredResponse, response_id
from argosy_gateway.routetable import ModelRoute, RouteTable, endpoint_address
from argosy_gateway.usage import extract_usage


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b'{"messages": []}', "model", "required"),
        (b'{"model": null}', "model", "required"),
        (b'{"model": ""}', "model", "non-empty string"),
        (b'{"model": ["m"]}', "model", "non-empty string"),
        (b'{"model": "m", "stream": "yes"}', "stream", "boolean, not string"),
        (b'{"model": "m", "stream": 1}', "stream", "boolean, not number"),
        (b'["model"]', None, "JSON object, not array"),
        (b'{"model": "m"', None, "not valid JSON"),
        (b"", None, "not valid JSON"),
        (b'{"model": "\xc3\x28"}', None, "UTF-8"),
        (b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
    ],
)
def test_only_unroutable_bodies_are_the_gateways_400(body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(GatewayError, match=message) as caught:
        parse_request(JSON_BODY, body)
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize(
    "body",
    [
        # Valid OpenAI and vLLM fields the old checks refused: vLLM judges them now.
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 3}',
        b'{"model": "m", "prompt": [[1, 2], [3]], "stop": [1], "n": 1.5, "user": 7}',
        b'{"model": "m", "messages": [], "stream_options": true, "temperature": "hot"}',
        b'{"model": "m", "input": {"weird": true}, "stream": null}',
    ],
)
def test_everything_but_model_and_stream_is_left_to_vllm(body: bytes) -> None:
    parsed = parse_request(JSON_BODY, body)
    assert parsed.model == "m" and parsed.stream is False
    assert parsed.user is None  # a non-string user is ignored for affinity, not refused


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m"}',
        b'{"model": "m"}\r\n\t ',  # JSON white space after the object
        b'  {"model": "m"}',  # and before it
        b'{"model": "m"} {"model": "n"}',  # extra data
        b'{"model": "m"}\xc2\xa0',  # a no-break space is not JSON white space
        b'{"model": "m", "n": Infinity, "d": {"model": "x"}}',
        b'{"model": "m",}',
        b'{"model": "m", "model": "n"}',  # the last duplicate wins, as in json.loads
        b'{"model": "m", "x": {}}',
    ],
)
def test_bodies_parse_exactly_as_json_loads_would(body: bytes) -> None:
    """The parser's shortcut past json.loads accepts and refuses the same bodies."""
    try:
        expected: object = json.loads(body.decode())
    except ValueError as exc:
        expected = exc
    try:
        got: object = parse_request(JSON_BODY, body).body
    except GatewayError as error:
        assert isinstance(expected, ValueError), f"refused a body json.loads accepts: {error.message}"
        assert str(expected) in error.message  # json's own message, not a different one
    else:
        assert got == expected


def test_a_good_request_yields_model_stream_and_user() -> None:
    parsed = parse_request(JSON_BODY, b'{"model": "m", "messages": [{"role": "user"}], "stream": true, "user": "u1"}')
    assert (parsed.model, parsed.stream, parsed.user) == ("m", True, "u1")


def multipart(fields: dict[str, bytes], boundary: str = "b0undary") -> bytes:
    parts = []
    for name, value in fields.items():
        filename = '; filename="a.wav"' if name == "file" else ""
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_multipart_model_is_read_past_the_file() -> None:
    audio = b"RIFF" + bytes(range(256)) * 100 + b"\r\n--b0und"  # binary, with a near-boundary
    body = multipart({"file": audio, "model": b"whisper", "stream": b"true", "language": b"en"})
    parsed = parse_request(MULTIPART_BODY, body, 'multipart/form-data; boundary="b0undary"')
    assert (parsed.model, parsed.stream) == ("whisper", True)
    assert multipart_fields(body, b"b0undary", (b"file",))["file"] == audio


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (multipart({"file": b"x"}), "multipart/form-data; boundary=b0undary", "'model' form field is required"),
        (multipart({"model": b"m"}), "application/json", "multipart/form-data"),
        (multipart({"model": b"m"}), "multipart/form-data", "multipart/form-data"),
        (multipart({"model": b"\xff"}), "multipart/form-data; boundary=b0undary", "UTF-8"),
        (
            b'--b0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\nm',
            "multipart/form-data; boundary=b0undary",
            "required",
        ),
    ],
)
def test_unroutable_multipart_is_a_400(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(GatewayError, match=message):
        parse_request(MULTIPART_BODY, body, content_type)


def test_prompt_prefix_reads_the_start_of_whatever_the_path_calls_its_prompt() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": [{"type": "text", "text": "defgh"}]},
        ]
    }
    assert prompt_prefix(body, 5) == "abc\x1ed"
    assert prompt_prefix({"prompt": ["hello world", "x"]}, 5) == "hello"
    assert prompt_prefix({"prompt": [1, 2, 3]}, 2) == "1,2"
    assert prompt_prefix({"prompt": [[[[["deep"]]]]]}, 9) == "deep"
    assert prompt_prefix({"input": 3}, 5) == ""
    assert (
        prompt_prefix({"instructions": "be brief", "input": [{"role": "user", "content": "hi"}]}, 20)
        == "be brief\x1ehi"
    )
    assert prompt_prefix({"query": "what is", "documents": ["a"]}, 4) == "what"


def test_response_ids_are_remembered_bounded_oldest_first() -> None:
    locations = ResponseLocations(capacity=2)
    assert locations.remember("m", "http://a:1", b'{"id":"resp_1","object":"response"}') == "resp_1"
    event = b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_2","output":[]}}'
    assert locations.remember("m", "http://b:1", event) == "resp_2"
    assert locations.remember("m", "http://b:1", b'{"id":"msg_3"}') is None  # not a response id
    assert locations.get("resp_1") == StoredResponse("m", "http://a:1")
    locations.remember("m", "http://c:1", b'{"id": "resp_3"}')
    assert locations.get("resp_1") is None and len(locations) == 2  # the oldest went first
    assert response_id(b"x" * 9000 + b'"id":"resp_4"') is None  # only the first bytes are read


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


def test_keys_with_the_same_name_never_share_a_bucket() -> None:
    store = parse_keys_file(
        f"keys:\n  - {{name: team, sha256: {hash_key('k1')}, requestsPerMinute: 1}}\n"
        f"  - {{name: team, sha256: {hash_key('k2')}, requestsPerMinute: 1}}\n"
    )
    first, second = store.lookup("k1"), store.lookup("k2")
    assert first is not None and second is not None and first.name == second.name
    buckets = TokenBuckets()
    assert buckets.acquire(first.sha256, 1, 0.0) == 0
    assert buckets.acquire(first.sha256, 1, 0.0) > 0
    assert buckets.acquire(second.sha256, 1, 0.0) == 0  # its own bucket, full


def test_a_changed_limit_keeps_the_buckets_state() -> None:
    buckets = TokenBuckets()
    for _ in range(60):
        assert buckets.acquire("k", 60, 0.0) == 0  # the whole minute's burst spent
    assert buckets.acquire("k", 600, 0.0) > 0  # raising the limit grants no fresh burst...
    assert buckets.acquire("k", 600, 0.1) == 0  # ...but refills at the new rate (10/s)
    buckets.acquire("k2", 60, 0.0)  # 59 tokens saved
    assert [buckets.acquire("k2", 2, 0.0) for _ in range(3)][:2] == [0, 0]  # lowered: capped at 2
    assert buckets.acquire("k2", 2, 0.0) == 30


def test_bucket_table_is_bounded_and_forgets_full_buckets_first() -> None:
    buckets = TokenBuckets(max_keys=10)
    for index in range(10):
        buckets.acquire(f"k{index}", 60, float(index))
    buckets.acquire("new", 60, 200.0)  # every old bucket has refilled: all may go
    assert len(buckets._buckets) <= 10
    buckets.acquire("new", 60, 200.0)
    assert buckets.acquire("new", 60, 200.0) == 0  # the new key's state was kept


def test_usage_is_read_from_the_last_usage_object() -> None:
    stream_tail = (
        b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert extract_usage(stream_tail) == (12, 28)
    assert extract_usage(b'{"data":[],"usage":{"prompt_tokens":3,"total_tokens":3}}') == (3, None)
    assert extract_usage(b'{"choices":[]}') == (None, None)
