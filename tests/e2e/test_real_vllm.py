"""Argosy against real vLLM: helm install, kubectl apply, the OpenAI SDK through the gateway pod.

Nothing here is started by the test itself: the chart's operator and gateway pods run because
the sandbox's pod runner runs them (with their ServiceAccounts' tokens), and the serving pod
runs vLLM's CPU build with the operator's own `vllm serve` arguments (the model swapped for the
sandbox's stand-in; docs/sandbox.md). One vLLM pod is shared by every test in this module, since
it takes a minute or more to start on this machine; the tests run in file order.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from argosy_sandbox import chart
from argosy_sandbox import kubelet_plan as plan
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.podrunner import wait_for
from openai.types.chat import ChatCompletionMessageParam

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
# Inline config.json facts (an 8B, Llama-shaped model) so the operator never asks the hub; the
# sandbox serves the stand-in model whatever the facts say.
FACTS = {
    "hiddenSize": 4096, "numHiddenLayers": 32, "numAttentionHeads": 32, "numKeyValueHeads": 8,
    "intermediateSize": 14336, "vocabSize": 128256, "maxPositionEmbeddings": 131072,
}
LLD = {
    "apiVersion": "argosy.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": MODEL},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct", "servedModelNames": [MODEL], "facts": FACTS},
        "replicas": 1,
        "gpu": {"count": 1},
        # No torch.compile at start: a minute less per vLLM start on this CPU (the server is the same).
        "engine": {"maxModelLen": MAX_MODEL_LEN, "enforceEager": True},
    },
}


@dataclass
class Release:
    name: str
    namespace: str
    models: str
    operator: dict[str, Any]
    gateway: dict[str, Any]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway['status']['podIP']}:{chart.GATEWAY_PORT}"


@dataclass
class Serving:
    pod: dict[str, Any]
    seen_loading: bool
    """The process ran and /health did not answer while the pod was NotReady."""
    loaded_in: float


def _serving_pod(sandbox: Sandbox, namespace: str) -> dict[str, Any] | None:
    found = [p for p in chart.pods(sandbox, namespace, f"argosy.dev/deployment={MODEL}")
             if not p["metadata"].get("deletionTimestamp")]
    return found[0] if found else None


@pytest.fixture(scope="module")
def release(sandbox: Sandbox) -> Iterator[Release]:
    suffix = secrets.token_hex(3)
    name, namespace, models = f"argosy-{suffix}", f"t-real-vllm-{suffix}", f"t-real-models-{suffix}"
    sandbox.kubectl("create", "namespace", namespace)
    sandbox.kubectl("create", "namespace", models)
    # Every vLLM pod in this namespace runs real vLLM (the default is the simulator).
    sandbox.kubectl("label", "namespace", models, f"{plan.BACKEND_KEY}=real")
    chart.ensure_crd(sandbox)
    try:
        chart.install(sandbox, name, namespace, "--set", "crds.enabled=false", "--set", f"watchNamespaces={{{models}}}",
                      # A cold start of real vLLM here takes minutes: hold requests for it that long.
                      "--set", "gateway.scaleFromZero.timeoutSeconds=900",
                      "--set", "operator.autoscaler.intervalSeconds=5")
        operator = chart.component_pod(sandbox, namespace, name, "operator")
        gateway = chart.component_pod(sandbox, namespace, name, "gateway")
        assert operator is not None and gateway is not None
        yield Release(name, namespace, models, operator, gateway)
    finally:
        sandbox.kubectl("delete", "lld", "--all", "-n", models, "--wait=false", check=False)
        chart.helm(sandbox, "uninstall", name, "--namespace", namespace, check=False)
        for ns in (models, namespace):
            sandbox.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def serving(sandbox: Sandbox, release: Release) -> Serving:
    """kubectl apply of the LLMDeployment; watched until its pod is Ready (noting it was NotReady while loading)."""
    sandbox.kubectl("apply", "-n", release.models, "-f", "-", input=json.dumps(LLD))
    applied = time.monotonic()
    seen_loading = False
    deadline = applied + 600
    while time.monotonic() < deadline:
        pod = _serving_pod(sandbox, release.models)
        if pod is not None and chart.is_ready(pod):
            return Serving(pod, seen_loading, time.monotonic() - applied)
        pid = chart.container_pid(pod) if pod is not None else None
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            health = chart.http_status(f"http://{pod['status']['podIP']}:8000/health")  # type: ignore[index]
            current = _serving_pod(sandbox, release.models)
            seen_loading = seen_loading or (health != 200 and not chart.is_ready(current))
        time.sleep(1)
    pod = _serving_pod(sandbox, release.models)
    name = pod["metadata"]["name"] if pod else "(no pod)"
    logs = sandbox.kubectl("logs", "-n", release.models, name, "--tail=30", check=False).stdout if pod else ""
    raise AssertionError(f"the vLLM pod {name} was not Ready in 600 s; its log:\n{logs}")


def sdk(release: Release) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{release.gateway_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_charts_pods_are_ready_and_the_operator_reconciles_as_its_service_account(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    for pod, component in ((release.operator, "operator"), (release.gateway, "gateway")):
        assert chart.is_ready(pod), f"{pod['metadata']['name']} is not Ready"
        spec = pod["spec"]["containers"][0]
        assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"  # Ready through the chart's own probe
        kubeconfig = chart.pod_dir(sandbox, pod) / "kubeconfig"
        whoami = sandbox.kubectl(f"--kubeconfig={kubeconfig}", "auth", "whoami",
                                 "-o", "jsonpath={.status.userInfo.username}")
        assert whoami.stdout == f"system:serviceaccount:{release.namespace}:{release.name}-{component}"
    # The operator pod (and only it) reconciled the model: placement, the Deployment, status.
    lld = json.loads(sandbox.kubectl("get", "lld", MODEL, "-n", release.models, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in lld["status"]["conditions"]}
    assert conditions["PlacementFound"] == "True"
    assert lld["status"]["readyReplicas"] == 1
    logs = sandbox.kubectl("logs", "-n", release.namespace, release.operator["metadata"]["name"]).stdout
    assert MODEL in logs
    assert "forbidden" not in logs.lower()


def test_the_serving_pod_runs_vllm_serve_with_exactly_the_operators_arguments(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    from argosy_sandbox import standin_model, vllm_runtime

    pod = serving.pod
    pid = chart.container_pid(pod, "vllm")
    assert pid is not None
    container = pod["spec"]["containers"][0]
    operator_args = plan.split_vllm_serve(plan.container_argv(container, "vllm", {}))
    assert operator_args is not None
    expected = plan.vllm_serve_args(operator_args, pod["status"]["podIP"], str(standin_model.ensure_model(print)))
    # Only the model and the pod's listen address differ from what the operator wrote.
    assert expected.args[1:-2] == operator_args[1:]
    assert chart.cmdline(pid) == [*vllm_runtime.vllm_command(), "serve", *expected.args]
    print(f"vLLM was Ready {serving.loaded_in:.0f} s after kubectl apply")
    assert serving.seen_loading, "the pod was never seen NotReady while vLLM loaded"
    assert chart.http_status(f"http://{pod['status']['podIP']}:8000/health") == 200


def test_the_openai_sdk_gets_answers_and_errors_from_vllm_through_the_gateway_pod(
    release: Release, serving: Serving
) -> None:
    with sdk(release) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        chat = raw.parse()
        assert chat.model == MODEL and chat.choices[0].message.content
        assert raw.headers["x-argosy-endpoint"] == f"{serving.pod['status']['podIP']}:8000"
        assert chat.usage is not None and chat.usage.completion_tokens > 0

        completion = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=8)
        assert completion.choices[0].text and completion.usage is not None

        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None

        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model=MODEL, prompt="x", max_tokens=MAX_MODEL_LEN * 4)
        assert str(MAX_MODEL_LEN) in str(too_long.value)  # vLLM's own message, passed through

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


def _post(url: str, authorization: str | None = None) -> tuple[int, Any]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_vllm_refuses_a_caller_without_the_backend_key_and_the_gateway_pod_sends_it(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    pod = serving.pod
    key_id = pod["metadata"]["annotations"]["argosy.dev/backend-key-id"]
    container = pod["spec"]["containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": f"{MODEL}-backend-key", "key": f"key-{key_id}"}}} in container["env"]
    secret = json.loads(sandbox.kubectl("get", "secret", f"{MODEL}-backend-key", "-n", release.models,
                                        "-o", "json").stdout)
    key = base64.b64decode(secret["data"][f"key-{key_id}"]).decode()
    direct = f"http://{pod['status']['podIP']}:8000"
    # Straight to the pod, around the gateway: real vLLM's own 401.
    assert _post(direct) == (401, {"error": "Unauthorized"})
    assert _post(direct, "Bearer unused") == (401, {"error": "Unauthorized"})
    # vLLM leaves /health (the kubelet's probes) and /metrics (the autoscaler, the drain) open.
    assert chart.http_status(f"{direct}/health") == 200 and chart.http_status(f"{direct}/metrics") == 200
    # The same request through the gateway pod, whose client sent no key of vLLM's: answered.
    status, answer = _post(release.gateway_url, "Bearer unused")
    assert status == 200 and answer["choices"][0]["message"]["content"]
    assert _post(direct, f"Bearer {key}")[0] == 200  # the key is what made the difference


def test_logprobs_come_back_from_vllm_through_the_gateway_pod(release: Release, serving: Serving) -> None:
    with sdk(release) as client:
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2)
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert len(logprobs.content[0].top_logprobs) == 2


def test_a_killed_vllm_is_restarted_counted_and_routed_around_until_ready(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    name = serving.pod["metadata"]["name"]

    def pod() -> dict[str, Any]:
        return json.loads(sandbox.kubectl("get", "pod", name, "-n", release.models, "-o", "json").stdout)

    def ready_endpoints() -> int:
        try:
            with urllib.request.urlopen(f"{release.gateway_url}/v1/models", timeout=2) as response:
                listing = json.loads(response.read())
        except OSError:
            return -1
        return next((e["argosy"]["readyEndpoints"] for e in listing["data"] if e["id"] == MODEL), -1)

    before = pod()["status"]["containerStatuses"][0]["restartCount"]
    pid = chart.container_pid(pod(), "vllm")
    assert pid is not None and ready_endpoints() == 1
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(lambda: ready_endpoints() == 0, 10, interval=0.05)
    dropped_in = time.monotonic() - killed
    print(f"the gateway stopped routing to the killed pod {dropped_in:.2f} s after the kill")
    assert dropped_in < 2.0
    with sdk(release) as client, pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert refused.value.status_code == 503

    assert wait_for(lambda: pod()["status"]["containerStatuses"][0]["restartCount"] == before + 1, 30)
    assert wait_for(lambda: chart.is_ready(pod()), 600, interval=1), "vLLM did not come back"
    assert wait_for(lambda: ready_endpoints() == 1, 10)
    with sdk(release) as client:
        again = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert again.choices[0].message.content
    print(f"vLLM served again {time.monotonic() - killed:.0f} s after the kill")


def _kubectl_json(sandbox: Sandbox, namespace: str, *what: str) -> dict[str, Any]:
    return dict(json.loads(sandbox.kubectl("get", *what, "-n", namespace, "-o", "json").stdout))


def _backend_keys(sandbox: Sandbox, namespace: str) -> tuple[str, dict[str, str]]:
    """The backend-key Secret's current key id and its entries, decoded."""
    found = _kubectl_json(sandbox, namespace, "secret", f"{MODEL}-backend-key")
    entries = {name: base64.b64decode(value).decode() for name, value in found["data"].items()}
    return found["metadata"]["annotations"]["argosy.dev/backend-key-current"], entries


def test_a_key_rotation_with_a_surge_pod_fails_none_of_the_requests_sent_during_the_roll(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    """One real replica with rollout.maxSurge 1 / maxUnavailable 0: a new backend key starts a second vLLM
    beside the first, which serves until the new one is Ready and then drains; SDK clients calling all
    along through the gateway see no failure. Replaces the module's vLLM pod (the one after it expects that)."""
    models = release.models
    old_pod = _serving_pod(sandbox, models)
    assert old_pod is not None and chart.is_ready(old_pod)
    old_id, entries = _backend_keys(sandbox, models)
    assert old_pod["metadata"]["annotations"]["argosy.dev/backend-key-id"] == old_id
    old_key = entries[f"key-{old_id}"]
    planned_for = _kubectl_json(sandbox, models, "lld", MODEL)["status"]["placement"]["plannedFor"]

    # The rollout fields alone: they reach the Deployment's strategy, re-plan nothing, restart no pod.
    patch = {"spec": {"rollout": {"maxSurge": 1, "maxUnavailable": 0}}}
    sandbox.kubectl("patch", "lld", MODEL, "-n", models, "--type=merge", "-p", json.dumps(patch))
    assert wait_for(lambda: _kubectl_json(sandbox, models, "deployment", MODEL)["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, 60, interval=1)
    lld = _kubectl_json(sandbox, models, "lld", MODEL)
    assert lld["status"]["observedGeneration"] == lld["metadata"]["generation"]
    assert lld["status"]["placement"]["plannedFor"] == planned_for
    pods = chart.pods(sandbox, models, f"argosy.dev/deployment={MODEL}")
    assert [p["metadata"]["uid"] for p in pods] == [old_pod["metadata"]["uid"]]

    # A steady stream of SDK requests through the gateway, every third one streamed, over the whole roll.
    sent: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def calls(worker: int) -> None:
        client = openai.OpenAI(base_url=f"{release.gateway_url}/v1", api_key="client-key", max_retries=0,
                               timeout=120)
        with client:
            index = 0
            while not stop.is_set():
                index += 1
                messages: list[ChatCompletionMessageParam] = [
                    {"role": "user", "content": f"Hello {worker}.{index}"}]
                sent.append(time.monotonic())
                try:
                    if index % 3 == 0:
                        chunks = list(client.chat.completions.create(
                            model=MODEL, messages=messages, max_tokens=4, stream=True,
                            stream_options={"include_usage": True}))
                        assert chunks and chunks[-1].usage is not None, "the stream ended early"
                    else:
                        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
                        assert answer.choices[0].message.content is not None
                except Exception as error:  # every failure is counted and reported
                    failures.append(f"{type(error).__name__}: {error}")
                stop.wait(0.5)

    phases: dict[str, float] = {}  # where the roll's time goes: first seen, seconds after the rotation

    def rolled() -> bool:
        current, keys = _backend_keys(sandbox, models)
        pods = chart.pods(sandbox, models, f"argosy.dev/deployment={MODEL}")
        ids = [(p["metadata"]["annotations"].get("argosy.dev/backend-key-id"), chart.is_ready(p)) for p in pods]
        for phase, seen in (("surge pod", any(i == current != old_id for i, _ in ids)),
                            ("it is Ready", (current, True) in ids and current != old_id),
                            ("old pod gone", ids and old_id not in {i for i, _ in ids}),
                            ("old entry dropped", current != old_id and set(keys) == {f"key-{current}"})):
            if seen:
                phases.setdefault(phase, time.monotonic() - rotated_at)
        return len(phases) == 4 and ids == [(current, True)]

    senders = [threading.Thread(target=calls, args=(i,)) for i in range(2)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(2)
        assert not failures, failures
        rotated_at = time.monotonic()
        sandbox.kubectl("annotate", "lld", MODEL, "-n", models, "argosy.dev/rotate-backend-key=1", "--overwrite")
        done = wait_for(rolled, 600, interval=2)
        rolled_at = time.monotonic()
        time.sleep(2)  # a few requests to the new pod alone
    finally:
        stop.set()
        for sender in senders:
            sender.join(150)
    during = sum(1 for t in sent if rotated_at <= t <= rolled_at)
    print(f"rotation on real vLLM (maxSurge 1): rolled, old key dropped in {rolled_at - rotated_at:.0f} s; "
          f"{during} SDK requests sent during the roll, {len(sent)} in all, {len(failures)} failed; first seen: "
          + ", ".join(f"{phase} {at:.0f} s" for phase, at in phases.items()))
    assert done, "the pod did not roll to the new key in 600 s"
    assert not failures, f"{len(failures)} of {len(sent)} requests failed: {failures[:5]}"
    assert during >= 100, f"only {during} requests were sent during the roll"

    [new_pod] = chart.pods(sandbox, models, f"argosy.dev/deployment={MODEL}")
    assert new_pod["metadata"]["uid"] != old_pod["metadata"]["uid"]
    new_id, entries = _backend_keys(sandbox, models)
    assert new_pod["metadata"]["annotations"]["argosy.dev/backend-key-id"] == new_id != old_id
    assert set(entries) == {f"key-{new_id}"}  # the old entry is gone from the Secret
    direct = f"http://{new_pod['status']['podIP']}:8000"
    assert _post(direct, f"Bearer {old_key}") == (401, {"error": "Unauthorized"})  # the new vLLM refuses it
    assert _post(direct, f"Bearer {entries[f'key-{new_id}']}")[0] == 200
    serving.pod = new_pod


def test_a_model_at_zero_wakes_on_its_first_requests_and_answers_every_one(
    sandbox: Sandbox, release: Release, serving: Serving
) -> None:
    """A true cold start: the model at zero replicas (its vLLM pod drained and gone), then a few
    concurrent SDK requests, some streaming: the gateway holds them, one scale-up starts a new real
    vLLM, and every request is answered. Runs last: it replaces the module's vLLM pod."""
    from argosy_sandbox import vllm_runtime

    def lld() -> dict[str, Any]:
        return dict(json.loads(sandbox.kubectl("get", "lld", MODEL, "-n", release.models, "-o", "json").stdout))

    def listed() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{release.gateway_url}/v1/models", timeout=2) as response:
                listing = json.loads(response.read())
        except OSError:
            return {}
        return next((e["argosy"] for e in listing["data"] if e["id"] == MODEL), {})

    old = serving.pod["metadata"]["name"]
    # Put it to sleep (as the autoscaler would after scaleToZeroAfterSeconds without traffic).
    patch = {"spec": {"replicas": 0, "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 2,
                                                     "targetInFlightPerReplica": 16}}}
    sandbox.kubectl("patch", "lld", MODEL, "-n", release.models, "--type=merge", "-p", json.dumps(patch))
    asleep = time.monotonic()
    assert wait_for(lambda: not chart.pods(sandbox, release.models, f"argosy.dev/deployment={MODEL}"), 120, 0.5), (
        "the vLLM pod was not gone 120 s after the scale to zero")
    print(f"scale to zero: the vLLM pod {old} drained and was gone {time.monotonic() - asleep:.1f} s after the patch")
    assert wait_for(lambda: listed().get("scaledToZero") is True, 30)

    replicas_seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        replicas = int(lld()["spec"].get("replicas", 0))
        if not replicas_seen or replicas_seen[-1] != replicas:
            replicas_seen.append(replicas)

    def watch() -> None:
        while not stop.is_set():
            sample()
            stop.wait(0.5)

    def ask(index: int) -> tuple[str, float]:
        messages = [{"role": "user", "content": f"Hello {index}"}]
        started = time.monotonic()
        if index % 2:
            chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                                         stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[arg-type]
            text = answer.choices[0].message.content or ""
        return text, time.monotonic() - started

    sample()  # the state before anything is sent
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = openai.OpenAI(base_url=f"{release.gateway_url}/v1", api_key="unused", max_retries=0, timeout=1200)
    try:
        with ThreadPoolExecutor(6) as pool:
            sent = time.monotonic()
            results = list(pool.map(ask, range(6)))  # raises what a failed (e.g. 503) request raised
    finally:
        stop.set()
        watcher.join(5)
        client.close()
    first = min(took for _, took in results)
    print(f"cold start with real vLLM: first request to its answer {first:.1f} s, all 6 answered "
          f"{time.monotonic() - sent:.1f} s after they were sent; replicas {replicas_seen}")
    assert all(text for text, _ in results), results
    assert replicas_seen == [0, 1], replicas_seen
    [pod] = [p for p in chart.pods(sandbox, release.models, f"argosy.dev/deployment={MODEL}")
             if not p["metadata"].get("deletionTimestamp")]
    assert pod["metadata"]["name"] != old and chart.is_ready(pod)
    pid = chart.container_pid(pod, "vllm")
    command = vllm_runtime.vllm_command()
    assert pid is not None and chart.cmdline(pid)[:len(command)] == command  # a new real vLLM, not the simulator
