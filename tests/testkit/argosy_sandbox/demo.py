"""`make demo`: Argosy end to end on the local sandbox, with a real vLLM answer at the end.

Steps: sandbox up (control plane, simulated GPU nodes, the pod runner) → vLLM's CPU build and
the stand-in model → `helm install` of charts/argosy, whose operator and gateway pods the pod
runner runs as the chart says → two LLMDeployments from manifests/examples: llama-8b served by
real vLLM, mistral-7b by the simulator → one streaming chat completion through the gateway pod
with the OpenAI SDK, saying which pod and which vLLM answered.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

from . import chart
from .cluster import Sandbox
from .kubelet_plan import BACKEND_KEY
from .paths import REPO_ROOT

NAMESPACE = "argosy-demo"
RELEASE = "argosy"
RELEASE_NAMESPACE = "argosy-system"
EXAMPLE = REPO_ROOT / "manifests" / "examples" / "two-models.yaml"
REAL_MODEL = "llama-8b"  # served by vLLM's CPU build with the stand-in model
SIMULATED_MODEL = "mistral-7b"  # served by the simulator
MODELS = (REAL_MODEL, SIMULATED_MODEL)
TOTAL_STEPS = 7


class DemoError(RuntimeError):
    pass


def step(number: int, text: str) -> float:
    print(f"\n[{number}/{TOTAL_STEPS}] {text}", flush=True)
    return time.monotonic()


def done(started: float, detail: str = "") -> None:
    suffix = f": {detail}" if detail else ""
    print(f"      done in {time.monotonic() - started:.1f} s{suffix}", flush=True)


def say(text: str) -> None:
    print(f"      {text}", flush=True)


def wait(predicate: Callable[[], bool], timeout: float, what: str, progress: Callable[[], str] | None = None) -> None:
    """Wait, printing what is happening every 10 s when there is a way to tell."""
    started = time.monotonic()
    last = started
    deadline = started + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if progress is not None and time.monotonic() - last >= 10:
            last = time.monotonic()
            say(f"... {time.monotonic() - started:.0f} s: {progress()}")
        time.sleep(0.5)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def get_json(url: str, timeout: float = 2) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def serving_pod(sandbox: Sandbox, model: str) -> dict[str, Any] | None:
    found = chart.pods(sandbox, NAMESPACE, f"argosy.dev/deployment={model}")
    live = [pod for pod in found if not pod["metadata"].get("deletionTimestamp")]
    return live[0] if live else None


def last_log_line(sandbox: Sandbox, pod: dict[str, Any] | None) -> str:
    if pod is None:
        return "waiting for the operator to create the pod"
    logs = sandbox.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"], "--tail=1", check=False)
    line = (logs.stdout.strip().splitlines() or ["(no output yet)"])[-1]
    return f"{pod['metadata']['name']} not Ready yet; its log: {line[:140]}"


def main() -> int:
    overall = time.monotonic()
    sandbox = Sandbox(report=lambda message: say(message.strip()))
    try:
        began = step(1, "sandbox: a real Kubernetes control plane, simulated GPU nodes, and the pod runner")
        sandbox.up()
        done(began)

        began = step(2, "vLLM's CPU build and the tiny stand-in model (first run: a few GB, minutes)")
        from . import standin_model, vllm_runtime

        vllm_runtime.ensure_runtime(say)
        model_dir = standin_model.ensure_model(say)
        done(began, f"stand-in model in {model_dir}")

        began = step(3, "helm install charts/argosy: the chart's operator and gateway pods run for real")
        wait(lambda: sandbox.kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}",
                                     check=False).stdout != "Terminating",
             120, f"namespace {NAMESPACE} from an earlier demo to finish terminating")
        sandbox.kubectl("create", "namespace", NAMESPACE, check=False)
        chart.install(sandbox, RELEASE, RELEASE_NAMESPACE, "--set", f"watchNamespaces={{{NAMESPACE}}}")
        say("the chart's pods (Ready through their own probes; the process is the chart's container):")
        for component in ("operator", "gateway"):
            pod = chart.component_pod(sandbox, RELEASE_NAMESPACE, RELEASE, component)
            if pod is None or not chart.is_ready(pod):
                raise DemoError(f"the chart's {component} pod is not Ready after helm --wait")
            pid = chart.container_pid(pod)
            command = " ".join(chart.program_args(chart.cmdline(pid), f"argosy-{component}") or []) if pid else "?"
            say(f"  {pod['metadata']['name']} on {pod['spec']['nodeName']} at {pod['status']['podIP']}: "
                f"argosy-{component} {command} (pid {pid})")
        gateway_pod = chart.component_pod(sandbox, RELEASE_NAMESPACE, RELEASE, "gateway")
        assert gateway_pod is not None
        gateway = f"http://{gateway_pod['status']['podIP']}:{chart.GATEWAY_PORT}"
        done(began)

        began = step(4, f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)}: {REAL_MODEL} on real vLLM "
                        f"({BACKEND_KEY}=real, engine.enforceEager=true), {SIMULATED_MODEL} on the simulator")
        sandbox.kubectl("create", "secret", "generic", "hf-token", "-n", NAMESPACE,
                        "--from-literal=token=demo-token-not-used", check=False)
        documents = [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]
        for document in documents:
            if document["metadata"]["name"] == REAL_MODEL:
                document["metadata"].setdefault("annotations", {})[BACKEND_KEY] = "real"
                # No torch.compile at start: about a minute less on a CPU; the server is the same.
                document["spec"].setdefault("engine", {})["enforceEager"] = True
        sandbox.kubectl("apply", "-n", NAMESPACE, "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))

        def both_ready() -> bool:
            return all(chart.is_ready(serving_pod(sandbox, model)) for model in MODELS)

        wait(both_ready, 600, "both serving pods to be Ready (vLLM answers /health)",
             progress=lambda: last_log_line(sandbox, serving_pod(sandbox, REAL_MODEL)))
        for model in MODELS:
            pod = serving_pod(sandbox, model)
            assert pod is not None
            lld = json.loads(sandbox.kubectl("get", "lld", model, "-n", NAMESPACE, "-o", "json").stdout)
            placement = (lld.get("status") or {}).get("placement") or {}
            say(f"{model}: pod {pod['metadata']['name']} at {pod['status']['podIP']}:8000, "
                f"TP={placement.get('tensorParallelSize')} PP={placement.get('pipelineParallelSize')} "
                f"on {placement.get('gpuProduct')}")
        done(began)

        began = step(5, "the gateway pod routes both models")

        def models_ready() -> bool:
            listing = get_json(f"{gateway}/v1/models") or {}
            ready = {entry["id"] for entry in listing.get("data", []) if entry.get("argosy", {}).get("ready")}
            return set(MODELS) <= ready

        wait(models_ready, 60, f"the gateway ({gateway}) to list both models as ready")
        done(began, gateway)

        began = step(6, f"one streaming chat completion for {REAL_MODEL} through the gateway, with the OpenAI SDK")
        ask(gateway, sandbox)
        done(began)

        step(7, f"Argosy is running (this demo took {time.monotonic() - overall:.0f} s). Poke it:")
        print(f"""
      export KUBECONFIG={sandbox.kubeconfig}
      kubectl get pods -A -o wide                       # the chart's pods and the serving pods
      kubectl get lld -n {NAMESPACE}                    # models, TP/PP, replicas, readiness
      kubectl logs -n {NAMESPACE} deploy/{REAL_MODEL}             # real vLLM's own log
      curl -s {gateway}/v1/models
      curl -s {gateway}/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{{"model": "{REAL_MODEL}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
      stop the demo: python -m argosy_sandbox.demo stop; stop everything: make sandbox-down
""")
        return 0
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1


def ask(gateway: str, sandbox: Sandbox) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="demo", max_retries=3, timeout=60)
    question = "Tell me about the sea."
    say(f"user: {question}")
    print(f"      {REAL_MODEL}: ", end="", flush=True)
    with client.chat.completions.with_streaming_response.create(
        model=REAL_MODEL, messages=[{"role": "user", "content": question}], max_tokens=32, stream=True,
    ) as response:
        endpoint = response.headers.get("x-argosy-endpoint", "?")
        text = []
        for chunk in response.parse():
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                text.append(piece)
                print(piece, end="", flush=True)
    print(flush=True)
    ip = endpoint.split(":")[0]
    pods = json.loads(sandbox.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    pod = next((p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("podIP") == ip), "?")
    version = (get_json(f"http://{endpoint}/version") or {}).get("version", "?")
    say(f"answered by pod {pod} at {endpoint}: vLLM {version} (its CPU build), streamed through the gateway pod")
    say("note: the weights are a tiny stand-in model the sandbox trained in seconds (there is no GPU and no")
    say("      model hub here), so the words are legible but not Llama's. Everything else is the real path:")
    say("      the operator's `vllm serve` arguments, vLLM's OpenAI server, the gateway, the OpenAI SDK.")
    if not "".join(text).strip():
        raise DemoError("the stream carried no text")


def stop() -> int:
    """Uninstall the demo's release and delete its namespace; the sandbox keeps running."""
    sandbox = Sandbox()
    sandbox.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    chart.helm(sandbox, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, check=False)
    print("demo stopped; the sandbox is still up (make sandbox-down stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(stop() if sys.argv[1:] == ["stop"] else main())
