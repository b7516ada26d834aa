"""Fixtures for the chart, manifest, image and docs tests: a helm binary and a renderer."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_sandbox.build import helm_binary as _helm_binary

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART = REPO_ROOT / "charts" / "argosy"




@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART


@pytest.fixture(scope="session")
def helm() -> Path:
    binary = _helm_binary()
    return binary


HelmResult = subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def run_helm(helm: Path) -> Callable[..., HelmResult]:
    def run(*args: str) -> HelmResult:
        return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)

    return run


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(run_helm: Callable[..., HelmResult], tmp_path_factory: pytest.TempPathFactory) -> Render:
    """Render the chart with values (a dict, as a values file) and return its objects."""
    counter = iter(range(1_000_000))

    def _render(
        values: dict[str, Any] | None = None,
        namespace: str = "argosy-system",
        release: str = "argosy",
        extra: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        args = ["template", release, str(CHART), "--namespace", namespace, *extra]
        if values:
            path = tmp_path_factory.getbasetemp() / f"values-{next(counter)}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["--values", str(path)]
        result = run_helm(*args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


def find(
    objects: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


@pytest.fixture(scope="session")
def select() -> Callable[..., list[dict[str, Any]]]:
    return find
