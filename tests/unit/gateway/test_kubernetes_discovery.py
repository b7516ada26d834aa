"""Kubernetes discovery: pod and LLMDeployment watch events in, route tables out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from argosy_gateway.discovery.cluster import POD_LABEL_SELECTOR, ClusterState
from argosy_gateway.discovery.kubernetes import SETTLE_MAX_SECONDS, login_from_kubeconfig
from argosy_gateway.routetable import ModelRoute

from .harness import free_port

DEFAULT = "least-outstanding"


def pod(
    name: str,
    ip: str | None = "127.0.10.1",
    *,
    ready: bool = True,
    names: list[str] | str | None = None,
    deployment: str = "llama",
    namespace: str = "team-a",
    role: str = "server",
    port: int | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    annotations = {}
    if names is not None:
        annotations["argosy.dev/served-model-names"] = names if isinstance(names, str) else json.dumps(names)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/managed-by": "argosy-operator",
            "argosy.dev/role": role,
            "argosy.dev/deployment": deployment,
        },
        "annotations": annotations,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ports = [{"name": "metrics", "containerPort": 9000}]
    if port is not None:
        ports.append({"name": "http", "containerPort": port})
    return {
        "metadata": metadata,
        "spec": {"containers": [{"name": "vllm", "ports": ports}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def llm_deployment(
    name: str,
    *,
    namespace: str = "team-a",
    spec_names: list[str] | None = None,
    status_names: list[str] | None = None,
    policy: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace, "annotations": {}},
        "spec": {"model": {"uri": "hf://x/y"}},
        "status": {},
    }
    if spec_names is not None:
        body["spec"]["model"]["servedModelNames"] = spec_names
    if status_names is not None:
        body["status"]["servedModelNames"] = status_names
    if policy is not None:
        body["metadata"]["annotations"]["argosy.dev/routing-policy"] = policy
    return body


def test_ready_pod_serves_its_annotated_names_on_the_http_port() -> None:
    state = ClusterState()
    assert state.apply_pod_event(None, pod("p1", "127.0.10.1", names=["llama-8b", "llama"], port=8080))
    table = state.route_table(DEFAULT)
    assert table.get("llama-8b") == ModelRoute("llama-8b", ("http://127.0.10.1:8080",), DEFAULT)
    assert table.get("llama") is not None


def test_default_port_is_8000_and_ipv6_is_bracketed() -> None:
    state = ClusterState()
    state.apply_pod_event("ADDED", pod("p1", "fd00::7", names=["m"]))
    assert state.route_table(DEFAULT).get("m") == ModelRoute("m", ("http://[fd00::7]:8000",), DEFAULT)


def test_pod_follows_ready_notready_and_deleted() -> None:
    state = ClusterState()
    state.apply_deployment_event(None, llm_deployment("llama"))
    state.apply_pod_event("ADDED", pod("p1", ready=False))
    assert state.route_table(DEFAULT).get("llama") == ModelRoute("llama", (), DEFAULT)  # known, 503
    assert state.apply_pod_event("MODIFIED", pod("p1", ready=True))
    assert state.route_table(DEFAULT).get("llama").endpoints == ("http://127.0.10.1:8000",)  # type: ignore[union-attr]
    assert state.apply_pod_event("MODIFIED", pod("p1", ready=False))
    assert state.route_table(DEFAULT).get("llama").endpoints == ()  # type: ignore[union-attr]
    state.apply_pod_event("MODIFIED", pod("p1", ready=True))
    assert state.apply_pod_event("MODIFIED", pod("p1", ready=True, deleting=True))
    assert state.route_table(DEFAULT).get("llama").endpoints == ()  # type: ignore[union-attr]
    assert state.apply_pod_event("DELETED", pod("p1"))
    assert state.pods == {}


def test_unchanged_event_reports_no_change() -> None:
    state = ClusterState()
    state.apply_pod_event(None, pod("p1"))
    assert not state.apply_pod_event("MODIFIED", pod("p1"))


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (llm_deployment("llama"), ["llama"]),
        (llm_deployment("llama", spec_names=["a", "b"]), ["a", "b"]),
        (llm_deployment("llama", spec_names=["a"], status_names=["s"]), ["s"]),
    ],
)
def test_llmdeployment_names_without_pods_are_known_but_not_ready(body: dict[str, Any], names: list[str]) -> None:
    state = ClusterState()
    state.apply_deployment_event(None, body)
    table = state.route_table(DEFAULT)
    assert table.model_names() == names
    assert all(not table.get(n).ready for n in names)  # type: ignore[union-attr]


def test_pod_without_annotation_takes_its_deployments_names_and_policy() -> None:
    state = ClusterState()
    state.apply_deployment_event(None, llm_deployment("llama", spec_names=["llama-8b"], policy="prefix-affinity"))
    state.apply_pod_event(None, pod("p1", "127.0.10.1"))
    state.apply_pod_event(None, pod("p2", "127.0.10.2", names="not json"))
    state.apply_pod_event(None, pod("other-ns", "127.0.10.3", namespace="team-b"))  # no deployment there
    route = state.route_table(DEFAULT).get("llama-8b")
    assert route == ModelRoute("llama-8b", ("http://127.0.10.1:8000", "http://127.0.10.2:8000"), "prefix-affinity")


def test_unknown_policy_annotation_falls_back_to_the_default() -> None:
    state = ClusterState()
    state.apply_deployment_event(None, llm_deployment("llama", policy="fastest"))
    assert state.route_table(DEFAULT).get("llama").policy == DEFAULT  # type: ignore[union-attr]


def test_deleting_the_llmdeployment_forgets_the_model() -> None:
    state = ClusterState()
    state.apply_deployment_event(None, llm_deployment("llama"))
    state.apply_deployment_event("DELETED", llm_deployment("llama"))
    assert state.route_table(DEFAULT).get("llama") is None


def test_worker_and_unlabelled_pods_never_serve() -> None:
    state = ClusterState()
    state.apply_pod_event(None, pod("w", names=["m"], role="worker"))
    leader = pod("l", "127.0.10.9", names=["m"], role="leader")
    state.apply_pod_event(None, leader)
    assert state.route_table(DEFAULT).get("m").endpoints == ("http://127.0.10.9:8000",)  # type: ignore[union-attr]
    assert "argosy.dev/role in (server,leader)" in POD_LABEL_SELECTOR


def test_same_name_in_two_namespaces_serves_from_both() -> None:
    state = ClusterState()
    state.apply_pod_event(None, pod("p", "127.0.10.1", names=["m"], namespace="a"))
    state.apply_pod_event(None, pod("p", "127.0.10.2", names=["m"], namespace="b"))
    assert len(state.route_table(DEFAULT).get("m").endpoints) == 2  # type: ignore[union-attr]


def test_kubeconfig_login_reads_the_current_context(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
current-context: sandbox
contexts:
  - {name: other, context: {cluster: nowhere, user: nobody}}
  - {name: sandbox, context: {cluster: local, user: admin, namespace: team-a}}
clusters:
  - {name: local, cluster: {server: "https://127.0.0.1:6443", certificate-authority: ca.crt}}
users:
  - {name: admin, user: {token: secret-token, client-key-data: a2V5}}
"""
    )
    info = login_from_kubeconfig(kubeconfig)
    assert info.server == "https://127.0.0.1:6443"
    assert info.ca_path == str(tmp_path / "ca.crt")
    assert info.token == "secret-token"
    assert info.private_key_data == b"key"
    assert info.default_namespace == "team-a"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reachable_config", [False, True], ids=["no-kubeconfig-file", "api-server-down"])
async def test_gateway_is_not_ready_while_the_api_server_cannot_be_read(
    gateway_factory, tmp_path: Path, reachable_config: bool
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if reachable_config:  # a valid file whose API server (on loopback) refuses connections
        kubeconfig.write_text(
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
            f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{free_port()}'}}}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
        )
    gateway = await gateway_factory(wait_loaded=False, discovery="kubernetes", kubeconfig=kubeconfig)
    # Past the longest time discovery may wait for its first list to settle: a gateway that was
    # going to declare itself ready (wrongly) would have done so by now.
    await asyncio.sleep(SETTLE_MAX_SECONDS + 1)
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/readyz") as response:
        assert response.status == 503
    assert not gateway.runtime.loaded
