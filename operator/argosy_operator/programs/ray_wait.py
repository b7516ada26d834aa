"""Wait until a group's Ray cluster has every node and GPU vLLM will ask for.

Run by the leader pod of a `ray` group after `ray start --head`, before `vllm serve`:
vLLM asks Ray for one {GPU: 1} bundle per rank as soon as it starts and fails when the
workers have not joined yet. Exit 0 once the cluster has --nodes alive nodes and
--gpus GPUs; exit 1 after --timeout seconds with one line naming what is missing.

    python3 ray_wait.py --gpus 16 --nodes 2 --timeout 900 [--worker NAME ...]

Connects to RAY_ADDRESS (default: the local head). Standard library plus ray only.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeView:
    address: str
    gpus: float


@dataclass(frozen=True)
class Shortfall:
    """What the cluster lacks; empty when it is complete."""

    nodes: int
    gpus: float
    missing_workers: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.nodes > 0 or self.gpus > 0


def alive_nodes(raw_nodes: Sequence[dict[str, Any]]) -> list[NodeView]:
    """ray.nodes() entries reduced to the alive nodes' addresses and GPU counts."""
    return [
        NodeView(str(n.get("NodeManagerAddress", "?")), float((n.get("Resources") or {}).get("GPU", 0)))
        for n in raw_nodes
        if n.get("Alive")
    ]


def shortfall(
    nodes: Sequence[NodeView],
    want_nodes: int,
    want_gpus: int,
    workers: Sequence[str] = (),
    resolve: Callable[[str], str | None] = lambda _: None,
) -> Shortfall:
    """Compare the alive nodes with the group; name the workers whose address has not joined."""
    gpus = sum(n.gpus for n in nodes)
    present = {n.address for n in nodes}
    missing = tuple(w for w in workers if resolve(w) not in present)
    return Shortfall(max(0, want_nodes - len(nodes)), max(0.0, want_gpus - gpus), missing)


def describe(nodes: Sequence[NodeView], want_nodes: int, want_gpus: int, gap: Shortfall) -> str:
    have = ", ".join(f"{n.address} ({n.gpus:g} GPUs)" for n in nodes) or "none"
    text = (
        f"the Ray cluster has {sum(n.gpus for n in nodes):g} of {want_gpus} GPUs on {len(nodes)} of "
        f"{want_nodes} nodes; missing {gap.nodes} node(s) and {gap.gpus:g} GPU(s)"
    )
    if gap and gap.missing_workers:
        text += f" (workers not joined: {', '.join(gap.missing_workers)})"
    return f"{text}; nodes present: {have}"


def _resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait until the group's Ray cluster has every node and GPU.")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the whole group must have")
    parser.add_argument("--nodes", type=int, required=True, help="nodes (pods) the group must have")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--worker", action="append", default=[], help="a worker's stable name, to name it when missing")
    args = parser.parse_args(argv)

    import ray  # the vLLM image's Ray; imported late so --help works without it

    ray.init(
        address=os.environ.get("RAY_ADDRESS", "auto"),
        # The pod's address is the Ray node this driver joins (the head started with it).
        _node_ip_address=os.environ.get("VLLM_HOST_IP") or None,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    start = time.monotonic()
    last_report = start
    try:
        while True:
            nodes = alive_nodes(ray.nodes())  # type: ignore[no-untyped-call]
            gap = shortfall(nodes, args.nodes, args.gpus, args.worker, _resolve)
            now = time.monotonic()
            if not gap:
                print(f"argosy ray-wait: ready: {args.gpus} GPUs on {len(nodes)} nodes", flush=True)
                return 0
            if now - start >= args.timeout:
                what = describe(nodes, args.nodes, args.gpus, gap)
                print(
                    f"argosy ray-wait: timed out after {args.timeout:g} s: {what}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if now - last_report >= args.report_every:
                print(f"argosy ray-wait: waiting: {describe(nodes, args.nodes, args.gpus, gap)}", flush=True)
                last_report = now
            time.sleep(args.interval)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
