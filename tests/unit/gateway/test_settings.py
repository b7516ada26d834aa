"""Settings: environment prefix, config file, precedence, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from argosy_gateway.settings import load_settings
from pydantic import ValidationError


def test_environment_wins_over_the_config_file_and_overrides_win_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("retries: 0\nmax_body_bytes: 2048\nnamespaces: [a]\ndefault-policy: round-robin\n")
    monkeypatch.setenv("ARGOSY_GATEWAY_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("ARGOSY_GATEWAY_NAMESPACES", '["x", "y"]')
    settings = load_settings(config, retries=2)
    assert settings.retries == 2
    assert settings.max_body_bytes == 4096
    assert settings.namespaces == ["x", "y"]
    assert settings.default_policy == "round-robin"


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"discovery: kubernetes\nkubeconfig: {tmp_path / 'kc'}\n")
    monkeypatch.setenv("ARGOSY_GATEWAY_CONFIG_FILE", str(config))
    settings = load_settings()
    assert settings.discovery == "kubernetes" and settings.kubeconfig == tmp_path / "kc"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("default_policy: fastest\n", "default_policy"),
        ("discovery: consul\n", "discovery"),
        ("retries: 9\n", "retries"),
        ("max_body_byte: 10\n", "max_body_byte"),  # a typo is refused, not ignored
    ],
)
def test_invalid_settings_are_refused_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ValidationError, match=field):
        load_settings(config)
