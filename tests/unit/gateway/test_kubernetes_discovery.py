"""Kubernetes discovery: pod and LLMDeployment LISTs and watch events in, route tables out.

The pure state is tested directly. The LIST/watch loop is tested against a small stand-in
for the API server's LIST and watch protocol, because the failures it must survive (410 Gone
in the middle of a watch, a watch connection cut, a LIST that hangs) cannot be provoked on
demand in a real API server; tests/e2e/test_gateway_k8s.py runs it against the sandbox's.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from argosy_gateway.discovery.cluster import DEPLOYMENTS, POD_LABEL_SELECTOR, PODS, SECRETS, ClusterState
from argosy_gateway.discovery.kubernetes import load_kubeconfig
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
    key_id: str | None = None,
) -> dict[str, Any]:
    annotations = {}
    if key_id is not None:
        annotations["argosy.dev/backend-key-id"] = key_id
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


def backend_key_secret(deployment: str, keys: dict[str, str], namespace: str = "team-a") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{deployment}-backend-key",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "argosy-operator", "argosy.dev/backend-key": deployment},
        },
        "data": {f"key-{i}": base64.b64encode(k.encode()).decode() for i, k in keys.items()},
    }


def test_a_pod_is_routed_with_its_own_backend_key_and_only_once_the_key_is_known() -> None:
    state = ClusterState()
    state.apply(DEPLOYMENTS, "ADDED", llm_deployment("llama"))
    state.apply(PODS, "ADDED", pod("old", "127.0.10.1", names=["llama"], key_id="a"))
    state.apply(PODS, "ADDED", pod("new", "127.0.10.2", names=["llama"], key_id="b"))
    state.apply(PODS, "ADDED", pod("open", "127.0.10.3", names=["llama"]))  # a pod started without a key
    table = state.route_table(DEFAULT)
    # Without the Secret, the keyed pods would answer 401: not routed yet.
    assert table.get("llama") == ModelRoute("llama", ("http://127.0.10.3:8000",), DEFAULT)
    assert state.apply(SECRETS, "ADDED", backend_key_secret("llama", {"a": "key-a"}))
    table = state.route_table(DEFAULT)
    assert set(table.get("llama").endpoints) == {"http://127.0.10.1:8000", "http://127.0.10.3:8000"}
    assert state.apply(SECRETS, "MODIFIED", backend_key_secret("llama", {"a": "key-a", "b": "key-b"}))
    table = state.route_table(DEFAULT)
    assert set(table.get("llama").endpoints) == {f"http://127.0.10.{i}:8000" for i in (1, 2, 3)}
    # Each pod gets its own key; the client's Authorization is never among the forwarded headers.
    forwarded = {"Content-Type": "application/json"}
    assert table.upstream_headers("http://127.0.10.1:8000", forwarded)["Authorization"] == "Bearer key-a"
    assert table.upstream_headers("http://127.0.10.2:8000", forwarded)["Authorization"] == "Bearer key-b"
    assert "Authorization" not in table.upstream_headers("http://127.0.10.3:8000", forwarded)
    assert "key-a" not in repr(table) and "key-a" not in repr(state.secrets)  # keys stay out of logs
    # Another namespace's Secret of the same name gives no key here; deleting ours revokes at once.
    state.apply(SECRETS, "DELETED", backend_key_secret("llama", {}))
    state.apply(SECRETS, "ADDED", backend_key_secret("llama", {"a": "x", "b": "y"}, namespace="team-b"))
    assert state.route_table(DEFAULT).get("llama").endpoints == ("http://127.0.10.3:8000",)


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


def test_a_fresh_list_replaces_what_was_known_in_its_namespace_only() -> None:
    state = ClusterState()
    state.apply(PODS, None, pod("gone", "127.0.10.1", names=["m"], namespace="a"))
    state.apply(PODS, None, pod("other", "127.0.10.2", names=["m"], namespace="b"))
    state.replace(PODS, "a", [pod("new", "127.0.10.3", names=["m"], namespace="a")])
    assert state.route_table(DEFAULT).get("m").endpoints == (  # type: ignore[union-attr]
        "http://127.0.10.3:8000",
        "http://127.0.10.2:8000",
    )
    state.replace(PODS, None, [])  # a cluster-wide LIST: nothing left
    state.replace(DEPLOYMENTS, None, [llm_deployment("llama")])
    assert state.route_table(DEFAULT).model_names() == ["llama"]


def test_kubeconfig_credentials_come_from_the_current_context(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(KUBECONFIG.format(port=6443))
    config = load_kubeconfig(kubeconfig)
    assert config.get().cluster.server == "http://127.0.0.1:6443"
    assert config.get().user.token == "secret-token"


KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: sandbox
contexts:
  - {{name: other, context: {{cluster: nowhere, user: nobody}}}}
  - {{name: sandbox, context: {{cluster: local, user: admin, namespace: team-a}}}}
clusters:
  - {{name: nowhere, cluster: {{server: "http://127.0.0.1:1"}}}}
  - {{name: local, cluster: {{server: "http://127.0.0.1:{port}"}}}}
users:
  - {{name: nobody, user: {{token: wrong}}}}
  - {{name: admin, user: {{token: secret-token}}}}
"""


class FakeApiServer:
    """LIST and watch of pods and LLMDeployments, driven by the test.

    ``hold_lists`` (cleared) makes LISTs wait; ``watch_queues`` get one queue per open watch:
    put an event dict to send it, ``"410"`` to send a 410 Gone ERROR event, or ``"cut"`` to drop
    the connection.
    """

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, dict[str, Any]]] = {PODS: {}, DEPLOYMENTS: {}, SECRETS: {}}
        self.version = 100
        self.hold_lists = asyncio.Event()
        self.hold_lists.set()
        self.lists: list[str] = []
        self.watches: dict[str, list[asyncio.Queue[Any]]] = {PODS: [], DEPLOYMENTS: [], SECRETS: []}
        self.tokens: set[str] = set()
        app = web.Application()
        app.router.add_get("/api/v1/pods", self.handle)
        app.router.add_get("/api/v1/secrets", self.handle)
        app.router.add_get("/apis/argosy.dev/v1alpha1/llmdeployments", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        self.port = free_port()

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    def put(self, resource: str, body: dict[str, Any]) -> None:
        self.objects[resource][body["metadata"]["name"]] = body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.tokens.add(request.headers.get("Authorization", ""))
        resource = next((r for r in (PODS, SECRETS) if request.path.endswith("/" + r)), DEPLOYMENTS)
        if resource == PODS:
            selector = request.query["labelSelector"]  # the serving pods only, selected by the API server
            assert selector == "app.kubernetes.io/managed-by=argosy-operator,argosy.dev/role in (leader,server)"
        if resource == SECRETS:  # the operator's backend keys only: no other Secret reaches the gateway
            selector = request.query["labelSelector"]
            assert selector == "app.kubernetes.io/managed-by=argosy-operator,argosy.dev/backend-key"
        if request.query.get("watch") != "true":
            self.lists.append(resource)
            await self.hold_lists.wait()
            self.version += 1
            items = [
                dict(body, metadata=dict(body["metadata"], resourceVersion=str(self.version)))
                for body in self.objects[resource].values()
            ]
            return web.json_response({"metadata": {"resourceVersion": str(self.version)}, "items": items})
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.watches[resource].append(queue)
        try:
            while True:
                item = await queue.get()
                if item == "cut":
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if item == "410":
                    status = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": 410,
                        "reason": "Expired",
                        "message": "too old resource version",
                    }
                    event = {"type": "ERROR", "object": status}
                else:
                    event = item
                    body = event["object"]
                    self.version += 1
                    body["metadata"]["resourceVersion"] = str(self.version)
                await response.write(json.dumps(event).encode() + b"\n")
                if item == "410":
                    return response
        finally:
            self.watches[resource].remove(queue)

    async def watching(self, resource: str) -> asyncio.Queue[Any]:
        for _ in range(500):
            if self.watches[resource]:
                return self.watches[resource][-1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no watch of {resource} was opened")


@pytest.fixture
async def api_server():
    server = FakeApiServer()
    await server.start()
    yield server
    await server.stop()


async def eventually(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate()


async def chat_status(gateway, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/chat/completions", json=body) as answer:
        return answer.status


def endpoints(gateway, model: str) -> tuple[str, ...] | None:
    route = gateway.runtime.table.get(model)
    return None if route is None else route.endpoints


async def watching_gateway(gateway_factory, api_server: FakeApiServer, tmp_path: Path, **settings):
    """A gateway discovering from ``api_server`` (started, not waited for: callers wait or check)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(port=api_server.port))
    return await gateway_factory(wait_loaded=False, discovery="kubernetes", kubeconfig=kubeconfig, **settings)


@pytest.mark.timeout(60)
async def test_ready_only_after_the_first_full_list_and_never_404_before(
    gateway_factory, api_server: FakeApiServer, tmp_path: Path
) -> None:
    api_server.put(DEPLOYMENTS, llm_deployment("llama"))
    api_server.put(PODS, pod("p1", "127.0.10.1", names=["llama"]))
    api_server.hold_lists.clear()
    gateway = await watching_gateway(gateway_factory, api_server, tmp_path)
    await eventually(lambda: len(api_server.lists) == 3)
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/readyz") as response:
        assert response.status == 503
    assert await chat_status(gateway, "llama") == 503  # "starting", never "no such model"
    api_server.hold_lists.set()
    await gateway.wait_loaded()
    assert endpoints(gateway, "llama") == ("http://127.0.10.1:8000",)
    assert api_server.tokens == {"Bearer secret-token"}  # the current context's user


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", ["410", "cut"])
async def test_a_failed_watch_relists_without_a_gap_in_routing(
    gateway_factory, api_server: FakeApiServer, tmp_path: Path, failure: str
) -> None:
    api_server.put(DEPLOYMENTS, llm_deployment("llama"))
    api_server.put(PODS, pod("p1", "127.0.10.1", names=["llama"]))
    gateway = await watching_gateway(gateway_factory, api_server, tmp_path)
    await gateway.wait_loaded()
    watch = await api_server.watching(PODS)

    # Events flow: a second pod arrives, then starts draining (deletionTimestamp): it leaves at once.
    watch.put_nowait({"type": "ADDED", "object": pod("p2", "127.0.10.2", names=["llama"])})
    await eventually(lambda: endpoints(gateway, "llama") == ("http://127.0.10.1:8000", "http://127.0.10.2:8000"))
    watch.put_nowait({"type": "MODIFIED", "object": pod("p2", "127.0.10.2", names=["llama"], deleting=True)})
    await eventually(lambda: endpoints(gateway, "llama") == ("http://127.0.10.1:8000",))

    # While no watch runs, p1 goes away and p3 comes; the re-LIST is held for a while.
    del api_server.objects[PODS]["p1"]
    api_server.put(PODS, pod("p3", "127.0.10.3", names=["llama"]))
    lists_before = len(api_server.lists)
    api_server.hold_lists.clear()
    watch.put_nowait(failure)
    await eventually(lambda: len(api_server.lists) > lists_before)
    for _ in range(20):  # the old table keeps serving until the new LIST replaces it
        assert endpoints(gateway, "llama") == ("http://127.0.10.1:8000",)
        await asyncio.sleep(0.01)
    api_server.hold_lists.set()
    await eventually(lambda: endpoints(gateway, "llama") == ("http://127.0.10.3:8000",))
    watch = await api_server.watching(PODS)  # and the watch resumed from the new LIST
    watch.put_nowait({"type": "DELETED", "object": pod("p3", "127.0.10.3", names=["llama"])})
    await eventually(lambda: endpoints(gateway, "llama") == ())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reachable_config", [False, True], ids=["no-kubeconfig-file", "api-server-down"])
async def test_gateway_is_not_ready_while_the_api_server_cannot_be_read(
    gateway_factory, tmp_path: Path, reachable_config: bool
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if reachable_config:  # a valid file whose API server (on loopback) refuses connections
        kubeconfig.write_text(KUBECONFIG.format(port=free_port()))
    gateway = await gateway_factory(wait_loaded=False, discovery="kubernetes", kubeconfig=kubeconfig)
    await asyncio.sleep(2)  # several failed attempts
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/readyz") as response:
        assert response.status == 503
    assert not gateway.runtime.loaded
    assert await chat_status(gateway, "llama") == 503


@pytest.mark.timeout(60)
async def test_the_gateway_replaces_the_clients_key_with_the_pods_backend_key(
    gateway_factory, api_server: FakeApiServer, spawn_sim, tmp_path: Path
) -> None:
    sim = spawn_sim(["llama"], api_keys=["backend-key-a"])
    api_server.put(DEPLOYMENTS, llm_deployment("llama"))
    api_server.put(PODS, pod("p1", "127.0.0.1", names=["llama"], port=sim.port, key_id="a"))
    api_server.put(SECRETS, backend_key_secret("llama", {"a": "backend-key-a"}))
    gateway = await watching_gateway(gateway_factory, api_server, tmp_path)
    await gateway.wait_loaded()
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        # Straight to the pod, with no key or the client's own: vLLM's 401.
        for headers in ({}, {"Authorization": "Bearer client-key"}):
            async with http.post(sim.url + "/v1/chat/completions", json=body, headers=headers) as direct:
                assert (direct.status, await direct.json()) == (401, {"error": "Unauthorized"})
        # Through the gateway with the client's key: the pod's key is sent instead, and it answers.
        async with http.post(
            gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer client-key"}
        ) as routed:
            assert routed.status == 200, await routed.text()
            assert (await routed.json())["usage"]["completion_tokens"] >= 1
        # A rotated Secret: the pod (still on key a) keeps working; a pod on key b joins only with b.
        watch = await api_server.watching(SECRETS)
        watch.put_nowait({"type": "MODIFIED", "object": backend_key_secret("llama", {"a": "backend-key-a", "b": "k"})})
        await eventually(lambda: f"http://127.0.0.1:{sim.port}" in gateway.runtime.table.upstream_keys)
        async with http.post(gateway.url + "/v1/chat/completions", json=body) as routed:
            assert routed.status == 200


@pytest.mark.timeout(60)
async def test_without_backend_keys_the_gateway_never_asks_for_secrets(
    gateway_factory, api_server: FakeApiServer, tmp_path: Path
) -> None:
    api_server.put(DEPLOYMENTS, llm_deployment("llama"))
    api_server.put(PODS, pod("p1", "127.0.10.1", names=["llama"]))
    gateway = await watching_gateway(gateway_factory, api_server, tmp_path, backend_keys=False)
    await gateway.wait_loaded()
    assert endpoints(gateway, "llama") == ("http://127.0.10.1:8000",)
    assert sorted(api_server.lists) == [DEPLOYMENTS, PODS]
