"""The stand-in model: what vLLM serves in the sandbox in place of a model's real weights.

There is no model hub here, so the sandbox makes its own model: a tiny Llama
(config.json, tokenizer with a chat template, safetensors weights) trained for a few
seconds on runtime/standin_corpus.txt by runtime/make_standin_model.py, in the serving
runtime's python. It is cached under `<cache>/models/`, keyed by a digest of the recipe
(script, corpus, runtime lock), and built in a staging directory that is renamed into
place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .build import Reporter, _print, file_lock
from .paths import cache_dir
from .vllm_runtime import LOCK_FILE, RUNTIME_FILES, ensure_runtime, runtime_python

SCRIPT = RUNTIME_FILES / "make_standin_model.py"
CORPUS = RUNTIME_FILES / "standin_corpus.txt"
COMPLETE_MARKER = ".complete"
# What a newcomer reads in the demo and docs about the model that answers.
DESCRIPTION = "a tiny stand-in Llama (2 layers, hidden 256) the sandbox trained on a fixed text"


class ModelBuildError(RuntimeError):
    """The stand-in model could not be made; the message names the log."""


def recipe_version() -> str:
    """Changes whenever the model would come out different: script, corpus or runtime."""
    digest = hashlib.sha256()
    for path in (SCRIPT, CORPUS, LOCK_FILE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def model_dir() -> Path:
    return cache_dir() / "models" / f"standin-llama-{recipe_version()}"


def is_made() -> bool:
    return (model_dir() / COMPLETE_MARKER).is_file()


def ensure_model(report: Reporter = _print) -> Path:
    """The stand-in model's directory, made first if it is not cached (installs the runtime too)."""
    if is_made():
        return model_dir()
    ensure_runtime(report)
    with file_lock("standin-model.lock"):
        if not is_made():
            _make(report)
    return model_dir()


def _make(report: Reporter) -> None:
    final = model_dir()
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    log = cache_dir() / "logs" / f"{final.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    report(f"making the stand-in model (tokenizer, weights, a few seconds of training) into {final}; log: {log}")
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as log_file:
        result = subprocess.run(
            [str(runtime_python()), "-P", str(SCRIPT), str(CORPUS), str(staging)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            check=False,
        )
        log_file.write(result.stdout)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelBuildError(f"making the stand-in model failed (exit {result.returncode}); log: {log}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (staging / COMPLETE_MARKER).write_text(recipe_version() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    report(
        f"stand-in model made in {time.monotonic() - started:.0f} s: {summary['parameters']} parameters, "
        f"vocabulary {summary['vocabulary']}, loss {summary['final_loss']} after {summary['train_steps']} steps; "
        f"asked {summary['sample_question']!r} it answers {summary['sample_answer']!r}"
    )
