"""Runtime settings of the operator process (pure: no I/O, no kopf)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

FIELD_MANAGER = "argosy-operator"
GROUP = "argosy.dev"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
KIND = "LLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_METRICS_PORT = 8080
DEFAULT_RESYNC_SECONDS = 30.0
DEFAULT_WORKERS = 4
DEFAULT_LEASE_NAME = "argosy-operator"


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """Everything `argosy-operator run` needs, after flags and environment are merged."""

    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty means cluster-wide."""
    log_level: str = "INFO"
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    kubeconfig: str | None = None
    """Path to a kubeconfig; None means in-cluster service account (or $KUBECONFIG)."""
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    """Every object is reconciled at least this often, even without any watch event."""
    workers: int = DEFAULT_WORKERS
    """Reconciles running at the same time (different objects; one object is never concurrent)."""
    hub_lookup: bool = True
    """Read config.json from the Hugging Face Hub for hf:// models the planner does not ship."""
    backend_keys: bool = True
    """Keep a backend key per LLMDeployment (spec.backendKey); False: no Secret is touched or watched,
    and every serving pod starts without a key, whatever the spec says."""
    hub_endpoint: str | None = None
    """Base URL of the Hugging Face Hub (or a mirror), from $HF_ENDPOINT; None: the public Hub."""
    leader_election: bool = False
    """Reconcile only while holding the Lease (several replicas, one active)."""
    lease_name: str = DEFAULT_LEASE_NAME
    lease_namespace: str | None = None
    """None: the namespace of the credentials (in a pod: its service account's)."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def _env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    return default if not raw else raw.strip().lower() not in ("0", "false", "no", "off")


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    return float(raw) if raw else default


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Merge parsed `run` flags with environment fallbacks (flags win).

    cli.py owns the parser; attributes it does not define fall back to the environment
    (ARGOSY_OPERATOR_*) and then to the defaults above.
    """
    env = os.environ if env is None else env
    namespaces: tuple[str, ...] = tuple(
        getattr(args, "namespaces", None) or getattr(args, "namespace", None) or ())
    if not namespaces and env.get("ARGOSY_OPERATOR_NAMESPACES"):
        namespaces = tuple(n.strip() for n in env["ARGOSY_OPERATOR_NAMESPACES"].split(",") if n.strip())
    log_level = getattr(args, "log_level", None) or env.get("ARGOSY_OPERATOR_LOG_LEVEL") or "INFO"
    port = getattr(args, "metrics_port", None)
    if port is None:
        port = int(env.get("ARGOSY_OPERATOR_METRICS_PORT") or DEFAULT_METRICS_PORT)
    kubeconfig = getattr(args, "kubeconfig", None) or env.get("KUBECONFIG") or None
    resync = getattr(args, "resync_seconds", None)
    if resync is None:
        resync = _env_float(env, "ARGOSY_OPERATOR_RESYNC_SECONDS", DEFAULT_RESYNC_SECONDS)
    workers = getattr(args, "workers", None)
    if workers is None:
        workers = int(env.get("ARGOSY_OPERATOR_WORKERS") or DEFAULT_WORKERS)
    return OperatorSettings(
        namespaces=tuple(dict.fromkeys(namespaces)),
        log_level=str(log_level).upper(),
        metrics_port=int(port),
        metrics_host=env.get("ARGOSY_OPERATOR_METRICS_HOST", "0.0.0.0"),
        kubeconfig=kubeconfig,
        resync_seconds=float(resync),
        workers=max(1, int(workers)),
        hub_lookup=_env_flag(env, "ARGOSY_OPERATOR_HUB_LOOKUP", True),
        hub_endpoint=env.get("HF_ENDPOINT") or None,
        backend_keys=_env_flag(env, "ARGOSY_OPERATOR_BACKEND_KEYS", True),
        leader_election=bool(getattr(args, "leader_elect", None))
        or _env_flag(env, "ARGOSY_OPERATOR_LEADER_ELECTION", False),
        lease_name=getattr(args, "lease_name", None) or env.get("ARGOSY_OPERATOR_LEASE_NAME") or DEFAULT_LEASE_NAME,
        lease_namespace=getattr(args, "lease_namespace", None) or env.get("POD_NAMESPACE") or None,
    )
