"""The generated CRD: committed copies are current, the schema is structural and helpful."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_operator import crd

REPO = Path(__file__).resolve().parents[3]


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_committed_crd_files_are_current() -> None:
    stale = crd.stale_files(REPO)
    assert stale == [], "run `python -m argosy_operator.crd` (make manifests) and commit the result"


def test_check_flag_fails_on_a_stale_copy(tmp_path: Path) -> None:
    for path, text in crd.outputs(tmp_path).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    check = [sys.executable, "-m", "argosy_operator.crd", "--check", "--root", str(tmp_path)]
    assert subprocess.run(check, capture_output=True).returncode == 0
    (tmp_path / crd.MANIFEST_PATH).write_text("# edited by hand\n")
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1
    assert "argosy.dev_llmdeployments.yaml" in result.stderr


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "title" not in node and "nullable" not in node, path
        assert node.get("additionalProperties") is not False, path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        elif not node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path


def test_every_field_has_a_description() -> None:
    for path, node in _walk(_schema()):
        if path.endswith("[]") or path.endswith("{}") or path == ".metadata":
            continue  # list items / map values are described by their field; metadata is the apiserver's
        assert node.get("description"), f"{path or 'root'} has no description"


def test_cel_rules_cover_the_cross_field_checks() -> None:
    spec = _schema()["properties"]["spec"]
    messages = [rule["message"] for rule in spec["x-kubernetes-validations"]]
    assert "parallelism.tensor x parallelism.pipeline must equal gpu.count" in messages
    assert "parallelism.tensor must divide model.facts.numAttentionHeads" in messages
    uri_rules = spec["properties"]["model"]["properties"]["uri"]["x-kubernetes-validations"]
    assert any("hf://, pvc:// or s3://" in rule["message"] for rule in uri_rules)


def test_bounds_and_enums() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["replicas"]["minimum"] == 0
    engine = spec["engine"]["properties"]
    assert engine["gpuMemoryUtilization"]["maximum"] == 1.0
    assert engine["gpuMemoryUtilization"]["exclusiveMinimum"] is True
    assert "fp8" in engine["kvCacheDtype"]["enum"]
    assert spec["gpu"]["properties"]["count"]["x-kubernetes-int-or-string"] is True


def test_optional_objects_default_so_nested_defaults_apply() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["engine"]["default"] == {} and spec["planning"]["default"] == {}
    assert "default" not in spec["model"]["properties"]["facts"]
    # A default must satisfy its own schema, or the API server refuses the whole CRD.
    for path, node in _walk(_schema()):
        if isinstance(node.get("default"), dict):
            missing = set(node.get("required", ())) - set(node["default"])
            assert not missing, f"{path}: default {node['default']} lacks required {sorted(missing)}"
            # CEL rules are not evaluated here; an object with its own rules gets no default
            # (chatTemplate's "exactly one of" refuses {}, and with it the whole CRD).
            assert not node.get("x-kubernetes-validations"), f"{path}: a defaulted object with CEL rules"


def test_subresources_printer_columns_and_names() -> None:
    body = crd.crd()["spec"]
    version = body["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == ["Model", "TP", "PP", "Replicas", "Ready", "Age"]
    assert body["names"]["shortNames"] == ["lld"] and body["scope"] == "Namespaced"
    assert _schema()["properties"]["status"]["properties"]["selector"]["type"] == "string"


def test_manifest_and_chart_copy_describe_the_same_crd() -> None:
    manifest = yaml.safe_load(crd.render_manifest())
    chart = crd.render_chart_template()
    assert chart.startswith("{{- /*") and "{{- if .Values.crds.enabled }}" in chart
    assert "  {{- if .Values.crds.keep }}\n  annotations:\n    helm.sh/resource-policy: keep\n" in chart
    # Rendered with crds.enabled=true and crds.keep=false the template is the plain manifest.
    rendered = "\n".join(line for line in chart.splitlines() if "{{" not in line and "helm.sh" not in line)
    rendered = rendered.replace("  annotations:\n", "")
    assert yaml.safe_load(rendered) == manifest


@pytest.mark.parametrize("path", [crd.MANIFEST_PATH, crd.CHART_PATH])
def test_generated_files_mark_themselves_generated(path: Path) -> None:
    assert "Do not edit" in (REPO / path).read_text().splitlines()[0]
