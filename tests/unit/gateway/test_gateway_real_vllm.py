"""The gateway in front of real vLLM (the shared `real_vllm` server): what vLLM accepts passes,
what vLLM refuses is vLLM's own answer, and the bytes vLLM receives are the bytes the SDK sent.

The gateway routes the stand-in model to a recording tap in front of vLLM. Each case sends one
request with the real OpenAI SDK through the gateway and the same request straight to vLLM, and
compares status and response fields (texts differ between runs only where vLLM samples).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from argosy_gateway.settings import GatewaySettings
from argosy_sandbox.real_vllm import RealVllm

from .harness import RecordingTap, RunningGateway, write_routes

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
async def through(real_vllm: RealVllm, tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, RecordingTap]]:
    tap = RecordingTap(real_vllm.base_url)
    await tap.start()
    write_routes(tmp_path / "routes.yaml", {real_vllm.model: [tap.url]})
    gateway = RunningGateway(GatewaySettings(static_config=tmp_path / "routes.yaml", static_poll_seconds=0.05))
    await gateway.start()
    await gateway.wait_loaded()
    try:
        yield gateway, tap
    finally:
        await gateway.stop()
        await tap.stop()


def fields(value: Any) -> Any:
    """The field names of a JSON value, recursively (what a client's parser relies on)."""
    if isinstance(value, dict):
        return {k: fields(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fields(value[0])] if value else []
    return None


CHAT = {
    "logprobs": {"logprobs": True, "top_logprobs": 2, "max_tokens": 4},
    "json-schema": {
        "max_tokens": 16,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "n",
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            },
        },
    },
    "vllm-sampling": {
        "max_tokens": 4,
        "seed": 3,
        "extra_body": {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1},
    },
    # vLLM refuses these for the stand-in model (no tool parser enabled; text only): its own 400.
    "tools": {
        "max_tokens": 4,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
    },
    "image": {
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    },
}


@pytest.mark.parametrize("extra", CHAT.values(), ids=CHAT.keys())
async def test_chat_through_the_gateway_is_what_vllm_answers(through, real_vllm: RealVllm, extra) -> None:
    gateway, tap = through
    body = {"model": real_vllm.model, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0, **extra}
    sent: list[bytes] = []

    async def capture(request: httpx2.Request) -> None:
        sent.append(await request.aread())

    async with (
        httpx2.AsyncClient(event_hooks={"request": [capture]}, timeout=120) as http,
        openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, http_client=http) as sdk,
    ):
        try:
            answer = await sdk.chat.completions.with_raw_response.create(**body)
            status, payload = answer.status_code, json.loads(answer.content)
        except openai.APIStatusError as error:
            status, payload = error.status_code, error.response.json()
    assert tap.bodies("/v1/chat/completions")[-1] == sent[-1]  # byte for byte
    flat = {k: v for k, v in body.items() if k != "extra_body"} | body.get("extra_body", {})
    async with httpx2.AsyncClient(timeout=120) as http:
        direct = await http.post(real_vllm.openai_base_url + "/chat/completions", json=flat)
    assert status == direct.status_code
    if status == 200:
        assert fields(payload).keys() == fields(direct.json()).keys()
        if extra.get("logprobs"):
            assert len(payload["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    else:
        assert payload == direct.json()  # vLLM's own error, unchanged


async def test_completions_with_token_ids_tokenize_and_detokenize(through, real_vllm: RealVllm) -> None:
    gateway, tap = through
    async with openai.AsyncOpenAI(base_url=gateway.url, api_key="x", max_retries=0) as sdk:
        tokens = await sdk.post("/tokenize", body={"model": real_vllm.model, "prompt": "Hello there"}, cast_to=object)
        ids = tokens["tokens"]  # type: ignore[index]
        assert tokens["count"] == len(ids) > 0  # type: ignore[index]
        text = await sdk.post("/detokenize", body={"model": real_vllm.model, "tokens": ids}, cast_to=object)
        assert "Hello there" in text["prompt"]  # type: ignore[index]
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0) as sdk:
        completion = await sdk.completions.create(model=real_vllm.model, prompt=ids, max_tokens=3, temperature=0)
    assert completion.choices[0].text is not None and completion.usage.prompt_tokens == len(ids)  # type: ignore[union-attr]
    assert json.loads(tap.bodies("/v1/completions")[-1])["prompt"] == ids


async def test_responses_plain_and_streamed(through, real_vllm: RealVllm) -> None:
    gateway, tap = through
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120) as sdk:
        response = await sdk.responses.create(model=real_vllm.model, input="Say hi", max_output_tokens=8)
        assert response.status in ("completed", "incomplete") and response.id
        started = time.monotonic()
        stream = await sdk.responses.create(model=real_vllm.model, input="Say hi", max_output_tokens=8, stream=True)
        events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    print(f"streamed response: {len(events)} events in {time.monotonic() - started:.2f} s")
    assert len(tap.bodies("/v1/responses")) == 2


async def test_embeddings_and_rerank_answer_as_vllm_does_for_a_generative_model(through, real_vllm: RealVllm):
    # The stand-in model generates; vLLM refuses pooling-style requests for it. Through the gateway
    # the refusal is vLLM's own.
    gateway, _ = through
    async with httpx2.AsyncClient(timeout=60) as http:
        for path, body in (
            ("/v1/embeddings", {"model": real_vllm.model, "input": "x"}),
            ("/v1/rerank", {"model": real_vllm.model, "query": "a", "documents": ["b"]}),
            ("/v1/score", {"model": real_vllm.model, "text_1": "a", "text_2": "b"}),
        ):
            via = await http.post(gateway.url + path, json=body)
            direct = await http.post(real_vllm.base_url + path, json=body)
            assert (via.status_code, via.content) == (direct.status_code, direct.content), path
            assert via.headers["x-argosy-endpoint"]
