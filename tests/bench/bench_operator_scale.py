"""How fast the operator reconciles a burst of LLMDeployments, and what it costs in memory.

    .venv/bin/python tests/bench/bench_operator_scale.py [--count 200] [--replicas 0]

Brings the sandbox up if needed, starts `argosy-operator run` on a fresh namespace,
creates --count LLMDeployments (a mix of shipped models, so every one is planned),
and prints the time until every object is reconciled: status.observedGeneration equals
metadata.generation and its Deployment exists. Per-object latency is measured from the
moment the API server accepted the create to the first poll that saw it reconciled
(polls every --poll seconds, so that is the resolution). Also prints the operator's
peak RSS (VmHWM) and its own reconcile counters.

--replicas 0 (the default) measures the operator, not the scheduler: the sandbox has
four L4 GPUs, so with replicas 1 most pods would sit Pending, which is realistic for a
saturated cluster but mostly measures kube-scheduler retries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from argosy_operator import crd as crdgen
from argosy_operator.kubeapi import KubeApi, load_credentials
from argosy_sandbox.cluster import Sandbox, free_port

OPERATOR = Path(sys.executable).with_name("argosy-operator")
MODELS = (
    ("hf://meta-llama/Llama-3.2-1B-Instruct", None),
    ("hf://meta-llama/Llama-3.1-8B-Instruct", 16384),
    ("hf://Qwen/Qwen2.5-7B-Instruct", 16384),
    ("hf://meta-llama/Llama-3.1-70B-Instruct", 8192),
)



def body(namespace: str, index: int, replicas: int) -> dict[str, Any]:
    uri, max_len = MODELS[index % len(MODELS)]
    spec: dict[str, Any] = {"model": {"uri": uri}, "replicas": replicas}
    if max_len:
        spec["engine"] = {"maxModelLen": max_len}
    return {
        "apiVersion": "argosy.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": f"bench-{index:04d}", "namespace": namespace},
        "spec": spec,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def create_all(api: KubeApi, namespace: str, count: int, replicas: int) -> dict[str, float]:
    created: dict[str, float] = {}
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            obj = body(namespace, i, replicas)
            await api.create(obj)
            created[obj["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(i) for i in range(count)))
    return created


async def poll_reconciled(
    api: KubeApi, namespace: str, created: dict[str, float], limit: float, interval: float
) -> dict[str, float]:
    done: dict[str, float] = {}
    deadline = time.monotonic() + limit
    while len(done) < len(created) and time.monotonic() < deadline:
        llds, deploys = await asyncio.gather(
            api.list("argosy.dev/v1alpha1", "LLMDeployment", namespace),
            api.list("apps/v1", "Deployment", namespace),
        )
        now = time.monotonic()
        present = {d["metadata"]["name"] for d in deploys}
        for item in llds:
            name = item["metadata"]["name"]
            current = (item.get("status") or {}).get("observedGeneration") == item["metadata"].get("generation")
            if name in created and name not in done and current and name in present:
                done[name] = now
        await asyncio.sleep(interval)
    return done


async def measure(
    kubeconfig: Path, namespace: str, args: argparse.Namespace
) -> tuple[float, dict[str, float], dict[str, float], float]:
    """Create the objects and wait for them; returns (start, created, reconciled, create span)."""
    api = KubeApi(load_credentials(str(kubeconfig)))
    try:
        start = time.monotonic()
        created = await create_all(api, namespace, args.count, args.replicas)
        span = time.monotonic() - start
        done = await poll_reconciled(api, namespace, created, args.timeout, args.poll)
        return start, created, done, span
    finally:
        await api.close()


def wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def bench(args: argparse.Namespace) -> int:
    sandbox = Sandbox(report=lambda message: None)
    if not sandbox.is_up():
        print("starting the sandbox ...", flush=True)
        sandbox.up()
    namespace = f"bench-{secrets.token_hex(3)}"
    sandbox.kubectl("create", "namespace", namespace)
    # Hundreds of serving pods: counted, not served (no simulator process per pod).
    sandbox.kubectl("label", "namespace", namespace, "sandbox.argosy.dev/vllm=none")
    with tempfile.TemporaryDirectory() as tmp:
        crd_path = Path(tmp) / "crd.yaml"
        crd_path.write_text(crdgen.render_manifest())
        sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_path))
    sandbox.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.argosy.dev", "--timeout=60s")

    port = free_port()
    log = Path(tempfile.gettempdir()) / f"argosy-bench-operator-{namespace}.log"
    env = {
        **os.environ,
        "ARGOSY_OPERATOR_HUB_LOOKUP": "false",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "ARGOSY_OPERATOR_METRICS_HOST": "127.0.0.1",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(OPERATOR),
                "run",
                "--kubeconfig",
                str(sandbox.kubeconfig),
                "--namespace",
                namespace,
                "--metrics-port",
                str(port),
                "--log-level",
                "WARNING",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        if not wait_ready(proc, port):
            print(f"operator did not become ready; see {log}", file=sys.stderr)
            return 1
        idle_rss = peak_rss_mib(proc.pid)
        idle_cpu = cpu_seconds(proc.pid)
        start, created, done, created_span = asyncio.run(measure(sandbox.kubeconfig, namespace, args))
        total = (max(done.values()) - start) if done else float("nan")
        latencies = [done[n] - created[n] for n in done]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()

        print(
            f"operator scale benchmark: {args.count} LLMDeployments, replicas={args.replicas}, "
            f"namespace {namespace}, {os.cpu_count()} CPUs"
        )
        print(f"  created in              {created_span:7.2f} s (16 concurrent POSTs)")
        print(f"  reconciled              {len(done)}/{args.count}")
        print(f"  total (first create -> last reconciled) {total:7.2f} s")
        if latencies:
            print(
                f"  per object  p50 {statistics.median(latencies):6.2f} s   "
                f"p99 {percentile(latencies, 0.99):6.2f} s   max {max(latencies):6.2f} s   "
                f"(poll resolution {args.poll} s)"
            )
        print(
            f"  operator RSS idle {idle_rss:6.1f} MiB, peak {peak_rss_mib(proc.pid):6.1f} MiB; "
            f"CPU used during the run {cpu_seconds(proc.pid) - idle_cpu:6.2f} s"
        )
        print(
            f"  reconcile passes {metric(metrics, 'argosy_operator_reconciles_total'):.0f}, "
            f"busy {metric(metrics, 'argosy_operator_reconcile_duration_seconds_sum'):.2f} s, "
            f"child writes {metric(metrics, 'argosy_operator_child_writes_total'):.0f}"
        )
        calls = metric(metrics, "argosy_operator_api_request_duration_seconds_count")
        waited = metric(metrics, "argosy_operator_api_request_duration_seconds_sum")
        print(f"  operator API calls {calls:.0f}, mean latency {1000 * waited / max(calls, 1):.0f} ms")
        return 0 if len(done) == args.count else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sandbox.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--poll", type=float, default=0.25)
    return bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
