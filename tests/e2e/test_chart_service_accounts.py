"""The chart's RBAC is enough to serve a model: the real operator and gateway processes run
with the tokens of the ServiceAccounts the chart creates (not the sandbox's admin), reconcile
an LLMDeployment and answer a chat completion through the gateway, with no request refused.

There is no container runtime here, so the chart's pods are simulated by kwok; the operator
and gateway run as local processes that authenticate exactly as those pods would.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_sandbox.build import helm_binary as _helm_binary
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.cluster import free_port as _free_port
from argosy_sandbox.podrunner import SERVING_PODS_SELECTOR, PodRunner, vllm_simulator_command

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "argosy"
BIN = Path(sys.executable).parent
CRD_NAME = "llmdeployments.argosy.dev"
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


def _token_kubeconfig(sandbox: Sandbox, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig for the sandbox that authenticates as a ServiceAccount, by token."""
    token = sandbox.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(sandbox.kubeconfig.read_text())
    for entry in config["users"]:
        entry["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


class Process:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()


@pytest.fixture
def scoped_release(sandbox: Sandbox, namespace: str) -> Iterator[tuple[str, str]]:
    """A release in `namespace` that watches one fresh namespace; yields (release, watched)."""
    binary = _helm_binary()
    if binary is None:
        pytest.skip("helm is missing: neither the sandbox's cached helm, `helm` on PATH, nor Go to build it")
    if sandbox.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        crd = subprocess.run(
            [str(binary), "template", "argosy", str(CHART), "--show-only", "templates/crds/llmdeployments.yaml"],
            capture_output=True,
            text=True,
            check=True,
        )
        sandbox.kubectl("create", "-f", "-", input=crd.stdout)
        sandbox.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    release = f"argosy-{secrets.token_hex(3)}"
    watched = f"sa-models-{secrets.token_hex(3)}"
    sandbox.kubectl("create", "namespace", watched)
    helm = [str(binary), f"--kubeconfig={sandbox.kubeconfig}"]
    install = subprocess.run(
        [
            *helm,
            "install",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--set",
            "crds.enabled=false",
            "--set",
            f"watchNamespaces={{{watched}}}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stderr
    try:
        yield release, watched
    finally:
        sandbox.kubectl("delete", "lld", "--all", "-n", watched, "--wait=false", check=False)
        subprocess.run(
            [*helm, "uninstall", release, "--namespace", namespace], capture_output=True, text=True, timeout=180
        )
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


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_operator_and_gateway_serve_a_model_with_only_the_charts_rbac(sandbox, namespace, scoped_release, tmp_path):
    release, watched = scoped_release
    operator_config = _token_kubeconfig(sandbox, namespace, f"{release}-operator", tmp_path / "operator.kubeconfig")
    gateway_config = _token_kubeconfig(sandbox, namespace, f"{release}-gateway", tmp_path / "gateway.kubeconfig")
    # The tokens really are the ServiceAccounts' (so the test cannot pass on admin rights).
    whoami = sandbox.kubectl(
        f"--kubeconfig={operator_config}", "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"
    )
    assert whoami.stdout == f"system:serviceaccount:{namespace}:{release}-operator"

    processes: list[Process] = []
    try:
        operator = Process(
            [
                str(BIN / "argosy-operator"),
                "run",
                "--kubeconfig",
                str(operator_config),
                "--namespace",
                watched,
                "--metrics-port",
                str(_free_port()),
            ],
            tmp_path / "operator.log",
        )
        processes.append(operator)
        sandbox.kubectl("apply", "-n", watched, "-f", "-", input=json.dumps(MODEL))

        def placed_and_ready() -> bool:
            lld = json.loads(sandbox.kubectl("get", "lld", "sa-llama-8b", "-n", watched, "-o", "json").stdout)
            conditions = {c["type"]: c["status"] for c in lld.get("status", {}).get("conditions", [])}
            return conditions.get("PlacementFound") == "True" and lld["status"].get("readyReplicas") == 1

        _wait(placed_and_ready, 90, f"the operator to place and run the model (log: {operator.log})")
        deployments = json.loads(sandbox.kubectl("get", "deployments", "-n", watched, "-o", "json").stdout)["items"]
        assert [d["metadata"]["labels"]["app.kubernetes.io/managed-by"] for d in deployments] == ["argosy-operator"]

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with PodRunner(
            sandbox.kubeconfig,
            SERVING_PODS_SELECTOR,
            vllm_simulator_command(),
            namespace=watched,
            log_dir=tmp_path / "pods",
        ):
            gateway = Process(
                [str(BIN / "argosy-gateway"), "--host", "127.0.0.1", "--port", str(port)],
                tmp_path / "gateway.log",
                env={
                    "ARGOSY_GATEWAY_DISCOVERY": "kubernetes",
                    "ARGOSY_GATEWAY_KUBECONFIG": str(gateway_config),
                    "ARGOSY_GATEWAY_NAMESPACES": json.dumps([watched]),
                },
            )
            processes.append(gateway)
            _wait(lambda: _ready(url), 60, f"the gateway to be ready (log: {gateway.log})")
            answer = _wait(lambda: _chat(url, "sa-llama-8b"), 60, f"a chat completion (log: {gateway.log})")
            assert answer["model"] == "sa-llama-8b"
            assert answer["choices"][0]["message"]["content"]

        for process in processes:
            assert process.popen.poll() is None, f"{process.log.name} exited:\n{process.text()[-2000:]}"
            refused = [
                line
                for line in process.text().splitlines()
                if "forbidden" in line.lower() or "not enough permissions" in line.lower()
            ]
            assert not refused, f"{process.log.name}: the API server refused a request:\n" + "\n".join(refused[:5])
    finally:
        for process in processes:
            process.stop()
