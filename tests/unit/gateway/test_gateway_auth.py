"""API keys through the SDK: 401 without or with a wrong key, 403 for a model not allowed, 429 over rate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest
from argosy_gateway.auth import hash_key

from .conftest import GatewayFactory
from .harness import Simulator, write_routes

KEYS = f"""
keys:
  - name: team-a
    sha256: {hash_key("sk-team-a")}
    models: [model-a]
  - name: limited
    sha256: {hash_key("sk-limited")}
    requestsPerMinute: 2
  - name: admin
    sha256: {hash_key("sk-admin").upper()}
"""


def client(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, sims: dict[str, Simulator], tmp_path: Path):
    write_routes(tmp_path / "routes.yaml", {"model-a": [sims["a1"].url], "model-b": [sims["b"].url]})
    (tmp_path / "keys.yaml").write_text(KEYS)
    return await gateway_factory(api_keys_file=tmp_path / "keys.yaml", api_keys_poll_seconds=0.05)


async def test_a_valid_key_is_served(gateway) -> None:
    async with client(gateway.url, "sk-admin") as sdk:
        result = await sdk.completions.create(model="model-b", prompt="x", max_tokens=1)
    assert result.model == "model-b"


@pytest.mark.parametrize("key", ["sk-wrong", "sk-team-"])
async def test_a_wrong_key_is_401(gateway, key: str) -> None:
    async with client(gateway.url, key) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]


async def test_no_key_is_401(gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/v1/models") as response:
            assert response.status == 405
        async with http.get(gateway.url + "/v1/models") as response:
            assert response.status == 401
        body = {"model": "model-a", "prompt": "x"}
        async with http.post(gateway.url + "/v1/completions", json=body) as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication_error"


async def test_a_model_outside_the_allow_list_is_403_and_hidden_from_the_list(gateway) -> None:
    async with client(gateway.url, "sk-team-a") as sdk:
        await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.completions.create(model="model-b", prompt="x", max_tokens=1)
        models = await sdk.models.list()
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    assert [m.id for m in models.data] == ["model-a"]
    assert "model-b" not in caught.value.message  # the 404 lists only what this key may use


async def test_over_the_rate_is_429_with_retry_after(gateway) -> None:
    async with client(gateway.url, "sk-limited") as sdk:
        for _ in range(2):
            await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
    # 2 per minute refills one token every 30 s.
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 30
    metrics = gateway.runtime.metrics.render().decode()
    assert 'argosy_gateway_api_key_requests_total{key="limited",model="model-a"} 2.0' in metrics
    assert 'argosy_gateway_api_key_rejections_total{key="limited",reason="rate_limited"} 1.0' in metrics


async def test_keys_file_changes_are_picked_up(gateway, tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(f"keys: [{{name: new, sha256: {hash_key('sk-new')}}}]\n")
    async with client(gateway.url, "sk-new") as sdk:
        for _ in range(100):
            try:
                await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
                break
            except openai.AuthenticationError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the new key was never accepted")
    async with client(gateway.url, "sk-admin") as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.completions.create(model="model-a", prompt="x", max_tokens=1)
