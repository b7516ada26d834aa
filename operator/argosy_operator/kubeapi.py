"""A small asyncio client for the Kubernetes REST API (transport only).

The operator reads through kopf's watch caches; this client carries the few calls a
reconcile makes (apply, delete, status, events, one GET to check ownership). It shares
its credentials with kopf's login handler, so both talk to the same cluster as the
same identity. Bodies are plain dicts in and out.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

# kind -> (API path prefix, plural) for the kinds the operator touches.
_RESOURCES: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("v1", "Secret"): "secrets",
    ("argosy.dev/v1alpha1", "LLMDeployment"): "llmdeployments",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class Credentials:
    server: str
    ca_path: str | None = None
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None
    token: Callable[[], str | None] = dataclasses.field(default=lambda: None)
    """Returns the bearer token at call time (service-account tokens rotate)."""


def load_credentials(kubeconfig: str | None) -> Credentials:
    """Credentials from a kubeconfig file, or the pod's service account when None."""
    from kubernetes import client, config  # heavy import, only at start-up

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg, persist_config=False)

    def token() -> str | None:
        # kubernetes>=36 keeps the token under "BearerToken", older under "authorization";
        # get_api_key_with_prefix also runs the in-cluster refresh hook.
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        if not header:
            return None
        return str(header).split(" ", 1)[-1]

    return Credentials(
        server=str(cfg.host).rstrip("/"),
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file or None,
        private_key_path=cfg.key_file or None,
        token=token,
    )


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    plural = _RESOURCES[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeApi:
    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self._creds = credentials
        self._observe = observe
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._creds.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self._creds.ca_path)
        if self._creds.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self._creds.certificate_path and self._creds.private_key_path:
            ctx.load_cert_chain(self._creds.certificate_path, self._creds.private_key_path)
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=16)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        token = self._creds.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":"))
        session = self._get_session()
        started = time.perf_counter()
        async with session.request(method, self._creds.server + path, params=params,
                                   data=data, headers=headers) as resp:
            text = await resp.text()
            status, status_reason = resp.status, resp.reason or ""
        if self._observe is not None:
            self._observe(method, time.perf_counter() - started)
        payload: Any = json.loads(text) if text else {}
        if status >= 400:
            message = payload.get("message", text) if isinstance(payload, dict) else text
            reason = payload.get("reason", status_reason) if isinstance(payload, dict) else ""
            raise ApiError(status, str(reason), str(message))
        return payload if isinstance(payload, dict) else {}
