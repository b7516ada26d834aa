"""manifests/install/argosy.yaml is the chart's defaults, rendered; stale means wrong."""

from __future__ import annotations

import subprocess
import sys

import yaml


def test_install_manifest_is_up_to_date(repo_root, helm):
    result = subprocess.run(
        [sys.executable, str(repo_root / "manifests/install/render.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_install_manifest_creates_its_namespace_first(repo_root):
    objects = [o for o in yaml.safe_load_all((repo_root / "manifests/install/argosy.yaml").read_text()) if o]
    assert objects[0] == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "argosy-system", "labels": {"app.kubernetes.io/part-of": "argosy"}},
    }
    namespaced = [o for o in objects[1:] if "namespace" in o["metadata"]]
    assert namespaced and all(o["metadata"]["namespace"] == "argosy-system" for o in namespaced)
    assert any(o["kind"] == "CustomResourceDefinition" for o in objects)
