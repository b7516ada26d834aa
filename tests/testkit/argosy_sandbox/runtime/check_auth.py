"""Ask vLLM's own API-key middleware which requests it lets through.

Runs in the serving runtime's python, with runtime_env() set:
    python -P check_auth.py < cases.json > results.json

Input: a JSON list of cases {"argv": [...], "env": {...}, "requests": [[method, path, authorization], ...]}:
argv is what follows `vllm` (parsed by vLLM's `vllm serve` parser), env the pod's variables
(VLLM_API_KEY). For each case the middleware is installed exactly as vLLM's OpenAI server
installs it (vllm/entrypoints/serve/middleware/register.py: init_entrypoints_middleware) on
an app whose routes answer 200, so a request's status and body are the middleware's verdict.
Output: one list per case of {"status": int, "body": ...} (or {"error": ...} when the
command line is refused).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_launcher  # noqa: F401
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from parse_serve_args import build_parser
from starlette.testclient import TestClient
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware


def app_for(args: Any) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def anything(path: str) -> JSONResponse:
        return JSONResponse({"reached": "/" + path})

    init_entrypoints_middleware(args, app, ())
    return app


def run_case(case: dict[str, Any]) -> Any:
    parser, _ = build_parser()
    saved = dict(os.environ)
    os.environ.pop("VLLM_API_KEY", None)
    os.environ.update(case.get("env") or {})
    try:
        try:
            args = parser.parse_args(case["argv"])
        except SystemExit:
            return {"error": "vLLM's parser refused the command line"}
        client = TestClient(app_for(args))
        answers = []
        for method, path, authorization in case["requests"]:
            headers = {"Authorization": authorization} if authorization is not None else {}
            response = client.request(method, path, headers=headers)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            answers.append({"status": response.status_code, "body": body})
        return answers
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    json.dump([run_case(case) for case in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
