"""The operator against the sandbox: what a model owner sees after `kubectl apply`.

Each test gets its own namespace and its own operator process watching only that
namespace (`argosy-operator run --namespace <ns>`), so tests never see each other's
objects. Everything waits by polling the API with a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import yaml
from argosy_operator.builders import BACKEND_KEY_ENV
from argosy_sandbox.cluster import Sandbox, free_port
from argosy_sandbox.pools import GpuSpec as PoolGpu
from argosy_sandbox.pools import NodePool, node_manifests

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OPERATOR = Path(sys.executable).with_name("argosy-operator")
DEADLINE = 60.0

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-40GB"
L4 = "NVIDIA-L4"

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")



class Operator:
    """One `argosy-operator run` subprocess watching one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log = log
        self.extra_env = env or {}
        self.extra_args = extra_args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            # Tests never leave 127.0.0.0/8: no Hugging Face Hub lookups.
            "ARGOSY_OPERATOR_HUB_LOOKUP": "false",
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "ARGOSY_OPERATOR_METRICS_HOST": "127.0.0.1",
            **self.extra_env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(OPERATOR), "run", "--kubeconfig", str(self.kubeconfig), "--namespace", self.namespace,
                 "--metrics-port", str(self.port), "--log-level", "INFO", *self.extra_args],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        wait_for("the operator to be ready", self._ready, timeout=30)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def operator(crd: None, kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(kubeconfig, namespace, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


class Cluster:
    def __init__(self, sandbox: Sandbox, namespace: str) -> None:
        self.sandbox = sandbox
        self.ns = namespace

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.kubectl(*args, "-n", self.ns, input=input, check=check)

    def apply(self, name: str, spec: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        doc = {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
               "metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=check)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def pods(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-l", f"argosy.dev/deployment={name}", "-o", "json").stdout
        return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]

    def backend_key(self, pod: dict[str, Any]) -> str | None:
        """The key the pod demands (the operator's Secret, as the gateway reads it); None: none."""
        key_id = (pod["metadata"].get("annotations") or {}).get("argosy.dev/backend-key-id")
        if key_id is None:
            return None
        deployment = pod["metadata"]["labels"]["argosy.dev/deployment"]
        secret = self.get("secret", f"{deployment}-backend-key") or {}
        value = (secret.get("data") or {}).get(f"key-{key_id}")
        return base64.b64decode(value).decode() if value else None

    def node_product(self, node: str) -> str:
        out = self.sandbox.kubectl("get", "node", node, "-o", "json").stdout
        return str(json.loads(out)["metadata"]["labels"].get("nvidia.com/gpu.product", ""))

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        obj = self.get("llmdeployment", name) or {}
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj.get("metadata", {}).get("generation"):
            return None  # not yet looked at the current spec
        return next((c for c in status.get("conditions") or () if c["type"] == ctype), None)

    def wait_condition(self, name: str, ctype: str, status: str, timeout: float = DEADLINE) -> dict[str, Any]:
        return wait_for(f"{ctype}={status} on {name}", lambda: (
            c if (c := self.condition(name, ctype)) and c["status"] == status else None), timeout)

    def wait_ready(self, name: str, replicas: int) -> dict[str, Any]:
        self.wait_condition(name, "Ready", "True")
        return wait_for(f"{replicas} ready pods of {name}", lambda: (
            obj if (obj := self.get("llmdeployment", name))
            and obj["status"].get("readyReplicas") == replicas and len(self.pods(name)) == replicas
            else None))


@pytest.fixture
def cluster(sandbox: Sandbox, namespace: str) -> Cluster:
    return Cluster(sandbox, namespace)


def container_of(pod_or_deploy: dict[str, Any]) -> dict[str, Any]:
    spec = pod_or_deploy["spec"]
    spec = spec["template"]["spec"] if "template" in spec else spec
    return dict(spec["containers"][0])


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


SMALL = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "gpu": {"products": [L4]}}


def test_small_model_on_l4_runs_one_ready_pod(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("small", SMALL)
    lld = cluster.wait_ready("small", 1)

    (pod,) = cluster.pods("small")
    assert cluster.node_product(pod["spec"]["nodeName"]) == L4
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
    # The contract the gateway reads.
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "argosy-operator"
    assert labels["argosy.dev/deployment"] == "small" and labels["argosy.dev/role"] == "server"
    assert json.loads(pod["metadata"]["annotations"]["argosy.dev/served-model-names"]) == ["small"]
    assert container_of(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"

    status = lld["status"]
    assert status["placement"]["gpuProduct"] == L4
    assert status["servedModelNames"] == ["small"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Progressing": "False", "Degraded": "False", "PlacementFound": "True"}
    svc = cluster.get("service", "small")
    assert svc is not None and svc["spec"]["ports"][0]["port"] == 8000
    assert 'argosy_operator_reconciles_total{result="success"}' in operator.metrics()


def test_70b_model_gets_a_tensor_parallel_pod_matching_its_placement(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("llama-70b", {"model": {"uri": "hf://meta-llama/Llama-3.1-70B-Instruct"},
                                "engine": {"maxModelLen": 8192}})
    lld = cluster.wait_ready("llama-70b", 1)
    placement = lld["status"]["placement"]
    assert placement["tensorParallelSize"] >= 2 and placement["podsPerReplica"] == 1

    (pod,) = cluster.pods("llama-70b")
    assert placement["gpuProduct"] in (H100, A100)
    assert cluster.node_product(pod["spec"]["nodeName"]) == placement["gpuProduct"]
    container = container_of(pod)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(placement["gpusPerPod"])
    assert placement["gpusPerPod"] == placement["tensorParallelSize"] * placement["pipelineParallelSize"]
    args = container["args"]
    assert flag(args, "--tensor-parallel-size") == str(placement["tensorParallelSize"])
    assert flag(args, "--pipeline-parallel-size") == str(placement["pipelineParallelSize"])
    assert flag(args, "--max-model-len") == "8192"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_explicit_parallelism_is_honoured(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("tp2", {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
                          "gpu": {"products": [A100]}, "parallelism": {"tensor": 2, "pipeline": 1},
                          "engine": {"maxModelLen": 16384}})
    lld = cluster.wait_ready("tp2", 1)
    placement = lld["status"]["placement"]
    assert (placement["tensorParallelSize"], placement["pipelineParallelSize"], placement["gpuProduct"]) == (
        2, 1, A100)
    (pod,) = cluster.pods("tp2")
    container = container_of(pod)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert flag(container["args"], "--tensor-parallel-size") == "2"
    assert cluster.node_product(pod["spec"]["nodeName"]) == A100


def test_impossible_spec_reports_why_and_runs_no_pods(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("huge", {"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"},
                           "gpu": {"products": [L4]}})
    placement = cluster.wait_condition("huge", "PlacementFound", "False")
    assert placement["reason"] == "InsufficientGpuMemory"
    assert "GiB" in placement["message"] and "it would fit" in placement["message"]
    assert cluster.condition("huge", "Ready")["status"] == "False"  # type: ignore[index]
    assert cluster.get("deployment", "huge") is None
    assert cluster.pods("huge") == []
    assert any(e["type"] == "Warning" and e["reason"] == "InsufficientGpuMemory" for e in events_of(cluster, "huge"))


FACTS_32_HEADS = {"hiddenSize": 4096, "numHiddenLayers": 32, "numAttentionHeads": 32, "numKeyValueHeads": 8,
                  "intermediateSize": 14336, "vocabSize": 128256, "maxPositionEmbeddings": 131072}


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param({**SMALL, "replicas": -1}, "should be greater than or equal to 0", id="negative replicas"),
    pytest.param({"model": {"uri": "pvc://weights/m", "facts": FACTS_32_HEADS}, "parallelism": {"tensor": 3}},
                 "parallelism.tensor must divide model.facts.numAttentionHeads", id="tensor 3 for 32 heads"),
    pytest.param({**SMALL, "gpus": 2}, 'unknown field "spec.gpus"', id="unknown field"),
    pytest.param({"model": {"uri": "gs://bucket/model"}}, "model.uri must start with hf://, pvc:// or s3://",
                 id="bad URI scheme"),
])
def test_invalid_specs_are_refused_by_kubectl_apply(crd: None, cluster: Cluster, spec: dict[str, Any],
                                                    message: str) -> None:
    result = cluster.apply("bad", spec, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert cluster.get("llmdeployment", "bad") is None


def test_a_name_too_long_to_label_children_is_refused(crd: None, cluster: Cluster) -> None:
    name = "a" * 64
    result = cluster.apply(name, SMALL, check=False)
    assert result.returncode != 0
    assert "metadata.name must be at most 63 characters" in result.stderr
    assert cluster.get("llmdeployment", name) is None


def test_drift_is_repaired(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("drift", SMALL)
    cluster.wait_ready("drift", 1)
    original = cluster.get("deployment", "drift")
    assert original is not None

    cluster.kubectl("delete", "deployment", "drift", "--wait=false")
    wait_for("the deleted Deployment to come back", lambda: (
        d if (d := cluster.get("deployment", "drift")) and d["metadata"]["uid"] != original["metadata"]["uid"]
        else None), timeout=15)

    cluster.kubectl("set", "image", "deployment/drift", "vllm=example.invalid/vllm:hacked")
    cluster.kubectl("patch", "deployment", "drift", "--type=merge", "-p", '{"spec":{"replicas":4}}')
    wait_for("the hand edits to be reverted", lambda: (
        (d := cluster.get("deployment", "drift")) and container_of(d)["image"] == container_of(original)["image"]
        and d["spec"]["replicas"] == 1), timeout=15)

    cluster.kubectl("delete", "service", "drift", "--wait=false")
    wait_for("the deleted Service to come back", lambda: cluster.get("service", "drift"), timeout=15)
    cluster.wait_ready("drift", 1)


def test_scale_up_and_down_through_the_scale_subresource(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("scaled", SMALL)
    cluster.wait_ready("scaled", 1)

    cluster.kubectl("scale", "lld/scaled", "--replicas=3")
    lld = cluster.wait_ready("scaled", 3)
    assert lld["status"]["replicas"] == 3
    assert {cluster.node_product(p["spec"]["nodeName"]) for p in cluster.pods("scaled")} == {L4}

    cluster.kubectl("scale", "lld/scaled", "--replicas=1")
    cluster.wait_ready("scaled", 1)
    wait_for("status.replicas to drop to 1", lambda: (
        (lld := cluster.get("llmdeployment", "scaled")) and lld["status"]["replicas"] == 1))
    deploy = cluster.get("deployment", "scaled")
    assert deploy is not None and deploy["spec"]["replicas"] == 1
    scale_path = f"/apis/argosy.dev/v1alpha1/namespaces/{cluster.ns}/llmdeployments/scaled/scale"
    scale = json.loads(cluster.sandbox.kubectl("get", "--raw", scale_path).stdout)
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == "argosy.dev/deployment=scaled,argosy.dev/role=server"


def test_deleting_the_llmdeployment_removes_its_children(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("doomed", SMALL)
    cluster.wait_ready("doomed", 1)
    cluster.kubectl("delete", "lld", "doomed", "--wait=true", "--timeout=30s")
    wait_for("the Deployment, Service and pods to be garbage-collected", lambda: (
        cluster.get("deployment", "doomed") is None and cluster.get("service", "doomed") is None
        and cluster.pods("doomed") == []))

    # No finalizer: deleting works while the operator is down (uninstall, upgrade, crash).
    cluster.apply("orphan", SMALL)
    cluster.wait_ready("orphan", 1)
    operator.stop()
    cluster.kubectl("delete", "lld", "orphan", "--wait=true", "--timeout=30s")
    wait_for("children of an LLMDeployment deleted while the operator is down to go", lambda: (
        cluster.get("deployment", "orphan") is None and cluster.pods("orphan") == []))


def test_operator_restart_mid_rollout_converges(operator: Operator, cluster: Cluster) -> None:
    cluster.apply("rolling", {**SMALL, "replicas": 2})
    cluster.wait_ready("rolling", 2)

    cluster.apply("rolling", {**SMALL, "replicas": 2, "engine": {"args": ["--enable-prefix-caching"]}})
    wait_for("the rollout to start", lambda: (
        (d := cluster.get("deployment", "rolling")) and "--enable-prefix-caching" in container_of(d)["args"]))
    operator.stop(signal.SIGKILL)  # no graceful shutdown: the worst case

    # Changed again while nobody watches.
    cluster.apply("rolling", {**SMALL, "replicas": 2, "engine": {"args": ["--enable-chunked-prefill"]}})
    operator.start()

    wait_for("the Deployment to carry the latest spec", lambda: (
        (d := cluster.get("deployment", "rolling")) and container_of(d)["args"][-1] == "--enable-chunked-prefill"
        and "--enable-prefix-caching" not in container_of(d)["args"]))
    lld = cluster.wait_ready("rolling", 2)
    assert lld["status"]["observedGeneration"] == lld["metadata"]["generation"]
    wait_for("every pod to run the latest template", lambda: all(
        container_of(p)["args"][-1] == "--enable-chunked-prefill" for p in cluster.pods("rolling")))
    cluster.wait_condition("rolling", "Progressing", "False")


# Operator safety: sticky placement, removed fields, re-plans on request.

class GpuPools:
    """Extra simulated GPU nodes with a product of their own, so a test can cordon them freely.

    The GPU products are unique per test: no other model (nor another test's operator)
    is placed on them, and the nodes are deleted when the test ends.
    """

    def __init__(self, sandbox: Sandbox, tag: str) -> None:
        self.sandbox = sandbox
        self.tag = tag
        self.nodes: list[str] = []

    def product(self, pool: str) -> str:
        return f"E2E-{self.tag}-{pool}".upper()

    def add(self, pool: str, nodes: int, memory_mib: int, gpus: int) -> list[str]:
        spec = NodePool(f"e2e-{self.tag}-{pool}", nodes, cpu="16", memory="64Gi",
                        gpu=PoolGpu(self.product(pool), memory_mib, gpus))
        manifests = node_manifests((spec,))
        self.sandbox.kubectl("apply", "--server-side", "--field-manager=argosy-e2e", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "List",
            "items": [{k: v for k, v in n.items() if k != "status"} for n in manifests]}))
        names = [n["metadata"]["name"] for n in manifests]
        self.nodes += names
        for node in manifests:
            self.sandbox.kubectl("patch", "node", node["metadata"]["name"], "--subresource=status", "--type=merge",
                                 "-p", json.dumps({"status": node["status"]}))
        wait_for(f"nodes {names} to be Ready", lambda: all(self.ready(n) for n in names))
        return names

    def ready(self, node: str) -> bool:
        out = self.sandbox.kubectl("get", "node", node, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions") or ()
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def cordon(self, names: list[str], on: bool = True) -> None:
        self.sandbox.kubectl("cordon" if on else "uncordon", *names)

    def delete(self) -> None:
        if self.nodes:
            self.sandbox.kubectl("delete", "node", *self.nodes, "--wait=false", check=False)


@pytest.fixture
def gpu_pools(sandbox: Sandbox) -> Iterator[GpuPools]:
    pools = GpuPools(sandbox, secrets.token_hex(3))
    try:
        yield pools
    finally:
        pools.delete()


def answers(cluster: Cluster, pod: dict[str, Any], model: str) -> bool:
    """A completion from the pod's own vLLM server (the sandbox's pod runner serves it with the simulator),
    asked with the pod's backend key as the gateway would."""
    client = openai.OpenAI(base_url=f"http://{pod['status']['podIP']}:8000/v1",
                           api_key=cluster.backend_key(pod) or "unused", max_retries=0, timeout=5)
    try:
        with client:
            return bool(client.completions.create(model=model, prompt="hi", max_tokens=2).choices)
    except openai.APIError:
        return False


def placement_of(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(((cluster.get("llmdeployment", name) or {}).get("status") or {}).get("placement") or {})


def pod_ids(cluster: Cluster, name: str) -> dict[str, str]:
    return {p["metadata"]["uid"]: p["spec"].get("nodeName") or "" for p in cluster.pods(name)}


def test_placement_is_sticky_until_the_spec_changes_or_a_replan_is_asked(
        operator: Operator, cluster: Cluster, gpu_pools: GpuPools) -> None:
    big, cheap = gpu_pools.product("big"), gpu_pools.product("cheap")
    big_nodes = gpu_pools.add("big", 2, memory_mib=81559, gpus=8)
    spec = {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"}, "replicas": 2,
            "gpu": {"products": [big, cheap]}}
    cluster.apply("sticky", spec)
    cluster.wait_ready("sticky", 2)
    wait_for("both pods to answer", lambda: all(answers(cluster, p, "sticky") for p in cluster.pods("sticky")))
    before = cluster.get("deployment", "sticky")
    assert before is not None and placement_of(cluster, "sticky")["gpuProduct"] == big
    pods = pod_ids(cluster, "sticky")

    def untouched() -> None:
        now = cluster.get("deployment", "sticky")
        assert now is not None and before is not None
        assert (now["metadata"]["uid"], now["metadata"]["generation"]) == (
            before["metadata"]["uid"], before["metadata"]["generation"])
        assert pod_ids(cluster, "sticky") == pods
        assert placement_of(cluster, "sticky")["gpuProduct"] == big

    # Cordon the whole pool (a node upgrade): the model keeps serving and says it is at risk.
    gpu_pools.cordon(big_nodes)
    degraded = cluster.wait_condition("sticky", "Degraded", "True")
    assert degraded["reason"] == "PoolUnavailable"
    assert degraded["message"].startswith(f"2 of 2 pods cannot be rescheduled: pool {big}")
    assert "cordoned" in degraded["message"] and "argosy.dev/replan" in degraded["message"]
    assert cluster.condition("sticky", "Ready")["status"] == "True"  # type: ignore[index]
    untouched()
    assert all(answers(cluster, p, "sticky") for p in cluster.pods("sticky"))

    gpu_pools.cordon(big_nodes, on=False)
    assert cluster.wait_condition("sticky", "Degraded", "False")["reason"] == "Healthy"
    untouched()

    # A cheaper pool appears: a new model takes it, the running one does not move.
    cheap_nodes = gpu_pools.add("cheap", 3, memory_mib=23034, gpus=1)  # room for both models
    cluster.apply("fresh", {**spec, "replicas": 1})
    cluster.wait_ready("fresh", 1)
    assert placement_of(cluster, "fresh")["gpuProduct"] == cheap
    untouched()

    # A spec change re-plans, onto the best pool there is now, and rolls out.
    cluster.apply("sticky", {**spec, "engine": {"maxModelLen": 4096}})
    generation = cluster.get("llmdeployment", "sticky")["metadata"]["generation"]  # type: ignore[index]
    wait_for("a placement for the new spec", lambda: (
        (p := placement_of(cluster, "sticky")) and p["plannedFor"]["generation"] == generation
        and p["gpuProduct"] == cheap))
    cluster.wait_ready("sticky", 2)
    wait_for("every pod to run the new spec on the cheap pool", lambda: (
        (ps := cluster.pods("sticky")) and len(ps) == 2
        and all(flag(container_of(p)["args"], "--max-model-len") == "4096"
                and p["spec"].get("nodeName") in cheap_nodes for p in ps)))

    # Cordon the cheap pool: Degraded, nothing moves... until a re-plan is asked for.
    gpu_pools.cordon(cheap_nodes)
    assert cluster.wait_condition("sticky", "Degraded", "True")["reason"] == "PoolUnavailable"
    assert placement_of(cluster, "sticky")["gpuProduct"] == cheap
    cluster.kubectl("annotate", "lld", "sticky", "argosy.dev/replan=after-cordon", "--overwrite")
    wait_for("the requested re-plan", lambda: (
        (p := placement_of(cluster, "sticky")) and p["plannedFor"].get("replanRequest") == "after-cordon"
        and p["gpuProduct"] == big))
    cluster.wait_ready("sticky", 2)
    wait_for("the pods to move back to the big pool", lambda: (
        (ps := cluster.pods("sticky")) and len(ps) == 2 and all(p["spec"].get("nodeName") in big_nodes for p in ps)))
    assert cluster.wait_condition("sticky", "Degraded", "False")["reason"] == "Healthy"
    wait_for("the moved pods to answer", lambda: all(answers(cluster, p, "sticky") for p in cluster.pods("sticky")))


def test_removed_fields_disappear_from_the_pod_template(operator: Operator, cluster: Cluster) -> None:
    cluster.kubectl("create", "secret", "generic", "hf-token", "--from-literal=token=hf_unused")
    env = [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "KEEP_ME", "value": "1"}]
    cluster.apply("fields", {**SMALL, "hfTokenSecretRef": {"name": "hf-token"}, "engine": {"env": env}})
    cluster.wait_ready("fields", 1)

    def env_names(obj: dict[str, Any]) -> list[str]:
        # VLLM_API_KEY is the operator's own (the backend key), not one the spec gave.
        return [e["name"] for e in container_of(obj).get("env") or () if e["name"] != BACKEND_KEY_ENV]

    deploy = cluster.get("deployment", "fields")
    assert deploy is not None and {"HF_TOKEN", "VLLM_LOGGING_LEVEL", "KEEP_ME"} <= set(env_names(deploy))

    cluster.apply("fields", {**SMALL, "engine": {"env": [{"name": "KEEP_ME", "value": "1"}]}})
    wait_for("HF_TOKEN and VLLM_LOGGING_LEVEL to leave the pod template", lambda: (
        (d := cluster.get("deployment", "fields")) and env_names(d) == ["KEEP_ME"]))
    wait_for("the running pod to be replaced by one without them", lambda: (
        (ps := cluster.pods("fields")) and len(ps) == 1 and env_names(ps[0]) == ["KEEP_ME"]))
    lld = cluster.wait_ready("fields", 1)
    assert lld["status"]["observedGeneration"] == lld["metadata"]["generation"]


def events_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    return list(json.loads(out)["items"])


def reconciles(op: Operator, result: str) -> float:
    line = f'argosy_operator_reconciles_total{{result="{result}"}} '
    return sum(float(x.split()[-1]) for x in op.metrics().splitlines() if x.startswith(line))


def test_a_spec_the_api_server_refuses_waits_for_a_change(
        crd: None, kubeconfig: Path, namespace: str, tmp_path: Path, cluster: Cluster) -> None:
    op = Operator(kubeconfig, namespace, tmp_path / "operator.log", env={"ARGOSY_OPERATOR_RESYNC_SECONDS": "0.5"})
    op.start()
    try:
        # Admitted by the CRD, refused by the Deployment's validation: not a label value.
        cluster.apply("refused", {**SMALL, "scheduling": {"nodeSelector": {"zone": "a b"}}})
        degraded = cluster.wait_condition("refused", "Degraded", "True")
        assert degraded["reason"] == "ApplyFailed" and "nodeSelector" in degraded["message"]
        wait_for("the pass to end waiting", lambda: reconciles(op, "wait") >= 1)
        waits, events = reconciles(op, "wait"), len(events_of(cluster, "refused"))
        time.sleep(4)  # eight resyncs: none of them may retry the refused write or announce it again
        assert reconciles(op, "wait") <= waits + 1
        assert reconciles(op, "retry") == 0
        assert len(events_of(cluster, "refused")) == events

        cluster.apply("refused", SMALL)  # the fix: an event for the object ends the wait
        cluster.wait_ready("refused", 1)
        assert cluster.condition("refused", "Degraded")["status"] == "False"  # type: ignore[index]
    finally:
        op.stop()
