"""docs/reference.md is generated from the CRD schema; stale means it lies to users."""

from __future__ import annotations

from argosy_operator import crd, docgen


def test_reference_doc_is_up_to_date(repo_root):
    committed = (repo_root / "docs/reference.md").read_text(encoding="utf-8")
    assert committed == docgen.render(), "run `python -m argosy_operator.docgen`"


def test_every_spec_field_is_documented_with_its_description(repo_root):
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    text = docgen.render()

    def walk(node, path):
        for name, child in node.get("properties", {}).items():
            assert f"`{name}`" in text, f"{path}.{name} missing"
            if child.get("description"):
                first_words = " ".join(child["description"].split()[:4])
                assert first_words in text, f"{path}.{name}: description missing"
            walk(child.get("items", child), f"{path}.{name}")

    walk(schema["spec"], "spec")
    walk(schema["status"], "status")


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/reference.md").write_text("# old\n")
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
