"""The operator's client (lightkube) builds the requests the API server expects, and kopf logs in alike."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from argosy_operator.kubeapi import ApiError, KubeApi, kopf_connection_info, load_credentials
from argosy_sandbox.pki import ensure_pki


class Recorder:
    def __init__(self, answer: httpx2.Response | None = None) -> None:
        self.requests: list[httpx2.Request] = []
        self.answer = answer

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self.answer or httpx2.Response(200, json={"kind": "Status", "apiVersion": "v1", "status": "Success"})


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    pki = tmp_path_factory.mktemp("pki")
    ensure_pki(pki)  # a real CA: the client loads it into its TLS context
    return (pki / "ca.crt").read_bytes()


def write_kubeconfig(tmp_path: Path, user: dict[str, Any], ca: bytes) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:6443",
                                                "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team-a"}}],
    }))
    return path


def api_with(tmp_path: Path, recorder: Recorder, ca: bytes) -> KubeApi:
    return KubeApi(load_credentials(str(write_kubeconfig(tmp_path, {"token": "secret-token"}, ca))),
                   transport=httpx2.MockTransport(recorder))


async def test_delete_sends_a_uid_precondition_in_the_body(tmp_path: Path, ca: bytes) -> None:
    recorder = Recorder()
    api = api_with(tmp_path, recorder, ca)
    assert await api.delete("apps/v1", "Deployment", "ns", "m", uid="u-1") is True
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("DELETE", "/apis/apps/v1/namespaces/ns/deployments/m")
    assert request.headers["authorization"] == "Bearer secret-token"
    body = json.loads(request.content)
    assert body["preconditions"] == {"uid": "u-1"} and body["propagationPolicy"] == "Background"


async def test_delete_of_a_replaced_object_is_refused_not_raised(tmp_path: Path, ca: bytes) -> None:
    conflict = httpx2.Response(409, json={"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                                          "reason": "Conflict", "message": "Precondition failed: UID in precondition"})
    api = api_with(tmp_path, Recorder(conflict), ca)
    assert await api.delete("v1", "Service", "ns", "m", uid="old") is False


async def test_errors_keep_the_api_servers_status_and_reason(tmp_path: Path, ca: bytes) -> None:
    forbidden = httpx2.Response(403, json={"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                                           "reason": "Forbidden", "message": 'secrets "hf" is forbidden'})
    api = api_with(tmp_path, Recorder(forbidden), ca)
    with pytest.raises(ApiError) as caught:
        await api.get("v1", "Secret", "ns", "hf")
    assert (caught.value.status, caught.value.reason) == (403, "Forbidden")
    assert "forbidden" in caught.value.message


async def test_an_unreachable_api_server_is_a_connection_error(tmp_path: Path, ca: bytes) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    api = KubeApi(load_credentials(str(write_kubeconfig(tmp_path, {"token": "t"}, ca))),
                  transport=httpx2.MockTransport(refuse))
    with pytest.raises(ConnectionError, match="unreachable"):
        await api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "namespace": "ns"}})


def test_kopf_logs_in_with_the_same_server_ca_and_a_freshly_read_token(tmp_path: Path, ca: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    credentials = load_credentials(str(write_kubeconfig(tmp_path, {"tokenFile": str(token_file)}, ca)))
    info = kopf_connection_info(credentials)
    assert (info.server, info.ca_data, info.token, info.scheme) == (
        "http://127.0.0.1:6443", base64.b64encode(ca).decode(), "first", "Bearer")
    assert info.default_namespace == "team-a"
    token_file.write_text("rotated\n")  # the kubelet rotates projected service-account tokens
    assert kopf_connection_info(credentials).token == "rotated"


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    from argosy_operator.kubeapi import CredentialsError

    with pytest.raises(CredentialsError, match="nope"):
        load_credentials(str(tmp_path / "nope"))
