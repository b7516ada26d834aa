"""The gateway through the real OpenAI SDK and raw HTTP, against simulator processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from .conftest import GatewayFactory
from .harness import Simulator, write_routes


def client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=20)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, sims: dict[str, Simulator], tmp_path: Path):
    write_routes(
        tmp_path / "routes.yaml",
        {
            "model-a": [sims["a1"].url, sims["a2"].url],
            "model-b": [sims["b"].url],
            "model-down": [],
        },
        policies={"model-a": "round-robin"},
    )
    return await gateway_factory()


async def test_chat_completion_reaches_the_backend_serving_the_model(gateway, sims) -> None:
    async with client(gateway.url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="model-b", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        completion = raw.parse()
    assert raw.headers["x-argosy-endpoint"] == sims["b"].address
    assert completion.model == "model-b"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8


async def test_two_models_each_reach_their_own_backends(gateway, sims) -> None:
    seen: dict[str, set[str]] = {"model-a": set(), "model-b": set()}
    async with client(gateway.url) as sdk:
        for model in ["model-a", "model-b"] * 3:
            raw = await sdk.completions.with_raw_response.create(model=model, prompt="Say hi", max_tokens=4)
            assert raw.parse().model == model
            seen[model].add(raw.headers["x-argosy-endpoint"])
    assert seen["model-a"] == {sims["a1"].address, sims["a2"].address}  # round robin used both
    assert seen["model-b"] == {sims["b"].address}


async def test_streamed_chat_arrives_chunk_by_chunk_with_usage(gateway) -> None:
    async with client(gateway.url) as sdk:
        stream = await sdk.chat.completions.create(
            model="model-b",
            messages=[{"role": "user", "content": "count"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 10
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    metrics = gateway.runtime.metrics.render().decode()
    assert 'argosy_gateway_completion_tokens_total{model="model-b"} 16.0' in metrics


async def test_streamed_completion(gateway) -> None:
    async with client(gateway.url) as sdk:
        stream = await sdk.completions.create(model="model-a", prompt="Once", max_tokens=5, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_embeddings_are_proxied(gateway) -> None:
    async with client(gateway.url) as sdk:
        result = await sdk.embeddings.create(model="model-b", input=["a", "b"])
    assert len(result.data) == 2 and result.data[0].embedding


async def test_unknown_model_is_not_found_and_names_the_available_ones(gateway) -> None:
    async with client(gateway.url) as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert "model-a" in error["message"] and "model-b" in error["message"]


async def test_unknown_model_with_a_lone_surrogate_is_a_clean_404(gateway) -> None:
    body = b'{"model": "\\ud800\\u00e9", "messages": [{"role": "user", "content": "x"}]}'
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/chat/completions", data=body) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "model_not_found"


async def test_known_model_without_ready_replica_is_503_with_retry_after(gateway) -> None:
    async with client(gateway.url) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="model-down", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "no_ready_replica"  # type: ignore[index]


async def test_models_list_shows_readiness(gateway) -> None:
    async with client(gateway.url) as sdk:
        page = await sdk.models.list()
    by_id = {m.id: m.model_extra["argosy"] for m in page.data if m.model_extra}
    assert by_id["model-a"] == {
        "ready": True,
        "readyEndpoints": 2,
        "policy": "round-robin",
        "scaledToZero": False,
    }
    assert by_id["model-down"]["ready"] is False and by_id["model-down"]["readyEndpoints"] == 0


async def test_retrieve_one_model(gateway) -> None:
    async with client(gateway.url) as sdk:
        model = await sdk.models.retrieve("model-down")
        assert model.id == "model-down" and model.model_extra == {
            "argosy": {"ready": False, "readyEndpoints": 0, "policy": "least-outstanding", "scaledToZero": False}
        }
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("gpt-17")


async def test_health_readiness_and_metrics_endpoints(gateway) -> None:
    async with aiohttp.ClientSession() as http:
        for path, status in (("/healthz", 200), ("/readyz", 200)):
            async with http.get(gateway.url + path) as response:
                assert response.status == status
        async with client(gateway.url) as sdk:
            await sdk.completions.create(model="model-b", prompt="x", max_tokens=3)
        async with http.get(gateway.url + "/metrics") as response:
            text = await response.text()
    assert 'argosy_gateway_requests_total{model="model-b",status="200"}' in text
    assert 'argosy_gateway_prompt_tokens_total{model="model-b"}' in text
    assert "argosy_gateway_time_to_first_byte_seconds_bucket" in text


async def test_readyz_is_503_until_discovery_loads(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gateway = await gateway_factory(wait_loaded=False, static_config=tmp_path / "missing.yaml")
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as response:
            assert response.status == 503
        write_routes(tmp_path / "missing.yaml", {"m": []})
        await gateway.wait_loaded()
        async with http.get(gateway.url + "/readyz") as response:
            assert response.status == 200


MALFORMED = [
    pytest.param(b"{not json", 400, "invalid_json", None, id="not-json"),
    pytest.param(b"[1, 2]", 400, "invalid_json", None, id="json-array"),
    pytest.param(b'"model"', 400, "invalid_json", None, id="json-string"),
    pytest.param(
        b'{"model": "model-a", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "invalid_json",
        None,
        id="invalid-utf8",
    ),
    pytest.param(b"{}", 400, "missing_required_parameter", "model", id="missing-model"),
    pytest.param(b'{"model": 7, "messages": []}', 400, "invalid_type", "model", id="model-not-string"),
    pytest.param(
        b'{"model": "model-a", "messages": [{"role": "user"}], "stream": "yes"}',
        400,
        "invalid_type",
        "stream",
        id="stream-not-bool",
    ),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None, id="deeply-nested"),
    pytest.param(b"", 400, "invalid_json", None, id="empty-body"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), MALFORMED)
async def test_malformed_bodies_get_openai_shaped_errors(gateway, body, status, code, param) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        assert response.status == status
        assert response.content_type == "application/json"
        payload = await response.json()
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == code
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "model-a"}',
        b'{"model": "model-a", "messages": "hi"}',
        b'{"model": "model-a", "messages": [{"role": "user"}], "max_tokens": "10"}',
    ],
    ids=["missing-messages", "messages-str", "max-tokens-str"],
)
async def test_bodies_the_gateway_can_route_get_vllms_own_400_unchanged(gateway, sims, body: bytes) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/v1/chat/completions", data=body) as through_gateway:
            status, answer = through_gateway.status, await through_gateway.read()
            assert through_gateway.headers["x-argosy-endpoint"] in (sims["a1"].address, sims["a2"].address)
        async with http.post(sims["a1"].url + "/v1/chat/completions", data=body) as direct:
            assert (status, answer) == (direct.status, await direct.read())
    assert status == 400


async def test_huge_body_is_refused_413_from_content_length(gateway_factory: GatewayFactory, sims, tmp_path: Path):
    write_routes(tmp_path / "routes.yaml", {"model-b": [sims["b"].url]})
    gateway = await gateway_factory(max_body_bytes=64 * 1024)
    huge = json.dumps({"model": "model-b", "prompt": "x" * 1_000_000}).encode()
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/completions", data=huge) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"


async def test_huge_chunked_body_is_refused_413_while_reading(gateway_factory: GatewayFactory, sims, tmp_path):
    write_routes(tmp_path / "routes.yaml", {"model-b": [sims["b"].url]})
    gateway = await gateway_factory(max_body_bytes=64 * 1024)

    async def chunks():
        yield b'{"model": "model-b", "prompt": "'
        for _ in range(200):
            yield b"x" * 8192
        yield b'"}'

    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(gateway.url + "/v1/completions", data=chunks()) as response:
                assert response.status == 413
                assert (await response.json())["error"]["code"] == "request_too_large"
        except aiohttp.ClientOSError:
            pytest.fail("the gateway should answer 413, not drop the connection")  # pragma: no cover


async def test_wrong_method_on_a_proxy_path_is_openai_shaped_405(gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/v1/chat/completions") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_static_file_reload_adds_a_model_and_a_broken_file_keeps_the_last_good_table(
    gateway, sims, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = tmp_path / "routes.yaml"
    write_routes(routes, {"model-a": [sims["a1"].url], "model-new": [sims["b"].url]})
    for _ in range(100):
        if gateway.runtime.table.get("model-new") is not None:
            break
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as http:
        body = {"model": "model-new", "prompt": "x", "max_tokens": 1}
        async with http.post(gateway.url + "/v1/completions", json=body) as response:
            # Routed to the new endpoint (whatever that server thinks of the name).
            assert response.headers["x-argosy-endpoint"] == sims["b"].address
    async with client(gateway.url) as sdk:
        routes.write_text("models: [{name: broken, endpoints: not-a-list}]\n")
        # The broken file was read and refused (not merely unnoticed), and the old table stays.
        for _ in range(100):
            if "keeping the last good routes" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "keeping the last good routes" in caplog.text
        assert "endpoints must be a list" in caplog.text
        assert gateway.runtime.table.get("model-a") is not None
        assert gateway.runtime.table.get("broken") is None
        raw = await sdk.completions.with_raw_response.create(model="model-a", prompt="x", max_tokens=1)
        assert raw.headers["x-argosy-endpoint"] == sims["a1"].address
