"""What an operator sees in /metrics: the batch limit and waiting queue, the prefix cache, aborts."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from argosy_vllm_sim.server import SimServer
from argosy_vllm_sim.testing import scrape_metrics, wait_for_metrics

from .conftest import StartSim

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"

# 400 characters = 100 simulated tokens = 6 full 16-token blocks.
LONG_SYSTEM_PROMPT = "You are a careful assistant for the Argosy platform team. " * 7


def sdk(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


async def test_requests_beyond_max_num_seqs_wait_and_then_all_finish(start_sim: StartSim) -> None:
    server = await start_sim(max_num_seqs=2, ttft_ms=200, itl_ms=50)
    client = sdk(server)
    requests = [
        asyncio.create_task(client.completions.create(model="llama-8b", prompt=f"request {i}", max_tokens=4))
        for i in range(5)
    ]

    busy = await wait_for_metrics(server.url, lambda m: m[RUNNING] == 2 and m[WAITING] == 3)
    assert busy[KV_USAGE] > 0
    replies = await asyncio.gather(*requests)
    idle = await scrape_metrics(server.url)

    assert all(reply.usage is not None and reply.usage.completion_tokens == 4 for reply in replies)
    assert (idle[RUNNING], idle[WAITING], idle[KV_USAGE]) == (0, 0, 0)
    assert idle['vllm:request_success_total{finished_reason="length"}'] == 5
    assert idle["vllm:generation_tokens_total"] == 20
    assert idle["vllm:time_to_first_token_seconds_count"] == 5


async def test_repeated_prefix_hits_the_prefix_cache(start_sim: StartSim) -> None:
    server = await start_sim(prompt_tokens_details=True)
    client = sdk(server)

    async def ask(question: str) -> openai.types.chat.ChatCompletion:
        return await client.chat.completions.create(
            model="llama-8b",
            messages=[
                {"role": "system", "content": LONG_SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
        )

    first = await ask("What is a GPU?")
    after_first = await scrape_metrics(server.url)
    second = await ask("What is a TPU?")
    after_second = await scrape_metrics(server.url)

    assert after_first[HITS] == 0
    assert after_first[QUERIES] == first.usage.prompt_tokens  # type: ignore[union-attr]
    hit_tokens = after_second[HITS] - after_first[HITS]
    assert hit_tokens >= 96  # the six blocks of the shared system prompt
    assert hit_tokens % 16 == 0
    assert second.usage.prompt_tokens_details.cached_tokens == hit_tokens  # type: ignore[union-attr]


async def test_prefix_caching_can_be_disabled(start_sim: StartSim) -> None:
    server = await start_sim(prefix_caching=False)
    client = sdk(server)
    for _ in range(2):
        await client.completions.create(model="llama-8b", prompt=LONG_SYSTEM_PROMPT)
    metrics = await scrape_metrics(server.url)

    assert metrics[QUERIES] > 0
    assert metrics[HITS] == 0


async def test_closing_a_stream_stops_the_request(start_sim: StartSim) -> None:
    server = await start_sim(itl_ms=1000)
    client = sdk(server)
    stream = await client.chat.completions.create(
        model="llama-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=100, stream=True
    )
    first = await anext(aiter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert (await scrape_metrics(server.url))[RUNNING] == 1

    await stream.close()

    stopped = await wait_for_metrics(server.url, lambda m: m[RUNNING] == 0, timeout_s=1.0)
    assert stopped['vllm:request_success_total{finished_reason="abort"}'] == 1
    assert stopped["vllm:generation_tokens_total"] < 100


async def test_abandoned_request_waiting_in_queue_leaves_it(start_sim: StartSim) -> None:
    server = await start_sim(max_num_seqs=1, ttft_ms=10_000)
    body = {"model": "llama-8b", "prompt": "Hi"}
    async with aiohttp.ClientSession() as session:
        holder = asyncio.create_task(session.post(f"{server.url}/v1/completions", json=body))
        queued = asyncio.create_task(session.post(f"{server.url}/v1/completions", json=body))
        await wait_for_metrics(server.url, lambda m: m[RUNNING] == 1 and m[WAITING] == 1)

        queued.cancel()
        await wait_for_metrics(server.url, lambda m: m[WAITING] == 0, timeout_s=1.0)
        holder.cancel()
        idle = await wait_for_metrics(server.url, lambda m: m[RUNNING] == 0, timeout_s=1.0)

    assert idle['vllm:request_success_total{finished_reason="abort"}'] == 2


async def test_stopping_the_server_cuts_streams_in_flight(start_sim: StartSim) -> None:
    server = await start_sim(itl_ms=1000)
    client = sdk(server)
    stream = await client.chat.completions.create(
        model="llama-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=100, stream=True
    )
    received = [await anext(aiter(stream))]

    await asyncio.wait_for(server.stop(), timeout=5)

    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) < 100


async def test_time_to_first_token_grows_with_uncached_prompt_tokens(start_sim: StartSim) -> None:
    server = await start_sim(prefill_ms_per_token=1.0)  # 100 uncached tokens: +100 ms
    client = sdk(server)
    loop = asyncio.get_running_loop()

    async def ttft(prompt: str) -> float:
        started = loop.time()
        stream = await client.completions.create(model="llama-8b", prompt=prompt, max_tokens=2, stream=True)
        async for _ in stream:
            return loop.time() - started
        raise AssertionError("empty stream")

    cold = await ttft(LONG_SYSTEM_PROMPT)
    warm = await ttft(LONG_SYSTEM_PROMPT)  # 96 of its 100 tokens now come from the prefix cache
    assert cold >= 0.1
    assert warm < cold - 0.07


async def test_serial_prefill_makes_concurrent_prefills_queue(start_sim: StartSim) -> None:
    # Three 100-token prompts, 1 ms per uncached token, arriving together: one lane computes
    # them one after the other (about 0.1, 0.2 and 0.3 s to the first token); without the
    # lane all three take about 0.1 s.
    async def first_tokens(server: SimServer) -> list[float]:
        client = sdk(server)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def one(index: int) -> float:
            prompt = f"{index} " + LONG_SYSTEM_PROMPT  # a different first block: no shared cache
            stream = await client.completions.create(model="llama-8b", prompt=prompt, max_tokens=2, stream=True)
            async for _ in stream:
                return loop.time() - started
            raise AssertionError("empty stream")

        return sorted(await asyncio.gather(*(one(i) for i in range(3))))

    serial = await first_tokens(await start_sim(prefill_ms_per_token=1.0, serial_prefill=True))
    parallel = await first_tokens(await start_sim(prefill_ms_per_token=1.0))
    assert serial[2] >= 0.29
    assert serial[2] - serial[0] >= 0.18
    assert parallel[2] < 0.25
