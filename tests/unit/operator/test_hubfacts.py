"""Hub lookups: public config.json anonymously first; the token Secret only for a gated repo.

The hub is a local HTTP server on 127.0.0.1 that answers like the Hugging Face Hub
(config.json under /<repo>/resolve/<revision>/, 401 without a token for gated repos,
403 with a token that lacks access); the Kubernetes API is a fake that serves one
Secret, refuses it (403, the chart's default RBAC) or does not have it.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from argosy_operator.api import LLMDeploymentSpec
from argosy_operator.hubfacts import HubFacts
from argosy_operator.hubfetch import fetch_facts
from argosy_operator.kubeapi import ApiError
from argosy_operator.planner import PlacementError

GOOD_TOKEN = "hf_good"
CONFIG = {"hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 1024,
          "vocab_size": 1000, "max_position_embeddings": 2048}


class FakeHub(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        FakeHub.requests.append((self.path, auth))
        repo = self.path.split("/resolve/")[0].lstrip("/")
        if repo == "acme/public":
            status = 200
        elif repo == "acme/gated":
            status = 401 if auth is None else 200 if auth == f"Bearer {GOOD_TOKEN}" else 403
        else:
            status = 404
        body = json.dumps(CONFIG if status == 200 else {"error": "nope"}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class SecretsApi:
    """The Secret GET the operator may make: `mode` is ok, forbidden or missing."""

    def __init__(self, mode: str, token: str = GOOD_TOKEN) -> None:
        self.mode = mode
        self.token = token
        self.gets: list[str] = []

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert (api_version, kind) == ("v1", "Secret")
        self.gets.append(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if self.mode == "forbidden":
            raise ApiError(403, "Forbidden", 'secrets "hf-token" is forbidden: User "system:serviceaccount:x" '
                           "cannot get resource")
        if self.mode == "missing":
            return None  # KubeApi.get: a 404 is None
        return {"data": {"token": base64.b64encode(self.token.encode()).decode()}}


def spec(repo: str, with_ref: bool = True) -> LLMDeploymentSpec:
    body: dict[str, Any] = {"model": {"uri": f"hf://{repo}"}}
    if with_ref:
        body["hfTokenSecretRef"] = {"name": "hf-token"}
    return LLMDeploymentSpec.model_validate(body)


@pytest.mark.parametrize(("repo", "with_ref", "api", "secret_read", "sent_token"), [
    pytest.param("acme/public", True, SecretsApi("forbidden"), False, False,
                 id="public model with a Secret the operator may not read: anonymous read works"),
    pytest.param("acme/public", False, SecretsApi("ok"), False, False, id="public model without a Secret"),
    pytest.param("acme/gated", True, SecretsApi("ok"), True, True, id="gated model, readable token"),
])
async def test_facts_are_read(hub: str, repo: str, with_ref: bool, api: SecretsApi, secret_read: bool,
                              sent_token: bool) -> None:
    facts = await HubFacts(api, endpoint=hub).facts("team-a", spec(repo, with_ref))  # type: ignore[arg-type]
    assert facts is not None and facts.hidden_size == 512
    assert bool(api.gets) is secret_read
    assert FakeHub.requests[0] == (f"/{repo}/resolve/main/config.json", None)  # anonymous first
    assert any(auth == f"Bearer {GOOD_TOKEN}" for _, auth in FakeHub.requests) is sent_token


@pytest.mark.parametrize(("repo", "with_ref", "api", "says"), [
    pytest.param("acme/gated", True, SecretsApi("forbidden"),
                 ["acme/gated is gated or private", "HTTP 401", "may not read Secret hf-token",
                  "operator.readHfTokenSecrets=true", "spec.model.facts"], id="gated, Secret forbidden"),
    pytest.param("acme/gated", False, SecretsApi("ok"),
                 ["set spec.hfTokenSecretRef", "operator.readHfTokenSecrets=true", "spec.model.facts"],
                 id="gated, no Secret named"),
    pytest.param("acme/gated", True, SecretsApi("missing"), ["Secret hf-token", "does not exist in namespace team-a"],
                 id="gated, Secret missing"),
    pytest.param("acme/gated", True, SecretsApi("ok", token="hf_other"),
                 ["token in Secret hf-token has no access to acme/gated", "HTTP 403", "spec.model.facts"],
                 id="gated, token without access"),
    pytest.param("acme/nowhere", True, SecretsApi("ok"), ["HTTP 404", "spec.model.facts"], id="no such repo"),
])
async def test_failures_say_what_to_do(hub: str, repo: str, with_ref: bool, api: SecretsApi,
                                       says: list[str]) -> None:
    with pytest.raises(PlacementError) as caught:
        await HubFacts(api, endpoint=hub).facts("team-a", spec(repo, with_ref))  # type: ignore[arg-type]
    assert caught.value.reason == "ModelFactsUnavailable"
    for phrase in says:
        assert phrase in caught.value.message
    if repo == "acme/nowhere":
        assert not api.gets  # not gated: the Secret is never read


async def test_a_failure_is_one_request_then_cached_and_shipped_models_need_none(hub: str) -> None:
    lookup = HubFacts(SecretsApi("ok"), endpoint=hub)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(PlacementError, match="HTTP 404"):
            await lookup.facts("team-a", spec("acme/nowhere"))
    assert len(FakeHub.requests) == 1
    assert await lookup.facts("team-a", spec("meta-llama/Llama-3.1-8B-Instruct")) is None
    assert len(FakeHub.requests) == 1


async def test_unreachable_hub_asks_for_inline_facts() -> None:
    lookup = HubFacts(SecretsApi("ok"), endpoint="http://127.0.0.1:9")  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match=r"hub unreachable.*spec\.model\.facts"):
        await lookup.facts("team-a", spec("acme/public"))


# fetch_facts: the one-shot lookup of `argosy-operator plan` (the caller brings the token).

def test_fetch_reads_config_json_with_the_token(hub: str) -> None:
    facts = fetch_facts("acme/gated", token=GOOD_TOKEN, endpoint=hub)
    assert facts.hidden_size == 512
    assert FakeHub.requests[-1] == ("/acme/gated/resolve/main/config.json", f"Bearer {GOOD_TOKEN}")


def test_fetch_of_a_gated_model_points_at_the_token(hub: str) -> None:
    with pytest.raises(PlacementError) as caught:
        fetch_facts("acme/gated", endpoint=hub)
    assert caught.value.reason == "ModelFactsUnavailable"
    assert "401" in caught.value.message and "hfTokenSecretRef" in caught.value.message


def test_fetch_from_an_unreachable_hub_asks_for_inline_facts() -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(PlacementError) as caught:
        fetch_facts("acme/tiny", endpoint="http://127.0.0.1:9", timeout=2)
    assert caught.value.reason == "ModelFactsUnavailable"
    assert "spec.model.facts" in caught.value.message
