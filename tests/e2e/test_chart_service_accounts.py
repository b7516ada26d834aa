"""The chart's RBAC is enough to serve a model: after `helm install`, the chart's own operator and
gateway pods run (the sandbox's pod runner runs their containers with the chart's args and env,
authenticated with tokens of the pods' ServiceAccounts, not the sandbox's admin), are Ready
through their own probes, reconcile an LLMDeployment and answer a chat completion through the
gateway pod, with no request refused. vLLM pods are served by the simulator here (fast);
tests/e2e/test_real_vllm.py does the same against real vLLM.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from argosy_sandbox import chart
from argosy_sandbox.cluster import Sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = {
    "apiVersion": "argosy.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "sa-llama-8b"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct", "servedModelNames": ["sa-llama-8b"]},
        "replicas": 1,
        "gpu": {"count": 1},
    },
}


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def scoped_release(sandbox: Sandbox, namespace: str) -> Iterator[tuple[str, str]]:
    """A release in `namespace` that watches one fresh namespace; yields (release, watched)."""
    chart.ensure_crd(sandbox)
    release = f"argosy-{secrets.token_hex(3)}"
    watched = f"sa-models-{secrets.token_hex(3)}"
    sandbox.kubectl("create", "namespace", watched)
    try:
        chart.install(sandbox, release, namespace, "--set", "crds.enabled=false",
                      "--set", f"watchNamespaces={{{watched}}}")
        yield release, watched
    finally:
        sandbox.kubectl("delete", "lld", "--all", "-n", watched, "--wait=false", check=False)
        chart.helm(sandbox, "uninstall", release, "--namespace", namespace, check=False)
        sandbox.kubectl("delete", "namespace", watched, "--wait=false", check=False)


def _chat(url: str, model: str) -> dict[str, Any] | None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))
    except (urllib.error.URLError, OSError):
        return None


def test_the_charts_pods_serve_a_model_with_only_the_charts_rbac(sandbox, namespace, scoped_release):
    release, watched = scoped_release
    # helm --wait returned: both Deployments are available, so their pods passed their own readiness probes.
    operator = chart.component_pod(sandbox, namespace, release, "operator")
    gateway = chart.component_pod(sandbox, namespace, release, "gateway")
    assert chart.is_ready(operator) and chart.is_ready(gateway), (operator, gateway)
    for pod, component in ((operator, "operator"), (gateway, "gateway")):
        # The process is the project's entry point with the chart's args, as the ServiceAccount's token.
        argv = chart.cmdline(chart.container_pid(pod))
        container = pod["spec"]["containers"][0]
        expected = [arg.replace("0.0.0.0", pod["status"]["podIP"]) for arg in container["args"]]
        assert chart.program_args(argv, f"argosy-{component}") == expected, argv
        kubeconfig = chart.pod_dir(sandbox, pod) / "kubeconfig"
        whoami = sandbox.kubectl(f"--kubeconfig={kubeconfig}", "auth", "whoami",
                                 "-o", "jsonpath={.status.userInfo.username}")
        assert whoami.stdout == f"system:serviceaccount:{namespace}:{release}-{component}"

    sandbox.kubectl("apply", "-n", watched, "-f", "-", input=json.dumps(MODEL))

    def placed_and_ready() -> bool:
        lld = json.loads(sandbox.kubectl("get", "lld", "sa-llama-8b", "-n", watched, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in lld.get("status", {}).get("conditions", [])}
        return conditions.get("PlacementFound") == "True" and lld["status"].get("readyReplicas") == 1

    operator_logs = f"kubectl logs -n {namespace} {operator['metadata']['name']}"
    _wait(placed_and_ready, 90, f"the operator pod to place and run the model ({operator_logs})")
    deployments = json.loads(sandbox.kubectl("get", "deployments", "-n", watched, "-o", "json").stdout)["items"]
    assert [d["metadata"]["labels"]["app.kubernetes.io/managed-by"] for d in deployments] == ["argosy-operator"]

    url = f"http://{gateway['status']['podIP']}:{chart.GATEWAY_PORT}"
    answer = _wait(lambda: _chat(url, "sa-llama-8b"), 60, "a chat completion through the gateway pod")
    assert answer["model"] == "sa-llama-8b"
    assert answer["choices"][0]["message"]["content"]

    for pod in (operator, gateway):
        name = pod["metadata"]["name"]
        current = json.loads(sandbox.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
        assert current["status"]["containerStatuses"][0]["restartCount"] == 0, f"{name} restarted"
        logs = sandbox.kubectl("logs", "-n", namespace, name)
        refused = [line for line in logs.stdout.splitlines()
                   if "forbidden" in line.lower() or "not enough permissions" in line.lower()]
        assert not refused, f"{name}: the API server refused a request:\n" + "\n".join(refused[:5])
