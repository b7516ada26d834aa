"""The gateway's Kubernetes discovery against the sandbox: real watches, real sockets.

The gateway runs as its own process (``argosy-gateway``, lightkube LIST + watch), the sandbox's
pod runner serves every vLLM pod with the simulator (the default backend), and the OpenAI SDK
calls the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from argosy_sandbox import chart
from argosy_sandbox.cluster import Sandbox, free_port
from argosy_sandbox.podrunner import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240), pytest.mark.usefixtures("crd")]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


# Inline config.json facts (an 8B, Llama-shaped model), so the operator never looks anything up
# on the Hugging Face Hub: test traffic stays on 127.0.0.0/8.
FACTS = {
    "hiddenSize": 4096,
    "numHiddenLayers": 32,
    "numAttentionHeads": 32,
    "numKeyValueHeads": 8,
    "intermediateSize": 14336,
    "vocabSize": 128256,
    "maxPositionEmbeddings": 131072,
}


def llm_deployment(name: str, replicas: int = 1, policy: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if policy:
        metadata["annotations"] = {"argosy.dev/routing-policy": policy}
    return {
        "apiVersion": "argosy.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": metadata,
        "spec": {
            "model": {"uri": f"hf://example/{name}", "servedModelNames": [name], "facts": FACTS},
            "replicas": replicas,
            "gpu": {"count": 1},
            "engine": {"maxModelLen": 4096},
        },
    }


def serving_pod(name: str, served: list[str], deployment: str) -> dict[str, Any]:
    """A pod shaped like the operator's serving pods (for the discovery-only test)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "argosy-operator",
                "argosy.dev/role": "server",
                "argosy.dev/deployment": deployment,
            },
            "annotations": {"argosy.dev/served-model-names": json.dumps(served)},
        },
        "spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.32.0",
                    "command": ["vllm", "serve"],
                    "args": [f"example/{deployment}", "--served-model-name", *served, "--port", "8000"],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


class GatewayProcess:
    def __init__(
        self, kubeconfig: Path, namespace: str, log_path: Path, port: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        env = dict(os.environ)
        env.update(
            {
                "ARGOSY_GATEWAY_DISCOVERY": "kubernetes",
                "ARGOSY_GATEWAY_KUBECONFIG": str(kubeconfig),
                "ARGOSY_GATEWAY_NAMESPACES": json.dumps([namespace]),
                "ARGOSY_GATEWAY_RETRY_AFTER_SECONDS": "1",
                **(extra_env or {}),
            }
        )
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "argosy-gateway"), "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            return 0, b""

    def models(self) -> dict[str, dict[str, Any]]:
        status, body = self.get("/v1/models")
        if status != 200:
            return {}
        return {entry["id"]: entry["argosy"] for entry in json.loads(body)["data"]}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang is a failure below
            self.process.kill()
            self.process.wait()
            raise AssertionError("the gateway did not stop on SIGTERM") from None
        finally:
            self._log.close()


@pytest.fixture
def gateway(kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(kubeconfig, namespace, tmp_path / "gateway.log")
    try:
        assert wait_for(lambda: process.get("/readyz")[0] == 200, 30), process.log_path.read_text()
        yield process
    finally:
        process.stop()


def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10)


def served_by(gateway: GatewayProcess, model: str) -> str | None:
    """The endpoint that answered a chat request for ``model``, or None if it failed."""
    try:
        with sdk(gateway) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    except openai.APIError:
        return None
    assert raw.parse().model == model
    return raw.headers["x-argosy-endpoint"]


def status_for(gateway: GatewayProcess, model: str) -> int:
    try:
        with sdk(gateway) as client:
            client.completions.create(model=model, prompt="x", max_tokens=1)
    except openai.APIStatusError as error:
        return error.status_code
    except openai.APIConnectionError:
        return 0
    return 200


def test_discovery_follows_serving_pods_and_llmdeployments(
    sandbox: Sandbox, namespace: str, gateway: GatewayProcess
) -> None:
    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(llm_deployment("solo")))
    assert wait_for(lambda: gateway.models().get("solo", {}).get("ready") is False, 10)
    assert status_for(gateway, "solo") == 503

    sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(serving_pod("solo-0", ["solo"], "solo")))
    assert wait_for(lambda: served_by(gateway, "solo") is not None, 30), gateway.log_path.read_text()
    pod = json.loads(sandbox.kubectl("get", "pod", "solo-0", "-n", namespace, "-o", "json").stdout)
    assert served_by(gateway, "solo") == f"{pod['status']['podIP']}:8000"

    # The pod turns NotReady (as a failing readiness probe would make it), then Ready again. The pod
    # runner writes the pod's status only when its own view changes, so these patches stand.
    def set_ready(value: str) -> float:
        patch = json.dumps({"status": {"conditions": [{"type": "Ready", "status": value}]}})
        sandbox.kubectl(
            "patch", "pod", "solo-0", "-n", namespace, "--subresource=status", "--type=strategic", "-p", patch
        )
        return time.monotonic()

    unready_at = set_ready("False")
    assert wait_for(lambda: gateway.models()["solo"]["readyEndpoints"] == 0, 10)
    print(f"the route table dropped the NotReady pod {time.monotonic() - unready_at:.2f} s after kubectl returned")
    assert time.monotonic() - unready_at < 2.0
    assert status_for(gateway, "solo") == 503
    ready_at = set_ready("True")
    assert wait_for(lambda: served_by(gateway, "solo") is not None, 10)
    assert time.monotonic() - ready_at < 2.0

    sandbox.kubectl("delete", "pod", "solo-0", "-n", namespace, "--wait=false")
    deleted_at = time.monotonic()
    assert wait_for(lambda: gateway.models()["solo"]["readyEndpoints"] == 0, 10)
    followed_in = time.monotonic() - deleted_at
    print(f"the route table dropped the deleted pod {followed_in:.2f} s after kubectl returned")
    assert followed_in < 2.0  # within about a second (the margin covers this test's polling)
    assert status_for(gateway, "solo") == 503


@contextlib.contextmanager
def operator_process(kubeconfig: Path, namespace: str, log_path: Path) -> Iterator[Path]:
    """`argosy-operator run` for one namespace (no hub lookups: traffic stays on loopback)."""
    env = {**os.environ, "ARGOSY_OPERATOR_HUB_LOOKUP": "false", "HF_ENDPOINT": "http://127.0.0.1:9"}
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [str(BIN / "argosy-operator"), "run", "--kubeconfig", str(kubeconfig), "--namespace", namespace,
             "--metrics-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            yield log_path
        finally:
            operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()


def test_operator_and_gateway_serve_two_models_and_follow_scaling(
    sandbox: Sandbox, kubeconfig: Path, namespace: str, gateway: GatewayProcess, tmp_path: Path
) -> None:
    with operator_process(kubeconfig, namespace, tmp_path / "operator.log") as operator_log:
        for name, policy in (("alpha", None), ("beta", "prefix-affinity")):
            body = json.dumps(llm_deployment(name, policy=policy))
            sandbox.kubectl("apply", "-n", namespace, "-f", "-", input=body)

        def both_served() -> bool:
            return served_by(gateway, "alpha") is not None and served_by(gateway, "beta") is not None

        assert wait_for(both_served, 90, interval=0.5), operator_log.read_text()[-3000:]
        alpha_endpoint, beta_endpoint = served_by(gateway, "alpha"), served_by(gateway, "beta")
        assert alpha_endpoint != beta_endpoint
        assert gateway.models()["beta"]["policy"] == "prefix-affinity"

        sandbox.kubectl("scale", "llmdeployment/alpha", "-n", namespace, "--replicas=0")
        assert wait_for(lambda: status_for(gateway, "alpha") == 503, 30)
        assert served_by(gateway, "beta") == beta_endpoint  # the other model is untouched

        sandbox.kubectl("scale", "llmdeployment/alpha", "-n", namespace, "--replicas=1")
        scaled_at = time.monotonic()
        assert wait_for(lambda: served_by(gateway, "alpha") is not None, 60, interval=0.25)
        print(f"alpha served again {time.monotonic() - scaled_at:.1f} s after scaling back to 1")


def _json(sandbox: Sandbox, namespace: str, *what: str) -> Any:
    result = sandbox.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _group_pods(sandbox: Sandbox, namespace: str) -> list[dict[str, Any]]:
    found = _json(sandbox, namespace, "pods", "-l", "argosy.dev/deployment=llama-405b") or {"items": []}
    return sorted((p for p in found["items"] if not p["metadata"].get("deletionTimestamp")),
                  key=lambda p: p["metadata"]["name"])


def _runner_log(sandbox: Sandbox, namespace: str, pod: str) -> str:
    return sandbox.kubectl("logs", "-n", namespace, pod, "--tail=40", check=False).stdout


def test_a_replica_spanning_two_nodes_is_a_group_served_through_its_leader(
    sandbox: Sandbox, kubeconfig: Path, namespace: str, gateway: GatewayProcess, tmp_path: Path,
) -> None:
    """The 405B example: tensor 8 x pipeline 2 on the sandbox's two 8 x H100 nodes. The pod runner runs
    both pods' own `/bin/sh -c` scripts with the simulator as the image's `vllm` (the default backend)."""
    example = REPO / "manifests" / "examples" / "llama-405b-multi-node.yaml"
    sandbox.kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=unused")
    with operator_process(kubeconfig, namespace, tmp_path / "operator.log") as operator_log:
        sandbox.kubectl("apply", "-n", namespace, "-f", str(example))

        def group_ready() -> dict[str, Any] | None:
            lld = _json(sandbox, namespace, "llmdeployment", "llama-405b")
            groups = ((lld or {}).get("status") or {}).get("groups") or []
            complete = groups and all(g["ready"] for g in groups) and len(_group_pods(sandbox, namespace)) == 2
            return lld if complete else None

        def why() -> str:
            pods = {p["metadata"]["name"]: _runner_log(sandbox, namespace, p["metadata"]["name"])
                    for p in _group_pods(sandbox, namespace)}
            return operator_log.read_text()[-3000:] + "".join(f"\n--- {n}:\n{log}" for n, log in pods.items())

        assert wait_for(lambda: group_ready() is not None, 120, interval=0.5), why()
        lld = group_ready()
        assert lld is not None
        placement = lld["status"]["placement"]
        assert (placement["tensorParallelSize"], placement["pipelineParallelSize"], placement["podsPerReplica"]) == (
            8, 2, 2)
        assert lld["status"]["groups"][0]["name"] == "llama-405b-g0"

        leader, worker = _group_pods(sandbox, namespace)
        assert (leader["metadata"]["name"], worker["metadata"]["name"]) == ("llama-405b-g0-0", "llama-405b-g0-1")
        assert leader["spec"]["nodeName"] != worker["spec"]["nodeName"]  # one member per node
        for pod in (leader, worker):
            node = _json(sandbox, "default", "node", pod["spec"]["nodeName"])
            assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
            assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
            assert pod["spec"]["containers"][0]["command"][:2] == ["/bin/sh", "-c"]  # the pods' own scripts ran
        assert leader["metadata"]["labels"]["argosy.dev/role"] == "leader"
        assert json.loads(leader["metadata"]["annotations"]["argosy.dev/served-model-names"]) == ["llama-405b"]
        assert worker["metadata"]["labels"]["argosy.dev/role"] == "worker"
        assert "argosy.dev/served-model-names" not in (worker["metadata"].get("annotations") or {})
        headless = _json(sandbox, namespace, "service", "llama-405b-g0")
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        sts = _json(sandbox, namespace, "statefulset", "llama-405b-g0")
        assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
        # The worker reached its leader through the leader's stable name, resolved to the leader's pod IP,
        # and serves no HTTP: it is Ready by its connection to the leader (the exec probe).
        worker_log = _runner_log(sandbox, namespace, "llama-405b-g0-1")
        leader_ip = leader["status"]["podIP"]
        assert f"llama-405b-g0-0.llama-405b-g0.{namespace}.svc -> {leader_ip}" in worker_log
        assert f"joined the leader {leader_ip}:29500" in worker_log
        assert chart.http_status(f"http://{worker['status']['podIP']}:8000/health") == 0
        assert "group complete" in _runner_log(sandbox, namespace, "llama-405b-g0-0")

        # The gateway routes to the leader only: every answer comes from the leader's IP.
        leader_endpoint = f"{leader_ip}:8000"
        assert wait_for(lambda: served_by(gateway, "llama-405b") is not None, 30), gateway.log_path.read_text()
        assert {served_by(gateway, "llama-405b") for _ in range(5)} == {leader_endpoint}
        assert gateway.models()["llama-405b"]["readyEndpoints"] == 1

        # Deleting the worker restarts the whole group: a new leader pod too, and an Event.
        sandbox.kubectl("delete", "pod", "llama-405b-g0-1", "-n", namespace, "--wait=false")
        old_uids = {leader["metadata"]["uid"], worker["metadata"]["uid"]}

        def restarted() -> bool:
            pods = _group_pods(sandbox, namespace)
            return len(pods) == 2 and not ({p["metadata"]["uid"] for p in pods} & old_uids) and bool(group_ready())

        assert wait_for(restarted, 120, interval=0.5), why()
        lld = group_ready()
        assert lld is not None
        (entry,) = lld["status"]["groups"]
        assert entry["restarts"] >= 1 and entry["lastRestart"]["reason"] in ("MemberLost", "MemberReplaced")
        events = _json(sandbox, namespace, "events", "--field-selector", "reason=GroupRestarted")
        assert events["items"] and "llama-405b-g0" in events["items"][0]["message"]
        assert wait_for(lambda: served_by(gateway, "llama-405b") is not None, 30)

        # A spec change reaches the StatefulSet (OnDelete) and the operator replaces the group.
        before = {p["metadata"]["uid"] for p in _group_pods(sandbox, namespace)}
        sandbox.kubectl("patch", "llmdeployment", "llama-405b", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"engine": {"maxModelLen": 4096}}}))

        def replaced() -> bool:
            pods = _group_pods(sandbox, namespace)
            return (len(pods) == 2 and not ({p["metadata"]["uid"] for p in pods} & before)
                    and all("4096" in p["spec"]["containers"][0]["args"] for p in pods) and bool(group_ready()))

        assert wait_for(replaced, 120, interval=0.5), why()
        lld = group_ready()
        assert lld is not None and lld["status"]["groups"][0]["upToDate"] is True
        assert lld["status"]["groups"][0]["lastRestart"]["reason"] == "SpecChanged"

        # Scaling to zero removes the whole group.
        sandbox.kubectl("scale", "llmdeployment/llama-405b", "-n", namespace, "--replicas=0")
        assert wait_for(lambda: _json(sandbox, namespace, "statefulset", "llama-405b-g0") is None
                        and _json(sandbox, namespace, "service", "llama-405b-g0") is None, 60)
        assert wait_for(lambda: status_for(gateway, "llama-405b") == 503, 30)



def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _listed(url: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
        return {entry["id"]: entry["argosy"] for entry in json.loads(response.read())["data"]}


def _completion_status(url: str, model: str) -> int:
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        time.sleep(0.02)  # not listening (between the two processes): do not spin
        return 0


def test_a_restarted_gateway_never_answers_404_for_a_model_that_exists(
    sandbox: Sandbox, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    models = [f"m{index:02d}" for index in range(20)]
    objects = [llm_deployment(name) for name in models]
    # Four serving pods, five models each: every model is served without twenty processes.
    for group in range(4):
        names = models[group * 5 : group * 5 + 5]
        objects.append(serving_pod(f"server-{group}", names, names[0]))
    sandbox.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = GatewayProcess(kubeconfig, namespace, tmp_path / "gateway-0.log", port)
    try:
        assert wait_for(lambda: all(_completion_status(url, m) == 200 for m in models), 60), (
            gateway.log_path.read_text()
        )
        statuses: Counter[int] = Counter()
        not_found: list[str] = []
        partial_when_ready: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            index = 0
            while not stop.is_set():
                model = models[index % len(models)]
                status = _completion_status(url, model)
                statuses[status] += 1
                if status == 404:
                    not_found.append(model)
                index += 1

        def readiness() -> None:
            was_ready = True
            while not stop.is_set():
                ready = _ready(url)
                if ready and not was_ready:  # readiness just turned true: the table must be complete
                    listed = _listed(url)
                    partial_when_ready.append(sum(1 for m in models if listed.get(m, {}).get("readyEndpoints")))
                was_ready = ready
                time.sleep(0.01)

        threads = [threading.Thread(target=traffic) for _ in range(2)] + [threading.Thread(target=readiness)]
        for thread in threads:
            thread.start()
        try:
            for restart in range(1, 3):
                time.sleep(1.0)
                gateway.stop()
                gateway = GatewayProcess(kubeconfig, namespace, tmp_path / f"gateway-{restart}.log", port)
                assert wait_for(lambda: _ready(url), 30), gateway.log_path.read_text()
                target = statuses[200] + 40
                assert wait_for(lambda: statuses[200] > target, 30)  # noqa: B023 - waited on right here
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        print(f"requests during two restarts, by status: {dict(sorted(statuses.items()))}")
        assert not_found == []
        assert set(statuses) <= {200, 503, 0}  # served, "starting" (with Retry-After), or not listening
        assert partial_when_ready == [20, 20]  # each time it turned ready, all twenty were routable
    finally:
        gateway.stop()
