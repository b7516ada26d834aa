"""`argosy-operator run` settings: flags win, then ARGOSY_OPERATOR_* variables, then defaults."""

from __future__ import annotations

import argparse

from argosy_operator.settings import OperatorSettings, settings_from_args


def test_defaults_watch_the_whole_cluster() -> None:
    settings = settings_from_args(argparse.Namespace(), env={})
    assert settings == OperatorSettings()
    assert settings.clusterwide and settings.metrics_port == 8080 and settings.hub_lookup


def test_flags_win_over_environment() -> None:
    env = {"ARGOSY_OPERATOR_NAMESPACES": "x,y", "ARGOSY_OPERATOR_METRICS_PORT": "9000",
           "ARGOSY_OPERATOR_LOG_LEVEL": "DEBUG"}
    args = argparse.Namespace(namespaces=["a", "b", "a"], metrics_port=8181, log_level="warning",
                              kubeconfig="/k")
    settings = settings_from_args(args, env=env)
    assert settings.namespaces == ("a", "b")
    assert (settings.metrics_port, settings.log_level, settings.kubeconfig) == (8181, "WARNING", "/k")
    assert not settings.clusterwide


def test_environment_fills_what_flags_leave_out() -> None:
    env = {"ARGOSY_OPERATOR_NAMESPACES": "team-a, team-b", "ARGOSY_OPERATOR_METRICS_PORT": "9000",
           "ARGOSY_OPERATOR_RESYNC_SECONDS": "12.5", "ARGOSY_OPERATOR_WORKERS": "0",
           "ARGOSY_OPERATOR_HUB_LOOKUP": "false", "KUBECONFIG": "/etc/kube", "HF_ENDPOINT": "http://127.0.0.1:5000"}
    settings = settings_from_args(argparse.Namespace(), env=env)
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.metrics_port == 9000 and settings.resync_seconds == 12.5
    assert settings.workers == 1  # at least one worker
    assert not settings.hub_lookup and settings.hub_endpoint == "http://127.0.0.1:5000"
    assert settings.kubeconfig == "/etc/kube"


def test_backend_keys_are_on_unless_the_install_turns_them_off() -> None:
    assert settings_from_args(argparse.Namespace(), env={}).backend_keys
    off = settings_from_args(argparse.Namespace(), env={"ARGOSY_OPERATOR_BACKEND_KEYS": "false"})
    assert not off.backend_keys
