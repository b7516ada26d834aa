"""The gateway's user-space instructions per request, counted by valgrind (callgrind).

    .venv/bin/python tests/bench/bench_gateway_instructions.py                 # short requests, c=16
    .venv/bin/python tests/bench/bench_gateway_instructions.py --workload stream256-events
    .venv/bin/python tests/bench/bench_gateway_instructions.py --tree /other/checkout/gateway

CPU time per request moves by 20-30 % from run to run on a shared 2-core machine (other work,
frequency, cache); the number of instructions a process executes for the same work does not.
So a change to the gateway's hot path is compared here: one simulator and wrk on CPU 0, one
gateway process under ``valgrind --tool=callgrind`` on CPU 1 with instrumentation off while it
starts, a warm-up, then the counters are zeroed (``callgrind_control -z``), wrk runs for the
measured window, and the counters are dumped (``callgrind_control -d``). Printed: requests (or
SSE events) in the window, and instructions per request (per event), with the idle background
(the same window with no load) subtracted. Kernel work (the system calls themselves) is not
counted; it is the same for any two code trees that make the same calls.

``--tree`` runs the gateway package from another checkout's ``gateway/`` directory (by
PYTHONPATH), so two trees alternate in one sitting: ``--tree A --tree B --rounds 2`` runs
A B A B. ``--top N`` prints the N functions with the most instructions of the last run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argosy_sandbox.cluster import free_port
from bench_gateway import (
    EVENTS_ITL_MS,
    EVENTS_MODEL,
    MODEL,
    STREAM_TOKENS,
    VENV_BIN,
    WORKLOADS,
    Load,
    check_once,
    run_wrk,
    started,
    stop_children_on_sigterm,
    wait_until_ready,
)

REPO = Path(__file__).resolve().parents[2]
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _instructions(path: Path) -> int:
    match = _TOTALS.search(path.read_text(errors="replace"))
    if match is None:
        raise SystemExit(f"no totals in {path}")
    return int(match.group(1))


def _dump(pid: int, out_dir: Path, label: str) -> Path:
    """Dump the counters of ``pid`` now and return the new dump file."""
    before = set(out_dir.glob("callgrind.out.*"))
    subprocess.run(["callgrind_control", "-d", label, str(pid)], check=True, capture_output=True, timeout=120)
    for _ in range(200):
        new = set(out_dir.glob("callgrind.out.*")) - before
        if new:
            time.sleep(0.3)  # let valgrind finish writing it
            return max(new, key=lambda p: p.stat().st_mtime)
        time.sleep(0.1)
    raise SystemExit(f"callgrind wrote no dump for {label}")


def _zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)


def one_run(tree: Path | None, workload_name: str, concurrency: int, seconds: int, top: int) -> tuple[int, float]:
    """(units of work in the window, instructions per unit, idle background subtracted)."""
    workload = next(w for w in WORKLOADS if w.name == workload_name)
    with tempfile.TemporaryDirectory(prefix="argosy-instr-") as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        env = dict(os.environ)
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        itl = EVENTS_ITL_MS if workload.model == EVENTS_MODEL else 0.0
        sim_argv = [
            str(VENV_BIN / "argosy-vllm-sim"),
            *("--model", workload.model, "--host", "127.0.0.1", "--port", str(sim_port)),
            *("--ttft-ms", "0", "--itl-ms", str(itl), "--max-num-seqs", "4096"),
        ]
        sim_log = tmpdir / "sim.log"
        sim_pid = stack.enter_context(started("simulator", sim_argv, 0, env, sim_log))
        wait_until_ready(f"{sim_url}/health", sim_pid, sim_log)

        models = tmpdir / "models.yaml"
        models.write_text(f"models:\n  - name: {workload.model}\n    endpoints: [{sim_url}]\n")
        gateway_env = dict(
            env,
            ARGOSY_GATEWAY_DISCOVERY="static",
            ARGOSY_GATEWAY_STATIC_CONFIG=str(models),
            ARGOSY_GATEWAY_LOG_LEVEL="WARNING",
        )
        if tree is not None:
            gateway_env["PYTHONPATH"] = str(tree)
        port = free_port()
        gateway_argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=yes",
            f"--callgrind-out-file={tmpdir}/callgrind.out.%p",
            sys.executable,
            "-m",
            "argosy_gateway.cli",
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
        gateway_log = tmpdir / "gateway.log"
        gateway_pid = stack.enter_context(started("gateway", gateway_argv, 1, gateway_env, gateway_log))
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(f"{url}/readyz", gateway_pid, gateway_log, timeout_s=240)
        endpoint = f"{url}/v1/chat/completions"
        check_once(endpoint, workload)
        load = Load(concurrency)
        run_wrk(endpoint, workload, load, 3000, 0)  # warm-up: connections, caches, pools
        _zero(gateway_pid)
        time.sleep(seconds)
        idle = _instructions(_dump(gateway_pid, tmpdir, "idle"))
        _zero(gateway_pid)
        measured = run_wrk(endpoint, workload, load, seconds * 1000, 0)
        dump = _dump(gateway_pid, tmpdir, "load")
        busy = _instructions(dump)
        if measured.errors:
            log_tail = gateway_log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{measured.errors} errors during the measured run: {measured}\n{log_tail}")
        units = measured.requests * (STREAM_TOKENS if workload.stream else 1)  # as bench_gateway: per token event
        per_unit = (busy - idle * measured.duration_s / seconds) / units
        if top:
            report = subprocess.run(
                ["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True, check=False
            ).stdout
            lines = [ln for ln in report.splitlines() if re.match(r"^\s*[\d,]+ \(", ln)]
            print("\n".join(lines[1 : top + 1]))
        shutil.copy(dump, Path(tempfile.gettempdir()) / "argosy-instructions-last.out")
        return units, per_unit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="short", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10, help="measured window (default 10)")
    parser.add_argument("--tree", type=Path, action="append", help="a checkout's gateway/ directory (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per tree, interleaved (default 1)")
    parser.add_argument("--top", type=int, default=0, help="print the N costliest functions of each run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_children_on_sigterm()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench_gateway_instructions needs {tool} (Debian: valgrind, wrk)", file=sys.stderr)
            return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (the gateway on CPU 1, simulator and wrk on CPU 0)", file=sys.stderr)
        return 2
    trees: list[Path | None] = list(args.tree) if args.tree else [None]
    unit = "SSE event" if args.workload != "short" else "request"
    print(f"# {args.workload}, c={args.concurrency}, {args.seconds} s per run; {MODEL=} {EVENTS_MODEL=}")
    results: dict[str, list[float]] = {}
    for round_number in range(args.rounds):
        for tree in trees:
            name = str(tree) if tree is not None else "this checkout"
            units, per_unit = one_run(tree, args.workload, args.concurrency, args.seconds, args.top)
            results.setdefault(name, []).append(per_unit)
            print(f"round {round_number + 1} {name}: {units} {unit}s, {per_unit / 1000:.1f}k instructions per {unit}")
    for name, values in results.items():
        print(f"{name}: {', '.join(f'{v / 1000:.1f}k' for v in values)} instructions per {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
