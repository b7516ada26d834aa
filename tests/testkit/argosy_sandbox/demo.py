"""`make demo`: Argosy end to end on the local sandbox, with a real answer at the end.

Steps: sandbox up → `helm install` of charts/argosy → the operator and the gateway
as local processes (this machine has no container runtime, so the chart's
Deployments are scheduled onto simulated nodes but no container runs) → two
LLMDeployments from manifests/examples → the vLLM simulator on each serving pod's
IP → one chat completion through the gateway with the OpenAI SDK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import build
from .cluster import Sandbox, free_port
from .paths import REPO_ROOT
from .podrunner import wait_for

NAMESPACE = "argosy-demo"
RELEASE_NAMESPACE = "argosy-system"
EXAMPLE = REPO_ROOT / "manifests" / "examples" / "two-models.yaml"
MODELS = ("llama-8b", "mistral-7b")
BIN = Path(sys.executable).parent


class DemoError(RuntimeError):
    pass


def step(number: int, total: int, text: str) -> float:
    print(f"\n[{number}/{total}] {text}", flush=True)
    return time.monotonic()


def done(started: float, detail: str = "") -> None:
    suffix = f": {detail}" if detail else ""
    print(f"      done in {time.monotonic() - started:.1f} s{suffix}", flush=True)


def wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    if not wait_for(predicate, timeout, interval=0.25):
        hint = f"; see {log}" if log else ""
        raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


def start_background(sandbox: Sandbox, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """A long-running demo process: own process group, log file, pid file that `make sandbox-down` honours."""
    pid_path = sandbox.run_dir / f"demo-{name}.pid"
    if pid_path.exists():
        try:
            old = int(pid_path.read_text())
            if sandbox._is_ours(old):
                Sandbox._terminate(old)
        except ValueError:
            pass
    log_path = sandbox.log_dir / f"demo-{name}.log"
    with log_path.open("a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)} ====\n")
        log.flush()
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=REPO_ROOT,
        )
    pid_path.write_text(f"{process.pid}\n")
    return process.pid


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def lld_status(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    listing = sandbox.kubectl("get", "llmdeployments", "-n", NAMESPACE, "-o", "json", check=False)
    if listing.returncode != 0:
        return {}
    return {item["metadata"]["name"]: item.get("status") or {} for item in json.loads(listing.stdout)["items"]}


def main() -> int:
    total = 7
    overall = time.monotonic()
    sandbox = Sandbox(report=lambda message: print(f"      {message.strip()}", flush=True))
    kubeconfig = str(sandbox.kubeconfig)
    helm = str(build.HELM.binary("helm"))
    try:
        began = step(1, total, "sandbox: a real Kubernetes control plane with simulated GPU nodes")
        sandbox.up()
        done(began)

        began = step(2, total, "helm install charts/argosy (CRDs, operator, gateway, RBAC) into the sandbox")
        result = subprocess.run(
            [
                helm,
                "upgrade",
                "--install",
                "argosy",
                str(REPO_ROOT / "charts" / "argosy"),
                "--namespace",
                RELEASE_NAMESPACE,
                "--create-namespace",
                "--kubeconfig",
                kubeconfig,
                # The CRD may already exist from `kubectl apply -f manifests/crds` or an earlier run.
                # Taking it over means overriding whoever last wrote its ownership annotations.
                "--take-ownership",
                "--force-conflicts",
                "--wait",
                "--timeout",
                "120s",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"helm install failed:\n{result.stderr or result.stdout}")
        pods = sandbox.kubectl(
            "get",
            "pods",
            "-n",
            RELEASE_NAMESPACE,
            "-o",
            "custom-columns=POD:.metadata.name,NODE:.spec.nodeName,PHASE:.status.phase",
            "--no-headers",
        ).stdout
        print("      the chart's pods, scheduled onto simulated nodes (no container runtime here, so no")
        print("      container runs in them; the operator and gateway run as local processes instead):")
        for line in pods.strip().splitlines():
            print(f"        {line}")
        done(began)

        began = step(3, total, "operator and gateway as local processes against the sandbox")
        metrics_port = free_port()
        operator_pid = start_background(
            sandbox,
            "operator",
            [
                str(BIN / "argosy-operator"),
                "run",
                "--kubeconfig",
                kubeconfig,
                "--namespace",
                NAMESPACE,
                "--metrics-port",
                str(metrics_port),
            ],
        )
        gateway_port = int(os.environ.get("ARGOSY_DEMO_GATEWAY_PORT") or free_port({metrics_port}))
        gateway_config = sandbox.state / "demo-gateway.yaml"
        gateway_config.write_text(f"discovery: kubernetes\nkubeconfig: {kubeconfig}\nnamespaces: [{NAMESPACE}]\n")
        gateway_pid = start_background(
            sandbox,
            "gateway",
            [
                str(BIN / "argosy-gateway"),
                "--host",
                "127.0.0.1",
                "--port",
                str(gateway_port),
                "--config",
                str(gateway_config),
            ],
        )
        gateway = f"http://127.0.0.1:{gateway_port}"
        wait(lambda: http_ok(f"{gateway}/healthz"), 60, "the gateway", sandbox.log_dir / "demo-gateway.log")
        done(began, f"operator pid {operator_pid}, gateway pid {gateway_pid} on {gateway}")

        began = step(4, total, f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)} (two models)")

        def namespace_not_terminating() -> bool:
            phase = sandbox.kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False)
            return phase.stdout != "Terminating"

        wait(namespace_not_terminating, 120, f"namespace {NAMESPACE} from an earlier demo to finish terminating")
        sandbox.kubectl("create", "namespace", NAMESPACE, check=False)
        sandbox.kubectl(
            "create",
            "secret",
            "generic",
            "hf-token",
            "-n",
            NAMESPACE,
            "--from-literal=token=demo-token-not-used",
            check=False,
        )
        sandbox.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))

        def placed() -> bool:
            statuses = lld_status(sandbox)
            return all((statuses.get(name) or {}).get("readyReplicas") == 1 for name in MODELS)

        wait(placed, 90, "both LLMDeployments to report a ready replica", sandbox.log_dir / "demo-operator.log")
        for name, status in sorted(lld_status(sandbox).items()):
            placement = status.get("placement") or {}
            print(
                f"      {name}: TP={placement.get('tensorParallelSize')} PP={placement.get('pipelineParallelSize')}"
                f" on {placement.get('gpuProduct')}; {placement.get('reason', '')}"
            )
        done(began)

        began = step(5, total, "vLLM simulator on each serving pod's IP (pod runner)")
        start_background(
            sandbox,
            "pod-runner",
            [
                sys.executable,
                "-m",
                "argosy_sandbox",
                "--state",
                str(sandbox.state),
                "run-pods",
                "--namespace",
                NAMESPACE,
                "--vllm-sim",
            ],
        )

        def serving_ips() -> list[str]:
            listing = sandbox.kubectl("get", "pods", "-n", NAMESPACE, "-l", "argosy.dev/role=server", "-o", "json")
            return [ip for pod in json.loads(listing.stdout)["items"] if (ip := (pod.get("status") or {}).get("podIP"))]

        def simulators_answer() -> bool:
            ips = serving_ips()
            return len(ips) >= len(MODELS) and all(http_ok(f"http://{ip}:8000/health") for ip in ips)

        wait(
            simulators_answer,
            60,
            "a simulator to answer on every serving pod's IP",
            sandbox.log_dir / "demo-pod-runner.log",
        )

        def models_ready() -> bool:
            try:
                with urllib.request.urlopen(f"{gateway}/v1/models", timeout=2) as response:
                    listing = json.loads(response.read())
            except (OSError, ValueError):
                return False
            ready = {entry["id"] for entry in listing.get("data", []) if entry.get("argosy", {}).get("ready")}
            return set(MODELS) <= ready

        wait(models_ready, 60, "the gateway to list both models as ready", sandbox.log_dir / "demo-gateway.log")
        done(began, ", ".join(f"http://{ip}:8000" for ip in serving_ips()))

        began = step(6, total, "one chat completion through the gateway with the OpenAI SDK")
        answer = ask(gateway, sandbox)
        print(f"      {answer}")
        done(began)

        step(7, total, f"Argosy is running (demo took {time.monotonic() - overall:.0f} s). Poke it:")
        print(f"""
      export KUBECONFIG={kubeconfig}
      kubectl get lld -n {NAMESPACE}                 # models, TP/PP, replicas, readiness
      kubectl scale lld/llama-8b -n {NAMESPACE} --replicas=2
      curl -s {gateway}/v1/models
      curl -s {gateway}/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{{"model": "mistral-7b", "messages": [{{"role": "user", "content": "Hello"}}]}}'
      logs: {sandbox.log_dir}/demo-operator.log, demo-gateway.log, demo-pod-runner.log
      stop the demo: python -m argosy_sandbox.demo stop; stop everything: make sandbox-down
""")
        return 0
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1


def stop() -> int:
    """Stop the demo's processes (operator, gateway, pod runner and its simulators); the sandbox keeps running."""
    sandbox = Sandbox()
    stopped = 0
    for pid_path in sorted(sandbox.run_dir.glob("demo-*.pid")):
        try:
            pid = int(pid_path.read_text())
        except ValueError:
            pid = 0
        if pid and sandbox._is_ours(pid):
            Sandbox._terminate(pid)
            stopped += 1
        pid_path.unlink(missing_ok=True)
    sandbox.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    print(f"demo stopped ({stopped} processes); the sandbox is still up (make sandbox-down stops it)")
    return 0


def ask(gateway: str, sandbox: Sandbox) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="demo", max_retries=5, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="llama-8b",
        messages=[{"role": "user", "content": "In one sentence, what is Argosy?"}],
        max_tokens=24,
    )
    completion = raw.parse()
    endpoint = raw.headers.get("x-argosy-endpoint", "?")
    ip = endpoint.split(":")[0]
    pods = json.loads(sandbox.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    pod = next((p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("podIP") == ip), "?")
    text = completion.choices[0].message.content
    return f"model {completion.model!r} answered from pod {pod} ({endpoint}): {text!r}"


if __name__ == "__main__":
    sys.exit(stop() if sys.argv[1:] == ["stop"] else main())
