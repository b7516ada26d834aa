"""The simulator speaks vLLM's OpenAI API: driven here with the real openai SDK."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from argosy_vllm_sim.server import SimServer
from openai.types.chat import ChatCompletionMessageParam

from .conftest import StartSim


def sdk(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)


def address_of(server: SimServer) -> str:
    return server.url.removeprefix("http://")


async def test_chat_reply_names_model_and_address_with_usage(start_sim: StartSim) -> None:
    server = await start_sim(models=("llama-8b",))
    raw = await sdk(server).chat.completions.with_raw_response.create(
        model="llama-8b", messages=[{"role": "user", "content": "Hello"}]
    )
    reply = raw.parse()

    assert raw.headers["x-sim-address"] == address_of(server)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == f"Simulated reply from llama-8b at {address_of(server)}."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "llama-8b"
    assert reply.id.startswith("chatcmpl-")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_each_served_name_answers_as_itself(start_sim: StartSim) -> None:
    server = await start_sim(models=("llama-8b", "llama-8b-alias"))
    reply = await sdk(server).completions.create(model="llama-8b-alias", prompt="Hi")
    assert reply.model == "llama-8b-alias"
    assert "llama-8b-alias" in reply.choices[0].text


async def test_max_tokens_sets_the_reply_length(start_sim: StartSim) -> None:
    server = await start_sim()
    client = sdk(server)
    completion = await client.completions.create(model="llama-8b", prompt="Hi", max_tokens=40)
    chat = await client.chat.completions.create(
        model="llama-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )

    assert completion.usage is not None and completion.usage.completion_tokens == 40
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].text.count("Simulated") == 6  # 7-token sentence, repeated
    assert chat.choices[0].message.content == "Simulated reply from"
    assert chat.choices[0].finish_reason == "length"


async def test_chat_stream_matches_the_plain_reply_and_ends_with_usage(start_sim: StartSim) -> None:
    server = await start_sim(itl_ms=1)
    client = sdk(server)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me something"}]
    plain = await client.chat.completions.create(model="llama-8b", messages=messages, max_tokens=20)
    stream = await client.chat.completions.create(
        model="llama-8b",
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(content_chunks) == 20
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == plain.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 20
    assert plain.usage is not None and usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize("itl_ms", [0, 1])
async def test_completion_stream_is_sse_ending_with_done(start_sim: StartSim, itl_ms: float) -> None:
    server = await start_sim(itl_ms=itl_ms)
    body = {"model": "llama-8b", "prompt": "Once", "max_tokens": 5, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()

    events = text.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert [p["choices"][0]["text"] for p in payloads] == ["Simulated", " reply", " from", " llama-8b", " at"]
    assert all("usage" not in p for p in payloads)  # no include_usage: no usage chunk


async def test_unknown_model_is_sdk_not_found_with_vllm_error_body(start_sim: StartSim) -> None:
    server = await start_sim()
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])

    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "The model `gpt-9` does not exist. Valid aliases: llama-8b.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"messages": [{"role": "user", "content": "Hi"}]}',
        b'{"model": "llama-8b"}',
        b'{"model": "llama-8b", "messages": "Hi"}',
        b'{"model": "llama-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}',
        b'{"model": "llama-8b", "messages": [{"role": "user", "content": "Hi"}], "stream": "yes"}',
        b'{"model": "llama-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000}',
    ],
    ids=[
        "not-json",
        "array",
        "no-model",
        "no-messages",
        "messages-string",
        "zero-max-tokens",
        "stream-string",
        "over-context",
    ],
)
async def test_malformed_requests_get_400_in_vllm_shape(start_sim: StartSim, body: bytes) -> None:
    server = await start_sim()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["message"]


async def test_sdk_bad_request_error_for_invalid_max_tokens(start_sim: StartSim) -> None:
    server = await start_sim()
    with pytest.raises(openai.BadRequestError):
        await sdk(server).completions.create(model="llama-8b", prompt="Hi", max_tokens=-1)


async def test_models_lists_every_served_name_with_max_model_len(start_sim: StartSim) -> None:
    server = await start_sim(models=("a", "b"), max_model_len=4096)
    models = await sdk(server).models.list()
    cards = [model.model_dump() for model in models.data]

    assert [card["id"] for card in cards] == ["a", "b"]
    assert all(card["owned_by"] == "vllm" and card["max_model_len"] == 4096 for card in cards)


async def test_embeddings_are_deterministic_unit_vectors(start_sim: StartSim) -> None:
    server = await start_sim(embedding_dim=8)
    client = sdk(server)
    first = await client.embeddings.create(model="llama-8b", input=["same text", "other text"])
    again = await client.embeddings.create(model="llama-8b", input="same text", encoding_format="float")

    vectors = [item.embedding for item in first.data]
    assert [len(v) for v in vectors] == [8, 8]
    assert vectors[0] == pytest.approx(again.data[0].embedding, rel=1e-6)
    assert vectors[0] != pytest.approx(vectors[1])
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0, rel=1e-5)
    assert first.usage.prompt_tokens > 0


async def test_health_is_200_and_empty(start_sim: StartSim) -> None:
    server = await start_sim()
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_logprobs_give_one_entry_per_token_with_the_alternatives_asked_for(start_sim: StartSim) -> None:
    server = await start_sim()
    client = sdk(server)
    chat = await client.chat.completions.create(
        model="llama-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True, top_logprobs=3
    )
    completion = await client.completions.create(model="llama-8b", prompt="Hi", max_tokens=4, logprobs=2)

    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    entries = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in entries) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token for entry in entries)
    assert all(entry.bytes == list(entry.token.encode()) and entry.logprob < 0 for entry in entries)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(4)]
    assert [len(top) for top in logprobs.top_logprobs] == [2, 2, 2, 2]
    plain = await client.completions.create(model="llama-8b", prompt="Hi", max_tokens=4)
    assert plain.choices[0].logprobs is None


async def test_an_answer_that_would_overrun_the_context_is_cut_short(start_sim: StartSim) -> None:
    server = await start_sim(max_model_len=64, kv_cache_tokens=64)
    reply = await sdk(server).completions.create(model="llama-8b", prompt="x" * 200, max_tokens=60)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 50
    assert reply.usage.completion_tokens == 14  # what is left of the 64-token context
    assert reply.choices[0].finish_reason == "length"
