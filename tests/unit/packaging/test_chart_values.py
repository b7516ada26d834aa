"""values.yaml is the chart's documentation: every key commented, every key in the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# Schema definitions that are Kubernetes objects passed through as a whole: their inner keys
# are Kubernetes API fields, documented by the key that holds them.
PASS_THROUGH = {"podSecurityContext", "securityContext", "resources", "affinity"}
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z][A-Za-z0-9_]*):(\s|$)")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key's path (outside lists) to its line number."""
    paths: dict[tuple[str, ...], int] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines()):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- "):
            stack.append((indent, "[]"))
            continue
        match = KEY_LINE.match(line)
        if match:
            stack.append((indent, match["key"]))
            path = tuple(key for _, key in stack)
            if "[]" not in path:
                paths[path] = number
    return paths


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    ref = node.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[1]
        return name, schema["definitions"][name]
    return None, node


def _settable_paths(schema: dict[str, Any], node: dict[str, Any], prefix: tuple[str, ...] = ()):
    """Leaf paths a user sets: chart-owned object keys, not the inside of Kubernetes objects."""
    for key, child in node.get("properties", {}).items():
        name, resolved = _resolve(schema, child)
        path = (*prefix, key)
        if name not in PASS_THROUGH and "properties" in resolved:
            yield from _settable_paths(schema, resolved, path)
        else:
            yield path


def _load(chart_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    text = (chart_dir / "values.yaml").read_text()
    return text, yaml.safe_load(text), json.loads((chart_dir / "values.schema.json").read_text())


def test_every_setting_in_the_schema_is_in_values_yaml_with_a_comment(chart_dir):
    text, _, schema = _load(chart_dir)
    lines = text.splitlines()
    key_lines = _key_lines(text)
    missing, uncommented = [], []
    for path in _settable_paths(schema, schema):
        if path == ("global",):
            continue  # Helm's own, set by parent charts
        if path not in key_lines:
            missing.append(".".join(path))
            continue
        above = lines[key_lines[path] - 1].strip()
        if not above.startswith("#"):
            uncommented.append(".".join(path))
    assert not missing, f"settable in the schema but absent from values.yaml: {missing}"
    assert not uncommented, f"values.yaml keys without a comment above them: {uncommented}"


def test_every_key_in_values_yaml_is_known_to_the_schema(chart_dir):
    text, _, schema = _load(chart_dir)

    def known(path: tuple[str, ...]) -> bool:
        node = schema
        for key in path:
            name, node = _resolve(schema, node)
            if name in PASS_THROUGH:
                return True
            if key not in node.get("properties", {}):
                return False
            node = node["properties"][key]
        return True

    unknown = [".".join(p) for p in _key_lines(text) if not known(p)]
    assert not unknown


def test_schema_is_strict_everywhere(chart_dir):
    _, _, schema = _load(chart_dir)
    loose: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                loose.append(where)
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}/{index}")

    walk(schema, "#")
    assert not loose, f"objects that accept unknown keys: {loose}"


def test_resources_are_documented_but_unset(chart_dir):
    text, values, _ = _load(chart_dir)
    for component in ("operator", "gateway"):
        assert values[component]["resources"] == {}
    # The comment above each `resources: {}` shows an example to copy.
    for match in re.finditer(r"((?:\s*#.*\n)+)\s*resources: \{\}", text):
        assert "requests" in match.group(1)
