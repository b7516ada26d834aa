"""Gateway settings: environment variables prefixed ``ARGOSY_GATEWAY_``, optionally
seeded from a YAML file (``--config``; environment variables win over the file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from argosy_gateway.routetable import DEFAULT_POLICY, POLICY_NAMES

ENV_PREFIX = "ARGOSY_GATEWAY_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG_FILE"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # Discovery
    discovery: Literal["static", "kubernetes"] = "static"
    static_config: Path | None = Field(None, description="YAML file of models and endpoints (static mode)")
    static_poll_seconds: float = Field(1.0, gt=0)
    kubeconfig: Path | None = Field(None, description="kubeconfig path; unset = in-cluster service account")
    namespaces: list[str] = Field(default_factory=list, description="namespaces to watch; empty = all")
    default_policy: str = DEFAULT_POLICY
    backend_keys: bool = Field(
        True, description="kubernetes discovery: watch the operator's backend-key Secrets and send each pod its key"
    )

    # Limits and upstream behaviour
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    first_byte_timeout_seconds: float = Field(600.0, gt=0)
    chunk_timeout_seconds: float = Field(120.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    max_connections_per_endpoint: int = Field(256, ge=0)
    # vLLM (uvicorn) closes idle connections after 5 s; reusing one it is closing costs a retry.
    keepalive_seconds: float = Field(4.0, gt=0)
    retries: int = Field(1, ge=0, le=3)
    eject_after_failures: int = Field(3, ge=1)
    eject_seconds: float = Field(10.0, ge=0)
    retry_after_seconds: int = Field(2, ge=1)
    # Scale from zero (models with spec.autoscaling.enabled): hold requests while a replica starts.
    wake_timeout_seconds: float = Field(
        300.0, gt=0, description="longest a request waits for a sleeping model's first ready replica (then 503)"
    )
    wake_queue_length: int = Field(256, ge=0, description="requests held per model at most (more get 503)")
    prefix_chars: int = Field(16384, ge=1, description="prompt characters prefix affinity reads (its cache key)")
    prefix_load_factor: float = Field(1.25, ge=1.0)
    pod_metrics_seconds: float = Field(
        1.0,
        ge=0,
        description="prefix affinity reads its pods' load (vLLM /metrics) this often; 0 = never (own counts only)",
    )
    max_remembered_responses: int = Field(
        100_000, ge=1, description="Responses API ids remembered to route GET/DELETE /v1/responses/{id}"
    )

    # Client side
    client_keepalive_seconds: float = Field(
        75.0, gt=0, description="idle client connections are kept this long (above a load balancer's idle timeout)"
    )

    # API keys
    api_keys_file: Path | None = None
    api_keys_poll_seconds: float = Field(5.0, gt=0)

    log_level: str = "INFO"

    @field_validator("default_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(POLICY_NAMES)}")
        return value


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from (lowest to highest priority) the YAML file, the environment, ``overrides``.

    ``config_file`` defaults to ``$ARGOSY_GATEWAY_CONFIG_FILE``.
    """
    path = config_file if config_file is not None else os.environ.get(CONFIG_FILE_ENV)
    from_file: dict[str, Any] = {}
    if path:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(document, dict):
            raise ValueError(f"{path}: the gateway config must be a mapping of setting names to values")
        from_file = {str(k).replace("-", "_").lower(): v for k, v in document.items()}
    values = {k: v for k, v in from_file.items() if ENV_PREFIX + k.upper() not in os.environ}
    values.update(overrides)
    return GatewaySettings(**values)
