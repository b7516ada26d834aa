"""Routing quality: the same multi-turn shared-prefix workload on the same simulated replicas,
routed by each policy in turn, side by side in one run.

    .venv/bin/python tests/bench/bench_routing.py             # 200 conversations x 5 turns (~4 min)
    .venv/bin/python tests/bench/bench_routing.py --quick     # 60 conversations (~1.5 min)

Replicas: `--replicas` vLLM simulators (tests/testkit/argosy_vllm_sim) with a prefix cache
(`--kv-cache-tokens` each), a batch limit with a waiting queue, time to first token that grows
with uncached prompt tokens, and --serial-prefill (uncached tokens of concurrent requests queue
on one compute lane, as on a GPU). Each policy gets fresh simulators (cold caches).

Workload (seeded, the same for every policy): conversations start as a Poisson process; each
picks one of `--system-prompts` shared system prompts and sends `--turns` turns, each turn's
messages being the whole conversation so far (the replies really returned) plus a new user
message, after an exponential think time. The offered rate is `--load` times the estimated
capacity of the replicas when only the system prompts are cached (what a cache-blind balancer
gets): replicas / (mean uncached prompt tokens x prefill time per token).

Policies: round robin (what a Kubernetes Service gives), least outstanding requests and prefix
affinity through argosy-gateway (static routes), and vllm-router's cache_aware policy (PyPI
`vllm-router`, when installed) on the same simulators. Prefix affinity runs with and without
the pods' own load (their /metrics, the default; ARGOSY_GATEWAY_POD_METRICS_SECONDS=0 turns it
off), with one gateway worker and with two (two processes behind one port: like two gateway
replicas, each sees only part of every pod's load). `--policy` picks rows by their key
(POLICIES below).

Reported per policy: time to first token (first body bytes of the stream) and end-to-end p50 /
p99, completed requests per second, and the prefix-cache hit rate from the simulators' own
/metrics (vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, in tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from argosy_sandbox.cluster import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import (
    VENV_BIN,
    load_average,
    started,
    stop_children_on_sigterm,
    vllm_router_binary,
    wait_until_ready,
)

MODEL = "bench-routing"
CHARS_PER_TOKEN = 4  # the simulator's tokenizer
WORDS = [
    "gpu",
    "cluster",
    "model",
    "replica",
    "token",
    "cache",
    "prefix",
    "queue",
    "batch",
    "tensor",
    "pipeline",
    "kernel",
    "memory",
    "latency",
    "throughput",
    "request",
    "stream",
    "deploy",
    "scale",
    "node",
    "pod",
    "gateway",
    "route",
    "policy",
    "metric",
    "trace",
    "budget",
]


@dataclass(frozen=True)
class Setup:
    replicas: int
    conversations: int
    turns: int
    system_prompts: int
    system_tokens: int
    user_tokens: int
    max_tokens: int
    think_s: float
    load: float
    prefill_ms_per_token: float
    itl_ms: float
    ttft_ms: float
    max_num_seqs: int
    kv_cache_tokens: int
    seed: int
    others: int = 0


@dataclass
class Result:
    policy: str
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    hit_tokens: float = 0.0
    query_tokens: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def throughput(self) -> float:
        return len(self.e2e_s) / self.wall_s if self.wall_s else 0.0


def words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


@dataclass(frozen=True)
class Conversation:
    start_s: float
    system: str
    users: tuple[str, ...]
    thinks: tuple[float, ...]


def build_workload(setup: Setup, rate_rps: float) -> list[Conversation]:
    rng = random.Random(setup.seed)
    systems = [
        f"System prompt {i}. " + words(rng, setup.system_tokens * CHARS_PER_TOKEN) for i in range(setup.system_prompts)
    ]
    conversation_rate = rate_rps / setup.turns
    now = 0.0
    conversations = []
    for index in range(setup.conversations):
        now += rng.expovariate(conversation_rate)
        users = tuple(
            f"Question {index}.{turn}: " + words(rng, setup.user_tokens * CHARS_PER_TOKEN)
            for turn in range(setup.turns)
        )
        thinks = tuple(rng.expovariate(1 / setup.think_s) for _ in range(setup.turns))
        conversations.append(Conversation(now, rng.choice(systems), users, thinks))
    return conversations


def estimated_capacity_rps(setup: Setup, reply_chars: int) -> float:
    """Requests/s the replicas sustain when only the system prompts are cached.

    The uncached part of turn k (1-based) is the conversation history, k-1 user messages and
    replies, plus the new user message; each uncached token costs prefill time on the replica's
    one compute lane. The batch limit is checked too (it is rarely the bound here).
    """
    user_chars = setup.user_tokens * CHARS_PER_TOKEN + 16
    uncached_tokens = statistics.mean(
        ((k - 1) * (user_chars + reply_chars) + user_chars) / CHARS_PER_TOKEN for k in range(1, setup.turns + 1)
    )
    lane_s = uncached_tokens * setup.prefill_ms_per_token / 1000 + 1e-9
    hold_s = (setup.ttft_ms + uncached_tokens * setup.prefill_ms_per_token + setup.itl_ms * setup.max_tokens) / 1000
    return setup.replicas * min(1 / lane_s, setup.max_num_seqs / hold_s)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        values[name] = sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return values


async def run_conversation(
    http: aiohttp.ClientSession, url: str, conversation: Conversation, setup: Setup, t0: float, result: Result
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + conversation.start_s - loop.time()))
    messages: list[dict[str, str]] = [{"role": "system", "content": conversation.system}]
    for turn, user in enumerate(conversation.users):
        messages.append({"role": "user", "content": user})
        body = {"model": MODEL, "messages": messages, "max_tokens": setup.max_tokens, "stream": True}
        sent = loop.time()
        first: float | None = None
        chunks: list[bytes] = []
        try:
            async with http.post(url, json=body) as response:
                if response.status != 200:
                    result.errors += 1
                    return
                while chunk := await response.content.readany():
                    if first is None:
                        first = loop.time()
                    chunks.append(chunk)
        except (aiohttp.ClientError, OSError):
            result.errors += 1
            return
        done = loop.time()
        text = b"".join(chunks).decode()
        if not text.endswith("data: [DONE]\n\n") or first is None:
            result.errors += 1
            return
        reply = []
        for event in text.split("\n\n"):
            if event.startswith("data: {"):
                for choice in json.loads(event[6:]).get("choices", ()):
                    reply.append((choice.get("delta") or {}).get("content") or "")
        result.ttft_s.append(first - sent)
        result.e2e_s.append(done - sent)
        messages.append({"role": "assistant", "content": "".join(reply)})
        await asyncio.sleep(conversation.thinks[turn])


async def keep_busy(http: aiohttp.ClientSession, url: str) -> None:
    """Another client of one replica (a batch job, another gateway replica): one long stream after another."""
    body = {"model": MODEL, "prompt": "batch job", "max_tokens": 256, "stream": True}
    while True:
        try:
            async with http.post(f"{url}/v1/completions", json=body) as response:
                await response.read()
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)


async def drive(
    url: str, workload: list[Conversation], setup: Setup, result: Result, others_url: str = "", others: int = 0
) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        busy = [asyncio.create_task(keep_busy(http, others_url)) for _ in range(others)]
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        try:
            await asyncio.gather(*(run_conversation(http, url, c, setup, t0, result) for c in workload))
        finally:
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        result.wall_s = loop.time() - t0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulator_argv(setup: Setup, port: int) -> list[str]:
    return [
        str(VENV_BIN / "argosy-vllm-sim"),
        *("--model", MODEL, "--host", "127.0.0.1", "--port", str(port)),
        *("--ttft-ms", str(setup.ttft_ms), "--itl-ms", str(setup.itl_ms)),
        *("--prefill-ms-per-token", str(setup.prefill_ms_per_token), "--serial-prefill"),
        *("--max-num-seqs", str(setup.max_num_seqs), "--kv-cache-tokens", str(setup.kv_cache_tokens)),
    ]


def measure_reply_chars(setup: Setup, tmpdir: Path) -> int:
    """The simulator's reply length for max_tokens (its words differ per replica; this is the mean)."""
    port = free_port()
    log = tmpdir / "sim-probe.log"
    with started("simulator probe", simulator_argv(setup, port), None, dict(os.environ), log) as pid:
        wait_until_ready(f"http://127.0.0.1:{port}/health", pid, log)
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": setup.max_tokens}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return len(json.loads(response.read())["choices"][0]["message"]["content"])


def run_policy(
    name: str,
    kind: str,
    policy: str,
    setup: Setup,
    workload: list[Conversation],
    tmpdir: Path,
    workers: int = 1,
    settings: dict[str, str] | None = None,
) -> Result | None:
    env = dict(os.environ)
    result = Result(name)
    with contextlib.ExitStack() as stack:
        sim_urls = []
        for index in range(setup.replicas):
            port = free_port()
            log = tmpdir / f"sim-{policy}-{index}.log"
            pid = stack.enter_context(started(f"simulator {index}", simulator_argv(setup, port), None, env, log))
            sim_urls.append(f"http://127.0.0.1:{port}")
            wait_until_ready(f"{sim_urls[-1]}/health", pid, log)
        port = free_port()
        front = f"http://127.0.0.1:{port}"
        log = tmpdir / f"front-{policy}.log"
        if kind == "gateway":
            routes = tmpdir / f"routes-{policy}.yaml"
            routes.write_text(
                f"models:\n  - name: {MODEL}\n    policy: {policy}\n    endpoints: [{', '.join(sim_urls)}]\n"
            )
            gateway_env = dict(
                env,
                ARGOSY_GATEWAY_DISCOVERY="static",
                ARGOSY_GATEWAY_STATIC_CONFIG=str(routes),
                ARGOSY_GATEWAY_LOG_LEVEL="WARNING",
                **(settings or {}),
            )
            argv = [
                *(str(VENV_BIN / "argosy-gateway"), "--host", "127.0.0.1", "--port", str(port)),
                *("--workers", str(workers)),
            ]
            pid = stack.enter_context(started("gateway", argv, None, gateway_env, log))
            wait_until_ready(f"{front}/readyz", pid, log)
        else:
            router = vllm_router_binary()
            if router is None:
                print(f"note: vllm-router is not installed; {name} is skipped", flush=True)
                return None
            argv = [
                router,
                *("--host", "127.0.0.1", "--port", str(port), "--worker-urls", *sim_urls),
                *("--policy", policy, "--log-level", "warning"),
                *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())),
            ]
            pid = stack.enter_context(started("vllm-router", argv, None, env, log))
            wait_until_ready(f"{front}/readiness", pid, log)
        before = [scrape(u) for u in sim_urls]
        asyncio.run(drive(f"{front}/v1/chat/completions", workload, setup, result, sim_urls[0], setup.others))
        after = [scrape(u) for u in sim_urls]
    for b, a in zip(before, after, strict=True):
        result.hit_tokens += a["vllm:prefix_cache_hits_total"] - b["vllm:prefix_cache_hits_total"]
        result.query_tokens += a["vllm:prefix_cache_queries_total"] - b["vllm:prefix_cache_queries_total"]
    return result


def render(results: list[Result]) -> str:
    header = (
        "| policy | TTFT p50 | TTFT p99 | end-to-end p50 | end-to-end p99 | requests/s | prefix-cache hit rate | "
        "TTFT p50 vs round robin | errors |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    baseline = percentile(results[0].ttft_s, 0.5) if results else float("nan")
    for r in results:
        p50 = percentile(r.ttft_s, 0.5)
        cells = [
            r.policy,
            f"{p50 * 1000:,.0f} ms",
            f"{percentile(r.ttft_s, 0.99) * 1000:,.0f} ms",
            f"{percentile(r.e2e_s, 0.5) * 1000:,.0f} ms",
            f"{percentile(r.e2e_s, 0.99) * 1000:,.0f} ms",
            f"{r.throughput:,.1f}",
            f"{r.hit_rate * 100:.1f}%",
            f"{(p50 / baseline - 1) * 100:+.0f}%",
            str(r.errors),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 conversations instead of 200")
    parser.add_argument("--replicas", type=int, default=4, help="simulated vLLM replicas, 4-8 (default 4)")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-prompts", type=int, default=8, help="distinct shared system prompts")
    parser.add_argument("--system-tokens", type=int, default=1000, help="tokens per system prompt")
    parser.add_argument("--user-tokens", type=int, default=80, help="tokens per user message")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--think", type=float, default=0.5, help="mean think time between turns (s)")
    parser.add_argument("--load", type=float, default=0.8, help="offered rate / estimated capacity (0.7-0.9)")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.25)
    parser.add_argument("--itl-ms", type=float, default=4.0)
    parser.add_argument("--ttft-ms", type=float, default=2.0)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV cache (and prefix cache) per replica")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--others",
        type=int,
        default=0,
        help="long streams another client keeps on the first replica, past the gateway (default 0)",
    )
    parser.add_argument(
        "--policy",
        choices=[row[0] for row in POLICIES],
        nargs="+",
        default=None,
        help="only these (round robin is the baseline of the last column)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations = 60
    return args


_OWN_COUNTS = {"ARGOSY_GATEWAY_POD_METRICS_SECONDS": "0"}  # prefix affinity without the pods' /metrics

# (--policy name, row label, front, policy, gateway workers, gateway settings). Two workers are
# two gateway processes behind one port, as two replicas behind a Service: each one sends only
# part of every pod's load, which the pods' /metrics (the default) show it.
POLICIES: tuple[tuple[str, str, str, str, int, dict[str, str]], ...] = (
    ("round-robin", "round robin (Kubernetes Service), via argosy-gateway", "gateway", "round-robin", 1, {}),
    ("least-outstanding", "least outstanding, argosy-gateway", "gateway", "least-outstanding", 1, {}),
    ("prefix-affinity-own", "prefix affinity, own counts only", "gateway", "prefix-affinity", 1, _OWN_COUNTS),
    ("prefix-affinity", "prefix affinity + pods' load (default)", "gateway", "prefix-affinity", 1, {}),
    ("prefix-affinity-own-x2", "prefix affinity, own counts only, 2 workers", "gateway", "prefix-affinity", 2,
     _OWN_COUNTS),
    ("prefix-affinity-x2", "prefix affinity + pods' load, 2 workers", "gateway", "prefix-affinity", 2, {}),
    ("cache_aware", "vllm-router cache_aware", "router", "cache_aware", 1, {}),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_children_on_sigterm()
    setup = Setup(
        replicas=args.replicas,
        conversations=args.conversations,
        turns=args.turns,
        system_prompts=args.system_prompts,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        max_tokens=args.max_tokens,
        think_s=args.think,
        load=args.load,
        prefill_ms_per_token=args.prefill_ms_per_token,
        itl_ms=args.itl_ms,
        ttft_ms=args.ttft_ms,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
        seed=args.seed,
        others=args.others,
    )
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    load_before = load_average()
    print(f"# bench-routing {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load_before}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="argosy-bench-routing-") as tmp:
        tmpdir = Path(tmp)
        reply_chars = measure_reply_chars(setup, tmpdir)
        capacity = estimated_capacity_rps(setup, reply_chars)
        rate = setup.load * capacity
        workload = build_workload(setup, rate)
        requests = setup.conversations * setup.turns
        print(
            f"# {setup.replicas} replicas; {setup.conversations} conversations x {setup.turns} turns = {requests} "
            f"requests; {setup.system_prompts} system prompts of {setup.system_tokens} tokens; estimated capacity "
            f"{capacity:.1f} req/s, offered {rate:.1f} req/s ({setup.load:.0%})"
            + (f"; another client keeps {setup.others} streams on replica 0" if setup.others else ""),
            flush=True,
        )
        for key, name, kind, policy, workers, settings in POLICIES:
            if args.policy is not None and key not in args.policy:
                continue
            started_at = time.monotonic()
            result = run_policy(name, kind, policy, setup, workload, tmpdir, workers, settings)
            if result is None:
                continue
            results.append(result)
            print(
                f"{name}: TTFT p50 {percentile(result.ttft_s, 0.5) * 1000:.0f} ms, hit rate "
                f"{result.hit_rate:.1%}, {len(result.e2e_s)}/{requests} done in {time.monotonic() - started_at:.0f} s",
                flush=True,
            )
    print()
    print(render(results))
    print(f"\ncommand: {command}\nload average before {load_before}, after {load_average()}")
    if args.json:
        payload = [
            {
                "policy": r.policy,
                "ttft_p50_s": percentile(r.ttft_s, 0.5),
                "ttft_p99_s": percentile(r.ttft_s, 0.99),
                "e2e_p50_s": percentile(r.e2e_s, 0.5),
                "e2e_p99_s": percentile(r.e2e_s, 0.99),
                "requests_per_s": r.throughput,
                "prefix_cache_hit_rate": r.hit_rate,
                "errors": r.errors,
            }
            for r in results
        ]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
