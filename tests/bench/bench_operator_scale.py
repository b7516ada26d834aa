"""How fast the operator brings a burst of LLMDeployments to Ready, and what it costs.

    .venv/bin/python tests/bench/bench_operator_scale.py [--counts 100,500,1000] [--nodes 200]

Runs on a sandbox of its own (state in .argosy/bench-operator, --nodes simulated H100
nodes with 8 GPUs each; kwok marks scheduled pods Running and Ready, nothing runs in
them), so the shared test sandbox keeps its small node pools. For each count: a fresh
namespace, a fresh `argosy-operator run` watching it, --count LLMDeployments with one
replica each (a mix of shipped models, so every one is planned) created 16 at a time;
then the time until every object is Ready on its current spec (Ready=True,
status.observedGeneration = metadata.generation, readyReplicas = 1), polled every
--poll seconds. Then one full resync period with nothing changing, to count what a
resync costs. Printed per count: time to all Ready, per-object latency, the operator's
peak RSS (VmHWM) and CPU time, its API calls per object to converge and per object per
resync (its own counter of client requests, argosy_operator_api_request_duration_seconds),
and the machine's load average before and after.

The controller manager and scheduler run with --kube-api-qps 500 here: their defaults
(20 and 50) would make the sandbox's own Deployment and ReplicaSet controllers, not
the operator, the bottleneck of a thousand-object burst.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argosy_operator import backendkey
from argosy_operator import crd as crdgen
from argosy_operator.api import LLMDeploymentSpec
from argosy_operator.builders import LABEL_MANAGED_BY
from argosy_operator.kubeapi import KubeApi, load_credentials
from argosy_operator.planner import inventory_from_nodes, plan_for_spec
from argosy_operator.reconcile import decide
from argosy_operator.settings import FIELD_MANAGER
from argosy_sandbox.cluster import Sandbox, free_port
from argosy_sandbox.pools import GpuSpec, NodePool, node_manifests

REPO = Path(__file__).resolve().parents[2]
OPERATOR = Path(sys.executable).with_name("argosy-operator")
H100 = GpuSpec("NVIDIA-H100-80GB-HBM3", 81559, 8)
# (uri, maxModelLen): one replica each; every eighth object is a 70B model on several GPUs.
MODELS = (
    ("hf://meta-llama/Llama-3.2-1B-Instruct", None),
    ("hf://meta-llama/Llama-3.1-8B-Instruct", 16384),
    ("hf://Qwen/Qwen2.5-7B-Instruct", 16384),
    ("hf://meta-llama/Llama-3.2-1B-Instruct", 4096),
    ("hf://meta-llama/Llama-3.1-8B-Instruct", 8192),
    ("hf://Qwen/Qwen2.5-7B-Instruct", 8192),
    ("hf://meta-llama/Llama-3.2-1B-Instruct", 2048),
    ("hf://meta-llama/Llama-3.1-70B-Instruct", 8192),
)
# Pod IPs in the sandbox are loopback addresses, which Endpoints and EndpointSlices refuse
# (422): these controllers would retry every Service with a ready pod for ever, and at a
# thousand Services those failing writes and their Warning events load the API server more
# than the operator does. Nothing in the sandbox reads endpoints (the gateway watches pods).
ENDPOINT_CONTROLLERS = ("endpoints-controller", "endpointslice-controller", "endpointslice-mirroring-controller")
API_CALLS = "argosy_operator_api_request_duration_seconds_count"
API_SECONDS = "argosy_operator_api_request_duration_seconds_sum"


def spec(index: int) -> dict[str, Any]:
    uri, max_len = MODELS[index % len(MODELS)]
    body: dict[str, Any] = {"model": {"uri": uri}, "replicas": 1}
    if max_len:
        body["engine"] = {"maxModelLen": max_len}
    return body


def manifest(namespace: str, index: int) -> dict[str, Any]:
    return {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": f"bench-{index:04d}", "namespace": namespace}, "spec": spec(index)}


def gpus_needed(count: int, pools: tuple[NodePool, ...]) -> int:
    """What the planner will ask for (the same pure planner the operator runs)."""
    ready = [{**node, "status": {**node["status"], "conditions": [{"type": "Ready", "status": "True"}]}}
             for node in node_manifests(pools)]
    inventory = inventory_from_nodes(ready)
    per_model = [plan_for_spec(LLMDeploymentSpec.model_validate(spec(i)), inventory)
                 for i in range(len(MODELS))]
    return sum(per_model[i % len(MODELS)].gpus_per_pod * per_model[i % len(MODELS)].pods_per_replica
               for i in range(count))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def component_cpu(sandbox: Sandbox) -> dict[str, float]:
    """CPU seconds (utime + stime) so far of every sandbox component that is running."""
    seconds = {}
    for component in Sandbox.COMPONENTS:
        try:
            seconds[component] = cpu_seconds(int(sandbox.pid_path(component).read_text().strip()))
        except (OSError, ValueError):
            continue
    return seconds


ALLOCATION = "kube_apiserver_clusterip_allocator_allocation_duration_seconds"


def allocator_seconds(sandbox: Sandbox) -> tuple[float, float]:
    """(ClusterIP allocations so far, seconds they took): the kube-apiserver's own histogram.

    kube-apiserver >= 1.34 allocates a ClusterIP by creating an IPAddress object through its
    loopback client while holding the allocator's one mutex (ipallocator.MetaAllocator's
    AllocateNextService), so these seconds are spent one allocation at a time.
    """
    text = sandbox.kubectl("get", "--raw", "/metrics").stdout
    return metric(text, ALLOCATION + "_count"), metric(text, ALLOCATION + "_sum")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def scrape(port: int) -> str:
    # Generous: at a thousand objects on a busy machine the operator's event loop answers late.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as r:
        return str(r.read().decode())


def service_span(services: list[dict[str, Any]], managed_only: bool = True) -> float:
    """Seconds from the first to the last of the operator's Services created (1 s resolution)."""
    stamps = [datetime.datetime.fromisoformat(s["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
              for s in services
              if not managed_only or (s["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) == FIELD_MANAGER]
    return (max(stamps) - min(stamps)).total_seconds() if stamps else float("nan")


def is_ready(item: dict[str, Any]) -> bool:
    status = item.get("status") or {}
    if status.get("observedGeneration") != item["metadata"].get("generation") or status.get("readyReplicas") != 1:
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


async def create_all(api: KubeApi, namespace: str, count: int) -> dict[str, float]:
    created: dict[str, float] = {}
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            obj = manifest(namespace, i)
            await api.create(obj)
            created[obj["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(i) for i in range(count)))
    return created


async def poll_ready(api: KubeApi, namespace: str, created: dict[str, float], limit: float,
                     interval: float) -> dict[str, float]:
    done: dict[str, float] = {}
    deadline = time.monotonic() + limit
    last_report = time.monotonic()
    while len(done) < len(created) and time.monotonic() < deadline:
        items = await api.list("argosy.dev/v1alpha1", "LLMDeployment", namespace)
        now = time.monotonic()
        for item in items:
            name = item["metadata"]["name"]
            if name in created and name not in done and is_ready(item):
                done[name] = now
        if now - last_report >= 10:
            print(f"    ... {len(done)}/{len(created)} Ready", flush=True)
            last_report = now
        await asyncio.sleep(interval)
    return done


@dataclass
class Result:
    count: int
    created_span: float
    ready: int
    total: float
    p50: float
    p99: float
    rss_idle: float
    rss_peak: float
    cpu: float
    calls_converge: float
    calls_resync: float
    passes_resync: float
    passes_converge: float
    busy: float
    api_latency_ms: float
    load_before: str
    load_after: str
    services_span: float
    cpu_by_component: dict[str, float]
    wall: float
    allocations: float
    allocation_seconds: float


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespace: str, resync: float, workers: int | None) -> None:
        self.port = free_port()
        self.log = Path(tempfile.gettempdir()) / f"argosy-bench-operator-{namespace}.log"
        env = {**os.environ, "ARGOSY_OPERATOR_HUB_LOOKUP": "false", "HF_ENDPOINT": "http://127.0.0.1:9",
               "ARGOSY_OPERATOR_METRICS_HOST": "127.0.0.1", "ARGOSY_OPERATOR_RESYNC_SECONDS": str(resync),
               **({"ARGOSY_OPERATOR_WORKERS": str(workers)} if workers else {})}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(OPERATOR), "run", "--kubeconfig", str(kubeconfig), "--namespace", namespace,
                 "--metrics-port", str(self.port), "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return True
            except OSError:
                time.sleep(0.2)
        return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_one(sandbox: Sandbox, count: int, args: argparse.Namespace) -> Result | None:
    namespace = f"bench-{count}-{os.getpid()}"
    sandbox.kubectl("create", "namespace", namespace)
    # Hundreds of serving pods: counted, not served (the pod runner starts no process for them).
    sandbox.kubectl("label", "namespace", namespace, "sandbox.argosy.dev/vllm=none")
    load_before = load_average()
    operator = OperatorProcess(sandbox.kubeconfig, namespace, args.resync, args.workers)
    try:
        if not operator.wait_ready():
            print(f"operator did not become ready; see {operator.log}", file=sys.stderr)
            return None
        pid = operator.proc.pid
        rss_idle, cpu_idle = proc_status(pid, "VmHWM"), cpu_seconds(pid)
        components_idle, wall_idle = component_cpu(sandbox), time.monotonic()
        allocated_idle = allocator_seconds(sandbox)
        idle_text = scrape(operator.port)
        calls_idle = metric(idle_text, API_CALLS)
        waited_idle = metric(idle_text, API_SECONDS)

        async def measure() -> tuple[float, dict[str, float], dict[str, float], float, float]:
            api = KubeApi(load_credentials(str(sandbox.kubeconfig)), timeout=60)
            try:
                start = time.monotonic()
                created = await create_all(api, namespace, count)
                span = time.monotonic() - start
                done = await poll_ready(api, namespace, created, args.timeout, args.poll)
                services = await api.list("v1", "Service", namespace)
                return start, created, done, span, service_span(services)
            finally:
                await api.close()

        start, created, done, span, services_span = asyncio.run(measure())
        rss_converged = proc_status(pid, "VmHWM")
        converged_text = scrape(operator.port)
        calls_converged = metric(converged_text, API_CALLS)
        passes_converged = metric(converged_text, "argosy_operator_reconciles_total")
        rss_peak, cpu = max(rss_converged, proc_status(pid, "VmHWM")), cpu_seconds(pid) - cpu_idle
        wall = time.monotonic() - wall_idle
        components = {name: seconds - components_idle.get(name, 0.0)
                      for name, seconds in component_cpu(sandbox).items()}
        allocated = allocator_seconds(sandbox)
        # One full resync with nothing changing: every object gets a pass; what does it cost?
        time.sleep(args.resync + 2)
        resync_text = scrape(operator.port)
        latencies = [done[n] - created[n] for n in done]
        return Result(
            count=count, created_span=span, ready=len(done),
            total=(max(done.values()) - start) if done else float("nan"),
            p50=statistics.median(latencies) if latencies else float("nan"),
            p99=percentile(latencies, 0.99) if latencies else float("nan"),
            rss_idle=rss_idle, rss_peak=max(rss_peak, proc_status(pid, "VmHWM")), cpu=cpu,
            calls_converge=(calls_converged - calls_idle) / count,
            calls_resync=(metric(resync_text, API_CALLS) - calls_converged) / count,
            passes_resync=(metric(resync_text, "argosy_operator_reconciles_total") - passes_converged) / count,
            passes_converge=passes_converged / count,
            busy=metric(converged_text, "argosy_operator_reconcile_duration_seconds_sum"),
            api_latency_ms=1000 * (metric(converged_text, API_SECONDS) - waited_idle)
            / max(1.0, calls_converged - calls_idle),
            load_before=load_before, load_after=load_average(), services_span=services_span,
            cpu_by_component={**components, "operator": cpu}, wall=wall,
            allocations=allocated[0] - allocated_idle[0], allocation_seconds=allocated[1] - allocated_idle[1],
        )
    finally:
        operator.stop()


def clean_up(sandbox: Sandbox, count: int) -> None:
    namespace = f"bench-{count}-{os.getpid()}"
    print(f"  cleaning up namespace {namespace} ...", flush=True)
    sandbox.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=300s", check=False)


def children_without_owner(namespace: str, index: int, nodes: tuple[dict[str, Any], ...],
                           headless: bool = False) -> list[dict[str, Any]]:
    """What the operator's first pass writes for object `index` (the backend-key Secret, Service,
    Deployment: its own builders), minus the owner reference (no LLMDeployment owns them here);
    `headless`: the Service without a ClusterIP (what the allocation costs)."""
    body = {**manifest(namespace, index)}
    body["metadata"] = {**body["metadata"], "uid": f"floor-{index}", "generation": 1}
    plan = backendkey.plan_keys(True, None, None, frozenset())
    secret = backendkey.build_secret(body["metadata"]["name"], namespace, "floor", plan)
    decision = decide(body, nodes, backend_key_id=plan.current)
    children = [secret, *(dict(d) for d in decision.desired)]
    for child in children:
        child["metadata"] = {k: v for k, v in child["metadata"].items() if k != "ownerReferences"}
        if headless and child["kind"] == "Service":
            child["spec"] = {**child["spec"], "clusterIP": "None"}
    return children


@dataclass
class FloorResult:
    count: int
    ready: int
    total: float
    services_span: float
    cpu_by_component: dict[str, float]
    wall: float
    load_before: str
    load_after: str
    headless: bool
    allocations: float
    allocation_seconds: float


def run_floor(sandbox: Sandbox, count: int, pools: tuple[NodePool, ...], args: argparse.Namespace) -> FloorResult:
    """The control plane alone: the operator's first-pass writes for `count` objects, made directly
    (`--workers` at a time, default 4, each object's Secret, then its Service and Deployment at
    once, as a pass does), then the time until every Deployment has its pod Ready. No operator
    runs: this is what the sandbox itself needs for the same objects."""
    namespace = f"bench-{count}-{os.getpid()}"
    sandbox.kubectl("create", "namespace", namespace)
    sandbox.kubectl("label", "namespace", namespace, "sandbox.argosy.dev/vllm=none")
    nodes = tuple({**n, "status": {**n["status"], "conditions": [{"type": "Ready", "status": "True"}]}}
                  for n in node_manifests(pools))
    load_before = load_average()
    components_idle, wall_idle = component_cpu(sandbox), time.monotonic()
    allocated_idle = allocator_seconds(sandbox)

    async def measure() -> tuple[float, int, float]:
        api = KubeApi(load_credentials(str(sandbox.kubeconfig)), timeout=120)
        try:
            start = time.monotonic()
            gate = asyncio.Semaphore(args.workers or 4)

            async def one(i: int) -> None:
                secret, *rest = children_without_owner(namespace, i, nodes, args.headless)
                async with gate:
                    await api.create(secret)
                    await asyncio.gather(*(api.apply(child, force=False) for child in rest))

            await asyncio.gather(*(one(i) for i in range(count)))
            deadline, ready, last = start + args.timeout, 0, time.monotonic()
            while time.monotonic() < deadline:
                items = await api.list("apps/v1", "Deployment", namespace)
                ready = sum(1 for d in items if (d.get("status") or {}).get("readyReplicas") == 1)
                if ready >= count:
                    break
                if time.monotonic() - last >= 10:
                    print(f"    ... {ready}/{count} Deployments Ready", flush=True)
                    last = time.monotonic()
                await asyncio.sleep(args.poll)
            total = time.monotonic() - start
            return total, ready, service_span(await api.list("v1", "Service", namespace), managed_only=False)
        finally:
            await api.close()

    total, ready, span = asyncio.run(measure())
    wall = time.monotonic() - wall_idle
    components = {name: seconds - components_idle.get(name, 0.0) for name, seconds in component_cpu(sandbox).items()}
    allocated = allocator_seconds(sandbox)
    return FloorResult(count=count, ready=ready, total=total, services_span=span, cpu_by_component=components,
                       wall=wall, load_before=load_before, load_after=load_average(), headless=args.headless,
                       allocations=allocated[0] - allocated_idle[0],
                       allocation_seconds=allocated[1] - allocated_idle[1])


def report_floor(result: FloorResult) -> None:
    print(f"control-plane floor (no operator): {result.count} objects' Secret, Service"
          f"{' (headless)' if result.headless else ''} and Deployment written directly, {os.cpu_count()} CPUs, "
          f"load average {result.load_before} before, {result.load_after} after")
    print(f"  Deployments Ready          {result.ready}/{result.count}")
    print(f"  Services created over      {result.services_span:7.0f} s "
          f"({result.count / max(result.services_span, 1.0):.1f} per second)")
    print(f"  total (first write -> last Deployment Ready) {result.total:7.2f} s")
    print_allocations(result.allocations, result.allocation_seconds)
    print_cpu(result.cpu_by_component, result.wall)


def print_allocations(count: float, seconds: float) -> None:
    print(f"  ClusterIP allocations      {count:5.0f}, {seconds:6.1f} s in all, one at a time "
          f"(mean {1000 * seconds / max(count, 1.0):4.0f} ms)")


def print_cpu(cpu_by_component: dict[str, float], wall: float) -> None:
    # Who used the machine's cores meanwhile (the whole machine's share is in the load).
    shares = ", ".join(f"{name} {seconds:.1f}" for name, seconds in
                       sorted(cpu_by_component.items(), key=lambda kv: -kv[1]))
    print(f"  CPU seconds over {wall:.0f} s ({os.cpu_count()} CPUs = "
          f"{wall * (os.cpu_count() or 1):.0f} CPU s): {shares}; sandbox total "
          f"{sum(cpu_by_component.values()):.1f}")


def report(result: Result, nodes: int, args: argparse.Namespace) -> None:
    print(f"operator scale benchmark: {result.count} LLMDeployments (1 replica each) on {nodes} simulated "
          f"8-GPU nodes, {os.cpu_count()} CPUs, load average {result.load_before} before, "
          f"{result.load_after} after")
    print(f"  created in                 {result.created_span:7.2f} s (16 concurrent POSTs)")
    print(f"  Ready on the current spec  {result.ready}/{result.count}")
    # Each Service gets a ClusterIP; the API server's allocations are the pace-maker here.
    print(f"  Services created over      {result.services_span:7.0f} s "
          f"({result.count / max(result.services_span, 1.0):.1f} per second)")
    print(f"  total (first create -> last Ready) {result.total:7.2f} s")
    print_allocations(result.allocations, result.allocation_seconds)
    print(f"  per object  p50 {result.p50:6.2f} s   p99 {result.p99:6.2f} s   (poll every {args.poll} s)")
    print(f"  operator RSS idle {result.rss_idle:6.1f} MiB, peak {result.rss_peak:6.1f} MiB; "
          f"CPU {result.cpu:6.2f} s to converge")
    print(f"  reconcile passes per object {result.passes_converge:5.2f}, busy {result.busy:7.2f} s in all, "
          f"mean API call {result.api_latency_ms:5.0f} ms")
    print_cpu(result.cpu_by_component, result.wall)
    print(f"  operator API calls per object: {result.calls_converge:5.2f} to converge, "
          f"{result.calls_resync:5.2f} per resync ({result.passes_resync:.2f} passes per object in "
          f"{args.resync:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,500,1000", help="comma-separated object counts, run in turn")
    parser.add_argument("--nodes", type=int, default=200, help="simulated H100 nodes (8 GPUs each)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--resync", type=float, default=30.0, help="the operator's resync period")
    parser.add_argument("--workers", type=int, default=None, help="the operator's workers (default: its own)")
    parser.add_argument("--keep-sandbox", action="store_true", help="leave the bench sandbox running")
    parser.add_argument("--floor", action="store_true",
                        help="no operator: write the same children directly and time the control plane alone")
    parser.add_argument("--headless", action="store_true",
                        help="with --floor: Services without a ClusterIP (to measure what its allocation costs)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    pools = (NodePool("h100", args.nodes, cpu="192", memory="2Ti", gpu=H100),)
    capacity = args.nodes * H100.count
    for count in counts:
        need = gpus_needed(count, pools)
        if need > capacity:
            print(f"{count} objects need {need} GPUs; {args.nodes} nodes have {capacity}: use more --nodes",
                  file=sys.stderr)
            return 2
    sandbox = Sandbox(state=REPO / ".argosy" / "bench-operator", pools=pools, report=lambda m: print(m, flush=True),
                      control_plane_qps=500, disabled_controllers=ENDPOINT_CONTROLLERS)
    print(f"bench sandbox ({args.nodes} nodes) in {sandbox.state} ...", flush=True)
    sandbox.up()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            crd_path = Path(tmp) / "crd.yaml"
            crd_path.write_text(crdgen.render_manifest())
            sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_path))
        sandbox.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.argosy.dev", "--timeout=60s")
        results: list[Result | FloorResult] = []
        for count in counts:
            print(f"== {count} LLMDeployments ({gpus_needed(count, pools)} of {capacity} GPUs)", flush=True)
            result: Result | FloorResult | None = None
            try:
                if args.floor:
                    result = run_floor(sandbox, count, pools, args)
                    report_floor(result)
                else:
                    result = run_one(sandbox, count, args)
                    if result is not None:
                        report(result, args.nodes, args)
            finally:
                clean_up(sandbox, count)
            if result is None:
                return 1
            results.append(result)
        print(json.dumps([r.__dict__ for r in results]))
        return 0 if all(r.ready == r.count for r in results) else 1
    finally:
        if not args.keep_sandbox:
            sandbox.down()


if __name__ == "__main__":
    sys.exit(main())
