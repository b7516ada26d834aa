"""Links in the operator-facing docs point at files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = ("architecture.md", "operations.md", "sizing.md", "reference.md")
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)")


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", markdown, re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", heading.replace("`", "")).strip().lower()
        anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(repo_root, name):
    path = repo_root / "docs" / name
    text = path.read_text()
    broken = []
    for target, anchor in LINK.findall(text):
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(target)
        elif (
            anchor
            and resolved.suffix == ".md"
            and anchor not in _anchors(resolved.read_text())
            and not resolved.samefile(repo_root / "docs" / "reference.md")
        ):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{name}: {broken}"


def test_operations_covers_the_three_troubleshooting_cases(repo_root):
    text = (repo_root / "docs" / "operations.md").read_text()
    for heading in ("Pending", "PlacementFound=False", "503 no_ready_replica"):
        assert re.search(rf"^### .*{re.escape(heading)}", text, re.MULTILINE), heading


def test_sizing_examples_exist(repo_root):
    text = (repo_root / "docs" / "sizing.md").read_text()
    for example in Path(repo_root / "manifests" / "examples").glob("*.yaml"):
        assert example.name in text, f"docs/sizing.md does not walk through {example.name}"
