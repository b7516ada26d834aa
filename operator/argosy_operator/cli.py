"""`argosy-operator`: `run` the operator, or `plan` a model on some GPUs without a cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from argosy_operator.api import DType, KvCacheDType, ModelFacts, Quantization
from argosy_operator.planner import (
    EngineSettings,
    GpuPool,
    Placement,
    PlacementError,
    PlanRequest,
    facts_from_hf_config,
    find_shipped,
    inventory_from_nodes,
    parameter_count,
    plan,
    remote_code_note,
    shipped_models,
)
from argosy_operator.planner.memory import GIB, compute_dtype_name, weight_bits

EXIT_NO_PLACEMENT = 2
EXIT_USAGE = 64


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _utilization(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _env_namespaces() -> list[str]:
    raw = os.environ.get("ARGOSY_OPERATOR_NAMESPACES", "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def _env_port() -> int:
    raw = os.environ.get("ARGOSY_OPERATOR_METRICS_PORT", "")
    return int(raw) if raw.isdigit() else 8080


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="argosy-operator",
        description="Argosy operator: sizes and runs vLLM LLMDeployments on Kubernetes GPU clusters.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the operator (kopf) against the current cluster")
    run.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=None,
        help="namespace to watch (repeatable; default: cluster-wide; env ARGOSY_OPERATOR_NAMESPACES=a,b)",
    )
    run.add_argument(
        "--log-level",
        default=os.environ.get("ARGOSY_OPERATOR_LOG_LEVEL", "INFO").upper(),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env ARGOSY_OPERATOR_LOG_LEVEL; default INFO)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=_env_port(),
        help="Prometheus metrics port (env ARGOSY_OPERATOR_METRICS_PORT; default 8080)",
    )
    run.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster or ~/.kube/config)")
    run.add_argument(
        "--leader-elect",
        action="store_true",
        default=None,
        help="run as one of several replicas: reconcile only while holding a coordination.k8s.io Lease "
        "(env ARGOSY_OPERATOR_LEADER_ELECTION=true; the chart turns it on)",
    )
    run.add_argument("--lease-name", default=None,
                     help="the Lease's name (env ARGOSY_OPERATOR_LEASE_NAME; default argosy-operator)")
    run.add_argument("--lease-namespace", default=None,
                     help="the Lease's namespace (env POD_NAMESPACE; default: the credentials' namespace)")
    run.set_defaults(handler=_run)

    p = commands.add_parser(
        "plan",
        help="show the placement the operator would choose",
        description="Size a model on GPUs: prints tensor/pipeline parallelism, weights and the KV cache "
        "estimate the way vLLM logs it. Exits 2 when nothing fits.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="shipped model name or Hugging Face repo id (see --list-models)")
    model.add_argument("--config", type=Path, help="path to a model's config.json")
    model.add_argument("--list-models", action="store_true", help="list the shipped models and exit")
    p.add_argument("--gpu-memory-mib", type=_positive_int, help="memory of one GPU in MiB (nvidia.com/gpu.memory)")
    p.add_argument("--gpus-per-node", type=_positive_int, help="GPUs per node")
    p.add_argument("--nodes", type=_positive_int, default=1, help="number of such nodes (default 1)")
    p.add_argument("--gpu-product", default="GPU", help="GPU product name (nvidia.com/gpu.product)")
    p.add_argument("--kubeconfig", help="read the GPU inventory from this cluster's Nodes instead")
    p.add_argument("--gpu-products", default="", help="comma-separated allow-list of GPU products")
    p.add_argument("--max-model-len", type=_positive_int, help="--max-model-len (default: the model's context)")
    p.add_argument("--dtype", default="auto", choices=get_args(DType))
    p.add_argument("--quantization", default=None, choices=get_args(Quantization))
    p.add_argument("--kv-cache-dtype", default="auto", choices=get_args(KvCacheDType))
    p.add_argument("--gpu-memory-utilization", type=_utilization, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=_positive_int)
    p.add_argument("--max-num-seqs", type=_positive_int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=_positive_int, help="fix tensor parallelism")
    p.add_argument("--pipeline-parallel-size", type=_positive_int, help="fix pipeline parallelism")
    p.add_argument("--target-sequences", type=_positive_int, default=4, help="planning.targetSequences (default 4)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="spec.model.trustRemoteCode: the model's repository code may run (in vLLM, never in the planner); "
        "with --config, says whether config.json needs it",
    )
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.set_defaults(handler=_plan)
    return parser


def resolve_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill `run` flags from the environment: namespaces (list, empty = cluster-wide), log_level,
    metrics_port (int), kubeconfig (str | None)."""
    if args.namespaces is None:
        args.namespaces = _env_namespaces()
    return args


def _run(args: argparse.Namespace) -> int:
    from argosy_operator.runtime import run_operator  # the kopf stack loads only for `run`

    result = run_operator(resolve_run_args(args))
    return int(result or 0)


def _load_model(args: argparse.Namespace) -> tuple[str, ModelFacts, str | None]:
    """The model's name, its facts, and what to say about its remote code (config.json only)."""
    if args.config is not None:
        try:
            config = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            raise PlacementError("UnknownModel", f"cannot read {args.config}: {exc}") from exc
        return str(args.config), facts_from_hf_config(config), remote_code_note(config, args.trust_remote_code)
    shipped = find_shipped(args.model)
    if shipped is None:
        names = ", ".join(m.name for m in shipped_models())
        raise PlacementError(
            "UnknownModel", f"{args.model} is not a shipped model (known: {names}); pass --config config.json."
        )
    return shipped.repos[0], shipped.facts, None


def _nodes_from_cluster(kubeconfig: str) -> list[dict[str, Any]]:
    from lightkube import Client, KubeConfig  # only for --kubeconfig
    from lightkube.resources.core_v1 import Node

    with Client(KubeConfig.from_file(kubeconfig)) as client:
        # Plain dicts: inventory_from_nodes reads Nodes as the API returns them.
        return [node.to_dict() for node in client.list(Node)]


def _pools(args: argparse.Namespace) -> list[GpuPool]:
    if args.kubeconfig:
        return inventory_from_nodes(_nodes_from_cluster(args.kubeconfig))
    return [
        GpuPool(
            product=args.gpu_product,
            memory_mib=args.gpu_memory_mib,
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
        )
    ]


def _human(model: str, facts: ModelFacts, settings: EngineSettings, placement: Placement) -> str:
    memory = placement.memory
    bits = weight_bits(facts, settings)
    kind = compute_dtype_name(facts, settings) if bits == 16 else f"{bits}-bit"
    lines = [
        f"Model:        {model} ({parameter_count(facts) / 1e9:.2f}B parameters, {kind} weights "
        f"{placement.weights_gib:.2f} GiB)",
        f"Placement:    tensor {placement.tensor_parallel_size} x pipeline {placement.pipeline_parallel_size} = "
        + (
            f"{placement.pods_per_replica} pods per replica, one per node, each {placement.gpus_per_pod} "
            f"{placement.gpu_product}"
            if placement.pods_per_replica > 1
            else f"1 pod x {placement.gpus_per_pod} {placement.gpu_product}"
        ),
    ]
    if memory is not None and len(memory.stage_layers) > 1:
        lines.append(
            f"Stages:       layers {' + '.join(map(str, memory.stage_layers))}; stage {memory.binding_stage} binds "
            "(the smallest KV cache: vLLM sizes every stage to it)"
        )
    if memory is not None:
        lines.append(
            f"Per GPU:      budget {memory.budget / GIB:.2f} GiB = weights {memory.weights / GIB:.2f} + "
            f"activation {memory.activation / GIB:.2f} + sampler {memory.sampler / GIB:.2f} + non-torch "
            f"{memory.non_torch / GIB:.2f} + CUDA graphs {memory.cuda_graphs / GIB:.2f} + KV cache "
            f"{max(memory.kv_cache, 0) / GIB:.2f}"
        )
    lines += [
        f"GPU KV cache size: {placement.kv_cache_tokens:,} tokens",
        f"Maximum concurrency for {placement.max_model_len:,} tokens per request: {placement.max_concurrency:.2f}x",
        f"Reason:       {placement.reason}",
    ]
    return "\n".join(lines) + "\n"


def _plan(args: argparse.Namespace) -> int:
    if args.list_models:
        for shipped in shipped_models():
            print(f"{shipped.name:18} {shipped.repos[0]}")
        return 0
    if not args.kubeconfig and (args.gpu_memory_mib is None or args.gpus_per_node is None):
        print("argosy-operator plan: give --gpu-memory-mib and --gpus-per-node, or --kubeconfig", file=sys.stderr)
        return EXIT_USAGE
    settings = EngineSettings(
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
    )
    try:
        model, facts, remote_code = _load_model(args)
        request = PlanRequest(
            model=model,
            facts=facts,
            settings=settings,
            target_sequences=args.target_sequences,
            tensor=args.tensor_parallel_size,
            pipeline=args.pipeline_parallel_size,
            products=tuple(name.strip() for name in args.gpu_products.split(",") if name.strip()),
        )
        placement = plan(request, _pools(args))
    except PlacementError as exc:
        print(f"argosy-operator plan: {exc.reason}: {exc.message}", file=sys.stderr)
        return EXIT_NO_PLACEMENT
    if args.output == "json":
        print(json.dumps(placement.to_status(), indent=2))
    else:
        sys.stdout.write(_human(model, facts, settings, placement))
    if remote_code is not None:
        # Not an error: the placement stands either way; the pods would not start without the flag.
        level = "note" if args.trust_remote_code else "warning"
        print(f"argosy-operator plan: {level}: {remote_code}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    try:
        result: int = handler(args)
    except BrokenPipeError:
        # `argosy-operator plan ... | head`: the reader left; stop quietly like other CLI tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
