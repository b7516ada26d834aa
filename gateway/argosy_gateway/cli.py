"""``argosy-gateway``: run the gateway under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from argosy_gateway.app import configure_logging
from argosy_gateway.server import HTTP_PROTOCOL
from argosy_gateway.settings import CONFIG_FILE_ENV, ENV_PREFIX, load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="argosy-gateway",
        description="One OpenAI-compatible endpoint for every model, routed by the request's model name. "
        "Settings come from ARGOSY_GATEWAY_* environment variables and the optional --config file.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--config", type=Path, help="YAML file of gateway settings (environment wins)")
    parser.add_argument("--log-level", default=None, help="override the log level (debug, info, ...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.config is not None:
        # Workers are separate processes that build their own app from the environment.
        os.environ[CONFIG_FILE_ENV] = str(args.config.resolve())
    if args.log_level:
        os.environ[ENV_PREFIX + "LOG_LEVEL"] = args.log_level
    try:
        settings = load_settings()  # validate once up front, so a typo fails before forking
    except Exception as exc:  # pydantic's ValidationError or a YAML/OS error
        print(f"argosy-gateway: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    level = settings.log_level.upper()
    configure_logging(level)
    uvicorn.run(
        "argosy_gateway.app:create_app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        # uvicorn's httptools protocol writing each answer's head with its body (server.py).
        http=HTTP_PROTOCOL,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        log_level=level.lower(),
        log_config=None,  # uvicorn's loggers go through the root handler configured above
        timeout_keep_alive=int(settings.client_keepalive_seconds),
        timeout_graceful_shutdown=30,
        # A new worker must answer ready within this, or the supervisor kills and restarts it;
        # uvicorn's 5 s is less than importing the app takes on a busy 2-core node (measured
        # 6-8 s at load average 15), which turned --workers 2 into an endless restart loop.
        timeout_worker_healthcheck=60,
    )


if __name__ == "__main__":
    main()
