"""Every model-addressed path, through the real OpenAI SDK, forwarded byte for byte.

The gateway routes ``model-x`` to a recording tap in front of a simulator, so each test can
assert that the model server received exactly the bytes the SDK sent.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from .conftest import GatewayFactory
from .harness import RecordingTap, Simulator, write_routes

MODEL = "model-x"


@pytest.fixture(scope="module")
def sim() -> Any:
    simulator = Simulator([MODEL])
    yield simulator
    simulator.kill()


@pytest.fixture
async def tap(sim: Simulator) -> AsyncIterator[RecordingTap]:
    recording = RecordingTap(sim.url)
    await recording.start()
    yield recording
    await recording.stop()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, tap: RecordingTap, tmp_path: Path) -> Any:
    write_routes(tmp_path / "routes.yaml", {MODEL: [tap.url]})
    return await gateway_factory()


class Sent:
    """The request bodies the SDK put on the wire, by path."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []

    async def hook(self, request: httpx2.Request) -> None:
        self.bodies.append((request.url.path, await request.aread()))

    def last(self, path: str) -> bytes:
        return [body for sent_path, body in self.bodies if sent_path == path][-1]


@pytest.fixture
async def sdk(gateway: Any) -> AsyncIterator[tuple[openai.AsyncOpenAI, Sent]]:
    sent = Sent()
    http = httpx2.AsyncClient(event_hooks={"request": [sent.hook]}, timeout=20)
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, http_client=http)
    async with client:
        yield client, sent


def assert_forwarded(sent: Sent, tap: RecordingTap, sdk_path: str, backend_path: str | None = None) -> bytes:
    body = sent.last(sdk_path)
    assert tap.bodies(backend_path or sdk_path)[-1] == body  # byte for byte
    return body


CHAT_CASES = {
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "tools": {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                        "required": ["city"],
                    },
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    },
    "json-schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "strict": True,
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            },
        }
    },
    "vllm-sampling": {
        "extra_body": {
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "skip_special_tokens": False,
            "structured_outputs": {"choice": ["yes", "no"]},
            "chat_template_kwargs": {"enable_thinking": False},
        },
        "seed": 7,
        "temperature": 0.0,
    },
}


@pytest.mark.parametrize("extra", CHAT_CASES.values(), ids=CHAT_CASES.keys())
async def test_chat_fields_routing_never_reads_reach_the_backend_unchanged(sdk, tap, extra: dict[str, Any]) -> None:
    client, sent = sdk
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Oslo?"}], max_tokens=4, **extra
    )
    assert completion.model == MODEL and completion.choices[0].message.content
    body = json.loads(assert_forwarded(sent, tap, "/v1/chat/completions"))
    for name, value in extra.items():
        if name == "extra_body":
            assert all(body[k] == v for k, v in value.items())
        else:
            assert body[name] == value


async def test_chat_with_image_content_parts(sdk, tap) -> None:
    client, sent = sdk
    image = "data:image/png;base64," + "iVBORw0KGgo" * 50
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        }
    ]
    completion = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert completion.choices[0].message.content
    assert json.loads(assert_forwarded(sent, tap, "/v1/chat/completions"))["messages"] == messages


async def test_completions_with_token_id_prompts_streamed(sdk, tap) -> None:
    client, sent = sdk
    stream = await client.completions.create(model=MODEL, prompt=[101, 2023, 318], max_tokens=5, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert json.loads(assert_forwarded(sent, tap, "/v1/completions"))["prompt"] == [101, 2023, 318]


async def test_embeddings(sdk, tap) -> None:
    client, sent = sdk
    result = await client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="float")
    assert [len(item.embedding) for item in result.data] == [16, 16]
    assert_forwarded(sent, tap, "/v1/embeddings")


async def test_responses_plain_then_retrieved_from_the_replica_that_stored_it(sdk, tap) -> None:
    client, sent = sdk
    response = await client.responses.create(model=MODEL, input="Say hello", instructions="Be brief.")
    assert response.id.startswith("resp_") and response.output_text
    assert_forwarded(sent, tap, "/v1/responses")
    again = await client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    assert tap.received[-1][:2] == ("GET", f"/v1/responses/{response.id}")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve("resp_unknown")
    assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # vLLM's own answer: a finished response cannot be cancelled
        await client.responses.cancel(response.id)


async def test_responses_streamed(sdk, tap) -> None:
    client, sent = sdk
    stream = await client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Count to three"}], stream=True, max_output_tokens=6
    )
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert_forwarded(sent, tap, "/v1/responses")
    stored = await client.responses.retrieve(events[-1].response.id)  # the id was read from the stream
    assert stored.output_text == deltas


async def test_audio_transcription_and_translation_multipart(sdk, tap) -> None:
    client, sent = sdk
    audio = b"RIFF" + bytes(range(256)) * 125  # 32 KiB of "audio"
    text = await client.audio.transcriptions.create(model=MODEL, file=("a.wav", io.BytesIO(audio)), language="en")
    assert "32004 bytes" in text.text
    assert_forwarded(sent, tap, "/v1/audio/transcriptions")
    text = await client.audio.translations.create(model=MODEL, file=("a.wav", io.BytesIO(audio)))
    assert text.text
    assert_forwarded(sent, tap, "/v1/audio/translations")


VLLM_PATHS = [
    ("/v1/rerank", {"query": "cats", "documents": ["a cat", "a car"], "top_n": 1}),
    ("/rerank", {"query": "cats", "documents": ["a cat", "a car"]}),
    ("/v2/rerank", {"query": "cats", "documents": ["a cat"]}),
    ("/v1/score", {"text_1": "cats", "text_2": ["a cat", "a car"]}),
    ("/score", {"text_1": "cats", "text_2": "a cat"}),
    ("/tokenize", {"prompt": "Hello world", "return_token_strs": True}),
    ("/detokenize", {"tokens": [1, 2, 3]}),
    ("/pooling", {"input": ["x"]}),
    ("/classify", {"input": ["great", "awful"]}),
]


@pytest.mark.parametrize(("path", "payload"), VLLM_PATHS, ids=[p for p, _ in VLLM_PATHS])
async def test_vllm_paths_route_by_model_and_answer_like_the_backend(gateway, tap, sim, path: str, payload) -> None:
    # Through the SDK's generic client (what users do for vLLM's own paths)...
    body = {"model": MODEL, **payload}
    client = openai.AsyncOpenAI(base_url=gateway.url, api_key="unused", max_retries=0)
    async with client:
        through_gateway = await client.post(path, body=body, cast_to=httpx2.Response)
    assert through_gateway.headers["x-argosy-endpoint"] == f"127.0.0.1:{tap.port}"
    assert json.loads(tap.bodies(path)[-1]) == body
    # ...and the same bytes straight to the backend answer the same shape.
    async with aiohttp.ClientSession() as http, http.post(sim.url + path, json=body) as direct:
        expected = await direct.json()
    answer = through_gateway.json()
    assert answer.keys() == expected.keys()


async def test_stream_true_on_a_path_vllm_does_not_stream_gets_vllms_answer(gateway, tap, sim) -> None:
    body = json.dumps({"model": MODEL, "input": ["x"], "stream": True}).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/v1/embeddings", data=body) as through_gateway:
            answer = (through_gateway.status, through_gateway.content_type, await through_gateway.read())
        async with http.post(sim.url + "/v1/embeddings", data=body) as direct:
            expected = (direct.status, direct.content_type, await direct.read())
    assert answer[:2] == expected[:2] == (200, "application/json")
    assert json.loads(answer[2]).keys() == json.loads(expected[2]).keys()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": "not a list", "stream": True}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9, "stream": True}, 400),
        ("/v1/responses", {"model": MODEL, "input": 5, "stream": True}, 400),
    ],
)
async def test_an_error_answer_to_a_streaming_request_passes_through_not_as_sse(gateway, sim, path, body, status):
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + path, json=body) as through_gateway:
            answer = (through_gateway.status, through_gateway.content_type, await through_gateway.read())
        async with http.post(sim.url + path, json=body) as direct:
            expected = (direct.status, direct.content_type, await direct.read())
    assert answer == expected and answer[0] == status and answer[1] == "application/json"


async def test_unknown_path_is_an_openai_shaped_404(gateway) -> None:
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/frobnicate", json={}) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["code"] == "not_found" and "/v1/frobnicate" in error["message"]


async def test_a_503_left_after_the_retry_is_the_model_servers_own_answer(gateway_factory, tmp_path: Path) -> None:
    # vLLM answers 503 while its engine is down; the simulator has no way to be put in that state,
    # so two small servers stand in for two such replicas.
    from aiohttp import web

    from .harness import free_port

    seen: list[int] = []
    runners = []
    ports = [free_port(), free_port()]
    for port in ports:

        async def unavailable(request: web.Request, port: int = port) -> web.Response:
            seen.append(port)
            body = {"error": {"message": f"engine dead on {port}", "type": "ServiceUnavailable", "code": 503}}
            return web.json_response(body, status=503, headers={"Retry-After": "7"})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", unavailable)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    try:
        write_routes(tmp_path / "routes.yaml", {MODEL: [f"http://127.0.0.1:{p}" for p in ports]})
        gateway = await gateway_factory()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(gateway.url + "/v1/chat/completions", json=body) as answer,
        ):
            status, headers, payload = answer.status, answer.headers, await answer.json()
        assert sorted(seen) == sorted(ports)  # tried once, retried once on the other replica
        assert status == 503 and headers["retry-after"] == "7"
        assert payload["error"]["message"] == f"engine dead on {seen[-1]}"  # the last replica's own words
        assert headers["x-argosy-endpoint"] == f"127.0.0.1:{seen[-1]}"
    finally:
        for runner in runners:
            await runner.cleanup()
