"""`argosy-vllm-sim`: run the simulated vLLM OpenAI server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import uvloop

from argosy_vllm_sim import group
from argosy_vllm_sim.server import SimConfig, serve_forever


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, SimConfig]:
    parser = argparse.ArgumentParser(
        prog="argosy-vllm-sim",
        description="A simulated vLLM OpenAI-compatible server (test and benchmark equipment).",
    )
    parser.add_argument("--model", action="append", required=True, help="served model name (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token once running")
    parser.add_argument(
        "--itl-ms",
        type=float,
        # From the environment too: a sandbox pod's env (spec.engine.env) reaches the simulator, its args do not.
        default=float(os.environ.get("ARGOSY_VLLM_SIM_ITL_MS") or 0.0),
        help="interval between output tokens (default: $ARGOSY_VLLM_SIM_ITL_MS or 0)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=256, help="running requests; more wait")
    parser.add_argument(
        "--prefill-ms-per-token", type=float, default=0.0, help="added to TTFT per uncached prompt token"
    )
    parser.add_argument(
        "--serial-prefill",
        action="store_true",
        help="prefills share one compute lane, so uncached prompt tokens of concurrent requests queue",
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-cache-tokens", type=int, default=262_144, help="KV cache capacity in tokens")
    parser.add_argument(
        "--enable-prompt-tokens-details", action="store_true", help="usage.prompt_tokens_details.cached_tokens"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=0.0,
        help="on SIGTERM: 0 aborts requests in flight (vLLM's default); N waits up to N s for them",
    )
    parser.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="keys a caller of /v1/* must send as a bearer token (default: $VLLM_API_KEY), as vLLM's --api-key",
    )
    group = parser.add_argument_group(
        "groups", "one member of a replica that spans nodes (vLLM's --nnodes): see argosy_vllm_sim/group.py")
    group.add_argument("--group-size", type=int, default=1, help="leader: members, itself included")
    group.add_argument("--group-port", type=int, default=29500, help="leader: where members join")
    group.add_argument("--headless", action="store_true", help="a member without HTTP: joins --leader")
    group.add_argument("--leader", help="headless member: the leader's HOST:PORT")
    args = parser.parse_args(argv)
    if args.headless and not args.leader:
        parser.error("--headless needs --leader HOST:PORT")
    # As vLLM: --api-key wins over $VLLM_API_KEY.
    api_keys = tuple(args.api_key or [os.environ.get("VLLM_API_KEY") or ""])
    try:
        return args, SimConfig(
            models=tuple(args.model),
            host=args.host,
            port=args.port,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            max_num_seqs=args.max_num_seqs,
            prefix_caching=not args.no_prefix_caching,
            prefill_ms_per_token=args.prefill_ms_per_token,
            serial_prefill=args.serial_prefill,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            kv_cache_tokens=args.kv_cache_tokens,
            prompt_tokens_details=args.enable_prompt_tokens_details,
            shutdown_timeout=args.shutdown_timeout,
            api_keys=api_keys,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # parser.error exits; this keeps type checkers satisfied


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    if args.headless:
        return uvloop.run(group.follow(args.leader, config.host))
    if args.group_size > 1:
        return uvloop.run(group.lead(config, args.group_size, args.group_port))
    uvloop.run(serve_forever(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
