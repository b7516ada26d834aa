"""Gateway overhead benchmark: direct to the vLLM simulator vs through argosy-gateway, side by side.

    .venv/bin/python tests/bench/bench_gateway.py                           # full run (~17 min)
    .venv/bin/python tests/bench/bench_gateway.py --duration 5 --warmup 1   # full, shorter points (~8 min)
    .venv/bin/python tests/bench/bench_gateway.py --quick                   # smoke run (~3 min)

Method (docs/benchmarks.md): the gateway (one worker) is pinned to CPU 1, the simulator and the
load generator (wrk with tests/bench/wrk_openai.lua) to CPU 0. For each workload (short
non-streaming chat completions; streaming 256-token chat completions sent in one write; the same
sent as one SSE event per token) and each concurrency, wrk first warms up, then measures for a
fixed duration, direct and through the gateway one after the other. Gateway CPU time comes from
/proc/<pid>/stat over the measured window only.

Peers, measured at the same loads in the same run when installed (--no-peers skips them): nginx as
a plain reverse proxy, and the Rust vllm-router (PyPI `vllm-router`) with its round_robin and its
default cache_aware policy, one router per simulator and policy. All are pinned to the gateway's
CPU. The verdicts at the end compare the gateway with vllm-router's round robin of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from argosy_sandbox.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
LUA_SCRIPT = Path(__file__).with_name("wrk_openai.lua")
STREAM_TOKENS = 256
SHORT_TOKENS = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets for one gateway worker (issue 4).
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_CONCURRENCY = 64
TARGET_REQUESTS_PER_S = 2000.0
TARGET_TOKENS_PER_S = 100_000.0
# Issue 13: side by side with vllm-router in the same run.
TARGET_ADDED_P99_C16_MS = 2.0
PEER_ROUND_ROBIN = "vllm-router (round_robin)"


@dataclass(frozen=True)
class Workload:
    name: str
    stream: bool
    model: str  # each model is served by its own simulator (see SIMULATED_MODELS)
    prompt: str
    max_tokens: int
    paced_rps: float  # offered rate of the extra paced point at c=64 (0: none)

    @property
    def body(self) -> str:
        request: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }
        if self.stream:
            request["stream"] = True
        return json.dumps(request)


# Model name -> the simulator's interval between tokens. 0: as fast as possible, a whole stream in
# one write. EVENTS_MODEL's simulator sends one SSE event per token, as a real vLLM does, so the
# gateway pays for every event instead of one read per stream.
MODEL = "bench-model"
EVENTS_MODEL = "bench-model-per-token"
EVENTS_ITL_MS = 2.0
SIMULATED_MODELS = {MODEL: 0.0, EVENTS_MODEL: EVENTS_ITL_MS}

WORKLOADS = (
    Workload("short", False, MODEL, "Say hello in a few words.", SHORT_TOKENS, 1000.0),
    Workload("stream256", True, MODEL, "Write a long story about a ship.", STREAM_TOKENS, 200.0),
    Workload("stream256-events", True, EVENTS_MODEL, "Write a long story about a ship.", STREAM_TOKENS, 0.0),
)


@dataclass
class Measurement:
    requests: int
    duration_s: float
    tokens: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    gateway_cpu_s: float | None = None
    gateway_cpu_busy_s: float | None = None  # everything that ran on the gateway's CPU meanwhile
    load_others_share: float | None = None  # share of the load CPU taken by other processes: noise

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_s_per_1k(self) -> float | None:
        if self.gateway_cpu_s is None or not self.requests:
            return None
        return self.gateway_cpu_s / self.requests * 1000

    @property
    def gateway_core_share(self) -> float | None:
        if self.gateway_cpu_s is None or not self.duration_s:
            return None
        return self.gateway_cpu_s / self.duration_s

    @property
    def others_share(self) -> float | None:
        """Share of the gateway's CPU taken by other processes (teammates' builds): noise."""
        if self.gateway_cpu_s is None or self.gateway_cpu_busy_s is None or not self.duration_s:
            return None
        return max(0.0, self.gateway_cpu_busy_s - self.gateway_cpu_s) / self.duration_s


@dataclass(frozen=True)
class Load:
    """Closed-loop wrk connections, optionally paced to an offered rate (requests/s over all connections)."""

    concurrency: int
    paced_rps: float | None = None

    @property
    def label(self) -> str:
        return f"{self.concurrency}" if not self.paced_rps else f"{self.concurrency} @{self.paced_rps:,.0f}/s"


@dataclass
class Point:
    workload: str
    load: Load
    direct: Measurement
    through: Measurement | None = None
    peers: dict[str, Measurement] = field(default_factory=dict)  # e.g. nginx, same load, same run

    @property
    def added_p50_ms(self) -> float | None:
        return None if self.through is None else self.through.p50_ms - self.direct.p50_ms

    @property
    def added_p99_ms(self) -> float | None:
        return None if self.through is None else self.through.p99_ms - self.direct.p99_ms


@dataclass
class Report:
    command: str
    started_utc: str
    load_before: str
    load_after: str = ""
    cpus: str = ""
    points: list[Point] = field(default_factory=list)


# -- processes -------------------------------------------------------------------------------------


# Niceness for every measured process (--nice): a negative value keeps a shared machine's other
# work (a teammate's build) from taking the measured CPUs; it needs root.
NICENESS = [0]


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A Popen preexec_fn that pins the child to `cpu` (None: no pinning) at the chosen niceness."""
    niceness = NICENESS[0]
    if cpu is None and not niceness:
        return None

    def prepare() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if niceness:
            os.nice(niceness)

    return prepare


def stop_children_on_sigterm() -> None:
    """A SIGTERM (``kill``, a CI timeout) ends the benchmark as an error would: every ``started``
    block's finally stops its process. The children run in sessions of their own, so without
    this they outlived a killed benchmark (a vllm-router left running for 40 minutes)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def started(name: str, argv: Sequence[str], cpu: int | None, env: dict[str, str], log: Path) -> Iterator[int]:
    """Run a child process for the duration of the block; yield its pid; stop it afterwards."""
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=pin_to(cpu),
        )
    try:
        yield process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.returncode not in (0, -signal.SIGTERM, None):
            print(f"note: {name} exited with {process.returncode}; log: {log}", file=sys.stderr)


def wait_until_ready(url: str, pid: int, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            break
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise SystemExit(f"{url} did not become ready within {timeout_s} s. Log tail:\n{tail}")


def process_tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (threads included)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total, stack = 0.0, [root_pid]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def cpu_busy_seconds(cpu: int | None) -> float | None:
    """Seconds CPU `cpu` has spent not idle since boot (from /proc/stat)."""
    if cpu is None:
        return None
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:9]]
            return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # minus idle and iowait
    return None


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


# -- peers ---------------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def nginx_config(workdir: Path, routes: dict[int, str]) -> Path:
    """A plain nginx reverse proxy as in PEERS.md: one worker, upstream keep-alive, no buffering.

    nginx cannot route on a JSON body, so each simulator gets its own listening port.
    """
    servers = "".join(
        f"""
    upstream sim{port} {{ server {upstream.removeprefix("http://")}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim{port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}"""
        for port, upstream in routes.items()
    )
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    config = workdir / "nginx.conf"
    config.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};{servers}
}}
"""
    )
    return config


# Both policies of vllm-router that a user would pick: round robin (its cheapest) and its default,
# cache_aware (a radix tree of request texts per worker).
VLLM_ROUTER_POLICIES = ("round_robin", "cache_aware")


def vllm_router_binary() -> str | None:
    """The vllm-router launcher installed next to this python (the venv), else the one on PATH."""
    beside = VENV_BIN / "vllm-router"
    return str(beside) if beside.exists() else shutil.which("vllm-router")


def vllm_router_argv(binary: str, port: int, metrics_port: int, worker_url: str, policy: str) -> list[str]:
    """One router in front of one simulator, as in PEERS.md.

    Its plain mode balances over its workers without looking at the model name (multi-model
    routing is its separate IGW mode), so each simulator gets its own router, as each gets its
    own nginx port.
    """
    return [
        binary,
        *("--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker_url),
        *("--policy", policy, "--log-level", "warning"),
        *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)),
    ]


# -- load generation ------------------------------------------------------------------------------


def check_once(url: str, workload: Workload) -> None:
    """One request before measuring: a 200 and, for streams, every token and the final [DONE]."""
    request = urllib.request.Request(
        url, data=workload.body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{url}: HTTP {err.code} before measuring: {err.read()[:500]!r}") from None
    if workload.stream:
        tokens = body.count('"delta":{"content":')
        if tokens != STREAM_TOKENS or not body.endswith("data: [DONE]\n\n"):
            raise SystemExit(f"{url}: expected a {STREAM_TOKENS}-token stream, got {tokens} tokens")
    elif json.loads(body)["usage"]["completion_tokens"] != SHORT_TOKENS:
        raise SystemExit(f"{url}: unexpected reply {body[:300]}")


def run_wrk(url: str, workload: Workload, load: Load, duration_ms: int, cpu: int | None) -> Measurement:
    # A paced load: each connection waits concurrency/rate seconds after each response.
    delay_ms = round(load.concurrency * 1000 / load.paced_rps) if load.paced_rps else 0
    env = dict(
        os.environ,
        ARGOSY_BENCH_BODY=workload.body,
        ARGOSY_BENCH_STREAM="1" if workload.stream else "0",
        ARGOSY_BENCH_TOKENS=str(STREAM_TOKENS),
        ARGOSY_BENCH_DELAY_MS=str(delay_ms),
    )
    argv = [
        "wrk",
        "-t1",
        f"-c{load.concurrency}",
        f"-d{max(1, round(duration_ms / 1000))}s",  # wrk takes whole seconds
        "--timeout",
        "30s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    result = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=duration_ms / 1000 + 60,
        preexec_fn=pin_to(cpu),
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("ARGOSY_RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(line.removeprefix("ARGOSY_RESULT "))
    errors = data["errors"] + data["non_2xx"] + data["incomplete"]
    return Measurement(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        tokens=data["tokens"] if workload.stream else data["requests"] * SHORT_TOKENS,
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def measure(
    url: str,
    workload: Workload,
    load: Load,
    warmup_ms: int,
    duration_ms: int,
    load_cpu: int | None,
    gateway_pid: int | None,
    gateway_cpu: int | None = None,
    sim_pids: Sequence[int] = (),
) -> Measurement:
    if warmup_ms:
        run_wrk(url, workload, load, warmup_ms, load_cpu)

    def load_side_cpu() -> float:  # the simulators + every finished wrk (this driver is idle)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(process_tree_cpu_seconds(pid) for pid in sim_pids) + children.ru_utime + children.ru_stime

    cpu_before = process_tree_cpu_seconds(gateway_pid) if gateway_pid else None
    busy_before = cpu_busy_seconds(gateway_cpu) if gateway_pid else None
    load_busy_before, load_own_before = cpu_busy_seconds(load_cpu), load_side_cpu()
    measurement = run_wrk(url, workload, load, duration_ms, load_cpu)
    load_busy_after, load_own_after = cpu_busy_seconds(load_cpu), load_side_cpu()
    if gateway_pid and cpu_before is not None:
        measurement.gateway_cpu_s = process_tree_cpu_seconds(gateway_pid) - cpu_before
    busy_after = cpu_busy_seconds(gateway_cpu) if gateway_pid else None
    if busy_before is not None and busy_after is not None:
        measurement.gateway_cpu_busy_s = busy_after - busy_before
    if load_busy_before is not None and load_busy_after is not None and measurement.duration_s:
        others = (load_busy_after - load_busy_before) - (load_own_after - load_own_before)
        measurement.load_others_share = max(0.0, others) / measurement.duration_s
    return measurement


# -- profiling ------------------------------------------------------------------------------------

# Where a sample's leaf frame lives -> the component it is charged to (first match wins).
COMPONENTS = (
    ("argosy_gateway/", "argosy_gateway (own code)"),
    ("aiohttp/", "aiohttp (upstream client)"),
    ("uvicorn/", "uvicorn + httptools (client-facing HTTP)"),
    ("starlette/", "starlette/fastapi (routing)"),
    ("fastapi/", "starlette/fastapi (routing)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("json/", "json"),
    ("yarl/", "yarl/multidict (URLs, headers)"),
    ("multidict/", "yarl/multidict (URLs, headers)"),
    ("asyncio/", "asyncio + uvloop (event loop, sockets)"),
    ("uvloop/", "asyncio + uvloop (event loop, sockets)"),
)


def profile_gateway(
    url: str, workload: Workload, load: Load, seconds: int, load_cpu: int | None, gateway_pid: int, out: Path
) -> str:
    """Sample the gateway with py-spy under load (a separate run: it does not touch the measurements)."""
    py_spy = VENV_BIN / "py-spy"
    if not py_spy.exists():
        return "(py-spy is not installed in the venv: no profile)"
    with ThreadPoolExecutor(max_workers=1) as pool:
        wrk = pool.submit(run_wrk, url, workload, load, (seconds + 2) * 1000, load_cpu)
        time.sleep(1)
        subprocess.run(
            [str(py_spy), "record", "-p", str(gateway_pid), "-d", str(seconds), "-r", "250", "-f", "raw",
             "-o", str(out), "--nonblocking"],
            capture_output=True,
            check=False,
            preexec_fn=pin_to(load_cpu),
        )  # fmt: skip
        measurement = wrk.result()
    if not out.exists():
        return "(py-spy could not sample the gateway; it needs ptrace permission)"
    return (
        f"{workload.name} c={load.label}, {measurement.requests_per_s:,.0f} req/s while sampled\n"
        + summarize_profile(out.read_text())
    )


def _function(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (file.py)': samples grouped by function, not by line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1].rstrip(')')})" if where else name


def summarize_profile(collapsed: str, top: int = 12) -> str:
    """Self time by component and by function, and the gateway's own functions by inclusive time."""
    by_component: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        component = next((name for marker, name in COMPONENTS if marker in leaf), "other (C code, stdlib)")
        by_component[component] += count
        by_function[_function(leaf)] += count
        for function in {_function(f) for f in frames if "argosy_gateway/" in f}:
            inclusive[function] += count
    if not total:
        return "(no samples)"
    lines = [f"  self time by component ({total} samples):"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in by_component.most_common()]
    lines.append("  self time by function:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in by_function.most_common(top)]
    lines.append("  argosy_gateway functions, inclusive (callees included):")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


# -- reporting ------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.0f}%"


def render_table(report: Report) -> str:
    header = (
        "| workload | c | p50 direct | p50 via | p99 direct | p99 via | added p50 | added p99 | "
        "req/s direct | req/s via | tokens/s direct | tokens/s via | gw CPU s/1k req | gw core | "
        "others on gw CPU | others on load CPU | errors |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for point in report.points:
        d, t = point.direct, point.through
        core = t.gateway_core_share if t else None
        cells = [
            point.workload,
            point.load.label,
            f"{_f(d.p50_ms)} ms",
            f"{_f(t.p50_ms if t else None)} ms",
            f"{_f(d.p99_ms)} ms",
            f"{_f(t.p99_ms if t else None)} ms",
            f"{_f(point.added_p50_ms)} ms",
            f"{_f(point.added_p99_ms)} ms",
            _f(d.requests_per_s, 0),
            _f(t.requests_per_s if t else None, 0),
            _f(d.tokens_per_s, 0),
            _f(t.tokens_per_s if t else None, 0),
            _f(t.cpu_s_per_1k if t else None, 3),
            f"{_f(core * 100 if core is not None else None, 0)}%",
            f"{_f(t.others_share * 100 if t and t.others_share is not None else None, 0)}%",
            f"{_pct(d.load_others_share)}/{_pct(t.load_others_share if t else None)}",
            f"{d.errors}/{t.errors if t else 0}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_peer_table(report: Report) -> str:
    """The same loads through each peer, next to the gateway's figures from the same run."""
    header = (
        "| workload | c | proxy | p50 | p99 | added p50 | added p99 | req/s | tokens/s | CPU s/1k req | "
        "proxy core | others on proxy CPU | others on load CPU | errors |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for point in report.points:
        rows = ([("argosy-gateway", point.through)] if point.through else []) + list(point.peers.items())
        for name, m in rows:
            core, others = m.gateway_core_share, m.others_share
            cells = [
                point.workload,
                point.load.label,
                name,
                f"{_f(m.p50_ms)} ms",
                f"{_f(m.p99_ms)} ms",
                f"{_f(m.p50_ms - point.direct.p50_ms)} ms",
                f"{_f(m.p99_ms - point.direct.p99_ms)} ms",
                _f(m.requests_per_s, 0),
                _f(m.tokens_per_s, 0),
                _f(m.cpu_s_per_1k, 3),
                f"{_f(core * 100 if core is not None else None, 0)}%",
                f"{_f(others * 100 if others is not None else None, 0)}%",
                _pct(m.load_others_share),
                str(m.errors),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(report: Report) -> list[str]:
    through = [p for p in report.points if p.through is not None]
    if not through:
        return ["(no gateway run: targets not evaluated)"]

    def mark(ok: bool) -> str:
        return "MET " if ok else "MISS"

    def best(workload: str, direct: bool = False) -> Measurement | None:
        runs = [p.direct if direct else p.through for p in through if p.workload == workload]
        return max((m for m in runs if m is not None), key=lambda m: m.requests_per_s, default=None)

    lines: list[str] = []
    lines += peer_verdicts(report, mark)
    for point in through:
        if point.load.concurrency == TARGET_CONCURRENCY:
            p50, p99 = point.added_p50_ms or 0.0, point.added_p99_ms or 0.0
            lines.append(
                f"{mark(p50 <= TARGET_ADDED_P50_MS and p99 <= TARGET_ADDED_P99_MS)} {point.workload} "
                f"c={point.load.label}: added p50 {p50:.2f} ms (target ≤ {TARGET_ADDED_P50_MS}), "
                f"added p99 {p99:.2f} ms (target ≤ {TARGET_ADDED_P99_MS})"
            )
    if (short := best("short")) is not None:
        lines.append(
            f"{mark(short.requests_per_s >= TARGET_REQUESTS_PER_S)} non-streaming throughput via gateway: "
            f"{short.requests_per_s:,.0f} req/s (target ≥ {TARGET_REQUESTS_PER_S:,.0f})"
        )
    for workload in ("stream256", "stream256-events"):
        if (stream := best(workload)) is not None:
            lines.append(
                f"{mark(stream.tokens_per_s >= TARGET_TOKENS_PER_S)} streamed tokens via gateway ({workload}): "
                f"{stream.tokens_per_s:,.0f} tokens/s (target ≥ {TARGET_TOKENS_PER_S:,.0f})"
            )
    for point in through:
        if point.load == Load(TARGET_CONCURRENCY) and point.through and point.through.cpu_s_per_1k:
            capacity = 1000 / point.through.cpu_s_per_1k
            tokens = f" = {capacity * STREAM_TOKENS:,.0f} tokens/s" if point.workload.startswith("stream") else ""
            lines.append(
                f"CPU-bound capacity of one gateway core ({point.workload}, "
                f"{point.through.cpu_s_per_1k:.3f} CPU s per 1,000 requests at c={TARGET_CONCURRENCY}): "
                f"{capacity:,.0f} req/s{tokens}"
            )
    for workload in dict.fromkeys(p.workload for p in through):
        direct, via = best(workload, direct=True), best(workload)
        if direct is not None and via is not None and via.requests_per_s:
            lines.append(
                f"load generator check ({workload}): wrk + simulator on one core reach "
                f"{direct.requests_per_s:,.0f} req/s direct, {direct.requests_per_s / via.requests_per_s:.1f}x "
                f"the gateway's best {via.requests_per_s:,.0f} req/s"
            )
    return lines


def peer_verdicts(report: Report, mark: Callable[[bool], str]) -> list[str]:
    """Issue 13's targets: the gateway against vllm-router's round robin, in the same run."""
    lines: list[str] = []
    for point in report.points:
        gateway, peer = point.through, point.peers.get(PEER_ROUND_ROBIN)
        if gateway is None or point.load.paced_rps:
            continue
        c = point.load.concurrency
        if point.workload == "short" and peer is not None and gateway.cpu_s_per_1k and peer.cpu_s_per_1k:
            lines.append(
                f"{mark(gateway.cpu_s_per_1k <= peer.cpu_s_per_1k)} CPU per short request, c={c}: "
                f"{gateway.cpu_s_per_1k:.3f} ms vs {PEER_ROUND_ROBIN} {peer.cpu_s_per_1k:.3f} ms "
                f"({gateway.cpu_s_per_1k / peer.cpu_s_per_1k:.2f}x)"
            )
        if point.workload == "short" and c == 16 and point.added_p99_ms is not None:
            lines.append(
                f"{mark(point.added_p99_ms <= TARGET_ADDED_P99_C16_MS)} short c=16: added p99 "
                f"{point.added_p99_ms:.2f} ms (target ≤ {TARGET_ADDED_P99_C16_MS})"
            )
        if point.workload == "short" and c == TARGET_CONCURRENCY and peer and point.added_p50_ms is not None:
            peer_added = peer.p50_ms - point.direct.p50_ms
            lines.append(
                f"{mark(point.added_p50_ms <= peer_added)} short c={c}: added p50 {point.added_p50_ms:.2f} ms "
                f"vs {PEER_ROUND_ROBIN} {peer_added:.2f} ms"
            )
        if point.workload == "stream256-events" and peer is not None and gateway.cpu_s_per_1k and peer.cpu_s_per_1k:
            # One SSE event per token: CPU per stream / events per stream (the role event rides
            # with the first token, the usage-less end with [DONE]).
            ours, theirs = gateway.cpu_s_per_1k / STREAM_TOKENS, peer.cpu_s_per_1k / STREAM_TOKENS
            lines.append(
                f"{mark(ours <= theirs)} CPU per streamed SSE event (one event per token), c={c}: "
                f"{ours * 1000:.1f} µs vs {PEER_ROUND_ROBIN} {theirs * 1000:.1f} µs ({ours / theirs:.2f}x)"
            )
    return lines


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per point after 1 s warm-up")
    parser.add_argument("--duration", type=float, default=10.0, help="measured whole seconds per point (default 10)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up whole seconds per point, 0 for none (default 2)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--no-paced", action="store_true", help="skip the paced points (c=64 below saturation)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every point N times, direct and each proxy interleaved, and report the median of each figure",
    )
    parser.add_argument("--workload", choices=[w.name for w in WORKLOADS], nargs="+", default=None)
    parser.add_argument("--no-gateway", action="store_true", help="measure the simulator alone")
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the peers (nginx, vllm-router, when installed) measured in the same run",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=["nginx", *VLLM_ROUTER_POLICIES],
        default=["nginx", *VLLM_ROUTER_POLICIES],
        help="which peers to measure (default all: nginx and vllm-router's policies); --no-peers for none",
    )
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway, e.g. ARGOSY_GATEWAY_RETRIES=0 (repeatable)",
    )
    parser.add_argument("--gateway-cpu", type=int, default=1, help="CPU for the gateway (default 1)")
    parser.add_argument("--load-cpu", type=int, default=0, help="CPU for simulator + wrk (default 0)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="after measuring, sample the gateway with py-spy for this long at c=64 (each workload)",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        help="keep py-spy's raw (collapsed) profiles here, one file per workload, for a closer look",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the simulator, gateway and wrk (negative, as root: less noise from other work)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.duration, args.warmup = 1.0, 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_children_on_sigterm()
    if shutil.which("wrk") is None:
        print("bench-gateway needs wrk (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    usable = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and {args.gateway_cpu, args.load_cpu} <= set(usable) and len(usable) >= 2
    gateway_cpu = args.gateway_cpu if pin else None
    load_cpu = args.load_cpu if pin else None
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # this driver is idle while wrk runs; keep it off the gateway's CPU
    NICENESS[0] = args.nice
    workloads = [w for w in WORKLOADS if args.workload is None or w.name in args.workload]
    duration_ms, warmup_ms = int(args.duration * 1000), int(args.warmup * 1000)

    report = Report(
        command=shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        started_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_before=load_average(),
        cpus=(
            f"{os.cpu_count()} CPUs; gateway on CPU {gateway_cpu}, simulator + wrk on CPU {load_cpu}"
            if pin
            else f"{os.cpu_count()} CPUs; not pinned"
        )
        + (f"; niceness {args.nice}" if args.nice else "")
        + "".join(f"; gateway {setting}" for setting in args.gateway_env)
        + (f"; each figure the median of {args.repeat} interleaved runs" if args.repeat > 1 else ""),
    )
    print(f"# bench-gateway {report.started_utc}; load average {report.load_before}; {report.cpus}", flush=True)

    env = dict(os.environ)
    profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="argosy-bench-") as tmp:
        tmpdir = Path(tmp)
        try:
            with contextlib.ExitStack() as stack:
                sim_urls: dict[str, str] = {}
                sim_pids: list[int] = []
                for model in dict.fromkeys(w.model for w in workloads):
                    sim_port = free_port()
                    sim_urls[model] = f"http://127.0.0.1:{sim_port}"
                    sim_argv = [
                        str(VENV_BIN / "argosy-vllm-sim"),
                        *("--model", model, "--host", "127.0.0.1", "--port", str(sim_port)),
                        *("--ttft-ms", "0", "--itl-ms", str(SIMULATED_MODELS[model]), "--max-num-seqs", "4096"),
                    ]
                    sim_log = tmpdir / f"sim-{model}.log"
                    sim_pid = stack.enter_context(started(f"simulator {model}", sim_argv, load_cpu, env, sim_log))
                    sim_pids.append(sim_pid)
                    wait_until_ready(f"{sim_urls[model]}/health", sim_pid, sim_log)
                gateway_pid: int | None = None
                gateway_url = ""
                if not args.no_gateway:
                    gateway_port = free_port()
                    gateway_url = f"http://127.0.0.1:{gateway_port}"
                    models_file = tmpdir / "models.yaml"
                    models_file.write_text(
                        "models:\n"
                        + "".join(f"  - name: {model}\n    endpoints: [{url}]\n" for model, url in sim_urls.items())
                    )
                    gateway_env = dict(
                        env,
                        ARGOSY_GATEWAY_DISCOVERY="static",
                        ARGOSY_GATEWAY_STATIC_CONFIG=str(models_file),
                        ARGOSY_GATEWAY_LOG_LEVEL="WARNING",
                    )
                    for setting in args.gateway_env:
                        name, _, value = setting.partition("=")
                        gateway_env[name] = value
                    gateway_argv = [
                        str(VENV_BIN / "argosy-gateway"),
                        *("--host", "127.0.0.1", "--port", str(gateway_port)),
                        *("--workers", str(args.gateway_workers)),
                    ]
                    gateway_log = tmpdir / "gateway.log"
                    gateway_pid = stack.enter_context(
                        started("gateway", gateway_argv, gateway_cpu, gateway_env, gateway_log)
                    )
                    wait_until_ready(f"{gateway_url}/readyz", gateway_pid, gateway_log)

                nginx_pid: int | None = None
                nginx_urls: dict[str, str] = {}
                nginx = None if args.no_peers or "nginx" not in args.peers else nginx_binary()
                if nginx is not None:
                    ports = {model: free_port() for model in sim_urls}
                    nginx_urls = {model: f"http://127.0.0.1:{port}" for model, port in ports.items()}
                    config = nginx_config(tmpdir, {ports[m]: url for m, url in sim_urls.items()})
                    nginx_argv = [nginx, "-p", str(tmpdir), "-e", str(tmpdir / "nginx-error.log"), "-c", str(config)]
                    nginx_log = tmpdir / "nginx.log"
                    nginx_pid = stack.enter_context(started("nginx", nginx_argv, gateway_cpu, env, nginx_log))
                    for url in nginx_urls.values():
                        wait_until_ready(f"{url}/health", nginx_pid, nginx_log)
                elif not args.no_peers and "nginx" in args.peers:
                    print(
                        "note: nginx is not installed; the nginx peer is skipped (Debian: apt-get install nginx-light)"
                    )

                # (policy, model) -> the vllm-router in front of that model's simulator
                router_pids: dict[tuple[str, str], int] = {}
                router_urls: dict[tuple[str, str], str] = {}
                policies = [p for p in VLLM_ROUTER_POLICIES if p in args.peers]
                router = None if args.no_peers or not policies else vllm_router_binary()
                if router is not None:
                    for policy in policies:
                        for model, sim_url in sim_urls.items():
                            port, metrics_port = free_port(), free_port()
                            url = router_urls[policy, model] = f"http://127.0.0.1:{port}"
                            router_log = tmpdir / f"vllm-router-{policy}-{model}.log"
                            pid = router_pids[policy, model] = stack.enter_context(
                                started(
                                    f"vllm-router {policy} {model}",
                                    vllm_router_argv(router, port, metrics_port, sim_url, policy),
                                    gateway_cpu,
                                    env,
                                    router_log,
                                )
                            )
                            wait_until_ready(f"{url}/readiness", pid, router_log)
                elif not args.no_peers and policies:
                    print(
                        "note: vllm-router is not installed; the vllm-router peer is skipped "
                        "(python3 -m uv pip install --python .venv/bin/python vllm-router)"
                    )

                runs: list[Point] = []  # the repeats of the current point
                for workload in workloads:
                    sim_url = sim_urls[workload.model]
                    check_once(f"{sim_url}/v1/chat/completions", workload)
                    if gateway_pid:
                        check_once(f"{gateway_url}/v1/chat/completions", workload)
                    for (_, model), url in router_urls.items():
                        if model == workload.model:
                            check_once(f"{url}/v1/chat/completions", workload)
                    loads = [Load(c) for c in args.concurrency]
                    if workload.paced_rps and not args.no_paced:
                        loads.append(Load(TARGET_CONCURRENCY, workload.paced_rps))
                    for load, _ in ((load, rep) for load in loads for rep in range(args.repeat)):
                        direct = measure(
                            f"{sim_url}/v1/chat/completions",
                            workload,
                            load,
                            warmup_ms,
                            duration_ms,
                            load_cpu,
                            None,
                            None,
                            sim_pids,
                        )
                        point = Point(workload.name, load, direct)
                        if gateway_pid:
                            point.through = measure(
                                f"{gateway_url}/v1/chat/completions",
                                workload,
                                load,
                                warmup_ms,
                                duration_ms,
                                load_cpu,
                                gateway_pid,
                                gateway_cpu,
                                sim_pids,
                            )
                        if nginx_pid:
                            point.peers["nginx"] = measure(
                                f"{nginx_urls[workload.model]}/v1/chat/completions",
                                workload,
                                load,
                                warmup_ms,
                                duration_ms,
                                load_cpu,
                                nginx_pid,
                                gateway_cpu,
                                sim_pids,
                            )
                        for (policy, model), url in router_urls.items():
                            if model == workload.model:
                                point.peers[f"vllm-router ({policy})"] = measure(
                                    f"{url}/v1/chat/completions",
                                    workload,
                                    load,
                                    warmup_ms,
                                    duration_ms,
                                    load_cpu,
                                    router_pids[policy, model],
                                    gateway_cpu,
                                    sim_pids,
                                )
                        runs.append(point)
                        print(_progress(point), flush=True)
                        if len(runs) == args.repeat:
                            report.points.append(median_point(runs))
                            runs = []
                if gateway_pid and args.profile:
                    for workload in workloads:
                        profiles.append(
                            profile_gateway(
                                f"{gateway_url}/v1/chat/completions",
                                workload,
                                Load(TARGET_CONCURRENCY),
                                args.profile,
                                load_cpu,
                                gateway_pid,
                                (args.profile_dir or tmpdir) / f"profile-{workload.name}.txt",
                            )
                        )
        except SystemExit:
            for log in sorted(tmpdir.glob("*.log")):
                tail = log.read_text(errors="replace")[-2000:].strip()
                if tail:
                    print(f"--- {log.name} (last lines)\n{tail}", file=sys.stderr)
            raise
    report.load_after = load_average()

    print()
    print(render_table(report))
    if any(point.peers for point in report.points):
        print()
        print(render_peer_table(report))
    print()
    for line in verdicts(report):
        print(line)
    for profile in profiles:
        print(f"\ngateway profile (py-spy): {profile}")
    print(f"\nload average before {report.load_before}, after {report.load_after}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


def median_measurement(runs: Sequence[Measurement]) -> Measurement:
    """Each figure the median of its runs (one run: itself)."""
    if len(runs) == 1:
        return runs[0]
    values: dict[str, object] = {}
    for f in fields(Measurement):
        got = [getattr(m, f.name) for m in runs if getattr(m, f.name) is not None]
        values[f.name] = statistics.median(got) if got else None
    values["errors"] = sum(m.errors for m in runs)  # every error of every run counts
    # CPU per request: the median of the ratios, not a ratio of medians.
    per_request = [m.gateway_cpu_s / m.requests for m in runs if m.gateway_cpu_s is not None and m.requests]
    if per_request:
        values["gateway_cpu_s"] = statistics.median(per_request) * float(values["requests"])  # type: ignore[arg-type]
    return Measurement(**values)  # type: ignore[arg-type]


def median_point(runs: Sequence[Point]) -> Point:
    """The repeats of one point (interleaved: direct, gateway, peers, then again) as one, by medians."""
    first = runs[0]
    point = Point(first.workload, first.load, median_measurement([r.direct for r in runs]))
    if first.through is not None:
        point.through = median_measurement([r.through for r in runs if r.through is not None])
    for name in first.peers:
        point.peers[name] = median_measurement([r.peers[name] for r in runs if name in r.peers])
    return point


def _progress(point: Point) -> str:
    d, t = point.direct, point.through
    text = (
        f"{point.workload:>9} c={point.load.label:<11} "
        f"direct p50 {d.p50_ms:7.2f} ms {d.requests_per_s:8,.0f} req/s {d.tokens_per_s:10,.0f} tok/s"
    )
    if t is not None:
        text += (
            f" | via p50 {t.p50_ms:7.2f} ms p99 {t.p99_ms:7.2f} ms {t.requests_per_s:8,.0f} req/s"
            f" {t.tokens_per_s:10,.0f} tok/s | added p50 {point.added_p50_ms:+.2f} ms"
        )
    for name, m in point.peers.items():
        text += f" | {name} p50 {m.p50_ms:7.2f} ms {m.requests_per_s:8,.0f} req/s"
    return text


if __name__ == "__main__":
    sys.exit(main())
