"""Kubernetes discovery: LIST, then watch, LLMDeployments, serving Pods and backend keys with lightkube.

The backend keys are the operator's Secrets labelled ``argosy.dev/backend-key`` (the label
selector is sent to the API server, so no other Secret reaches the gateway); each pod's key
becomes the bearer token the gateway sends it.

For each watched namespace (or all of them) and each of the three resources, one follower:

1. LISTs the objects and replaces what the state knew of them in that scope, all at once;
2. watches from the LIST's resourceVersion, applying every event;
3. when the watch fails (410 Gone, a dropped connection, an API error), goes back to 1.

While a follower re-lists, the gateway keeps serving the table it has: the new LIST replaces
the old objects in one step, so routing never sees a gap. The first table is published (and
the gateway turns ready) only once every follower's initial LIST is in it, so after a
restart no model that exists answers 404. Pods with a deletionTimestamp leave the table at
once (``cluster.pod_info``), so drains get no new requests.

The pure part (events in, route tables out) is ``cluster.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx2 as httpx
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.operators import exists
from lightkube.resources.core_v1 import Pod, Secret

from argosy_gateway.discovery import Publish
from argosy_gateway.discovery.cluster import (
    BACKEND_KEY_LABEL,
    DEPLOYMENTS,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    PODS,
    ROLE_LABEL,
    SECRETS,
    SERVING_ROLES,
    ClusterState,
)
from argosy_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

GROUP = "argosy.dev"
VERSION = "v1alpha1"
LLMDeployment = create_namespaced_resource(GROUP, VERSION, "LLMDeployment", "llmdeployments")
ALL_NAMESPACES = "*"
WATCH_SERVER_TIMEOUT_SECONDS = 300  # the API server ends each watch after this; lightkube resumes it
REQUEST_TIMEOUT_SECONDS = 10.0
RETRY_DELAYS_SECONDS = (0.2, 1.0, 2.0, 5.0)  # after consecutive failures; the last one repeats
POD_LABELS: Mapping[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY_VALUE, ROLE_LABEL: list(SERVING_ROLES)}
SECRET_LABELS: Mapping[str, Any] = {MANAGED_BY_LABEL: MANAGED_BY_VALUE, BACKEND_KEY_LABEL: exists()}
KINDS: Mapping[str, tuple[Any, Mapping[str, Any] | None]] = {
    PODS: (Pod, POD_LABELS),
    DEPLOYMENTS: (LLMDeployment, None),
    SECRETS: (Secret, SECRET_LABELS),
}


def load_kubeconfig(path: Path | None) -> KubeConfig:
    """Credentials from a kubeconfig file, or the in-cluster service account when ``path`` is None."""
    if path is not None:
        return KubeConfig.from_file(path)
    return KubeConfig.from_service_account()


ClientFactory = Callable[[GatewaySettings], AsyncClient]


def create_client(settings: GatewaySettings) -> AsyncClient:
    config = load_kubeconfig(settings.kubeconfig)
    # trust_env=False: no proxy variables; the API server is reached directly.
    return AsyncClient(config=config, timeout=httpx.Timeout(REQUEST_TIMEOUT_SECONDS), trust_env=False)


class KubernetesDiscovery:
    def __init__(self, settings: GatewaySettings, client_factory: ClientFactory = create_client) -> None:
        # lightkube's transport logs every request (each watch restart) at INFO: noise for a proxy.
        transport = logging.getLogger("httpx2")
        if transport.getEffectiveLevel() < logging.WARNING and not log.isEnabledFor(logging.DEBUG):
            transport.setLevel(logging.WARNING)
        self.settings = settings
        self.client_factory = client_factory
        self.state = ClusterState()
        self._publish: Publish | None = None
        self._pending: set[tuple[str, str]] = set()  # (resource, scope) whose first LIST is not in yet
        self._flush_scheduled = False

    async def run(self, publish: Publish) -> None:
        self._publish = publish
        scopes = list(dict.fromkeys(self.settings.namespaces)) or [ALL_NAMESPACES]
        kinds = [k for k in KINDS if k != SECRETS or self.settings.backend_keys]
        self._pending = {(resource, scope) for resource in kinds for scope in scopes}
        client = await self._connect()
        log.info(
            "watching LLMDeployments, serving pods and backend keys in %s",
            ", ".join(self.settings.namespaces) or "all namespaces",
        )
        try:
            async with asyncio.TaskGroup() as group:
                for resource, scope in sorted(self._pending):
                    group.create_task(self._follow(client, resource, scope), name=f"discovery-{resource}-{scope}")
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _connect(self) -> AsyncClient:
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(self.client_factory, self.settings)
            except (ConfigError, OSError, ValueError, KeyError) as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.error("cannot load Kubernetes credentials (%s); retrying", exc)
                await asyncio.sleep(_delay(failures))

    async def _follow(self, client: AsyncClient, resource: str, scope: str) -> None:
        kind, labels = KINDS[resource]
        namespace = scope
        failures = 0
        while True:
            try:
                listing = client.list(kind, namespace=namespace, labels=labels)
                bodies = [_as_dict(obj) async for obj in listing]
                resource_version = listing.resourceVersion
                self.state.replace(resource, None if scope == ALL_NAMESPACES else scope, bodies)
                if (resource, scope) in self._pending:
                    self._pending.discard((resource, scope))
                    log.info("listed %d %s in %s", len(bodies), resource, _scope_name(scope))
                    if not self._pending:
                        self._flush()  # the first full table: the gateway turns ready
                else:
                    log.info("re-listed %d %s in %s", len(bodies), resource, _scope_name(scope))
                    self._changed()
                failures = 0
                async for event_type, obj in client.watch(
                    kind,
                    namespace=namespace,
                    labels=labels,
                    resource_version=resource_version,
                    server_timeout=WATCH_SERVER_TIMEOUT_SECONDS,
                ):
                    if self.state.apply(resource, event_type, _as_dict(obj)):
                        self._changed()
                log.info("the %s watch in %s ended; re-listing", resource, _scope_name(scope))
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                failures += 1
                status = exc.status.code if exc.status is not None else None
                level = logging.INFO if status == 410 else logging.WARNING
                log.log(level, "%s in %s: API error %s (%s); re-listing", resource, _scope_name(scope), status, exc)
            except (httpx.HTTPError, OSError, ValueError) as exc:
                failures += 1
                log.warning("%s in %s: %s: %s; re-listing", resource, _scope_name(scope), type(exc).__name__, exc)
            except Exception:  # a bug: never let it end discovery (the table would freeze)
                failures += 1
                log.exception("%s in %s: unexpected error; re-listing", resource, _scope_name(scope))
            await asyncio.sleep(_delay(failures))

    def _changed(self) -> None:
        if self._pending or self._flush_scheduled:
            return
        # Coalesce a burst of events into one table, built after the current batch.
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._publish is not None:
            self._publish(self.state.route_table(self.settings.default_policy))


def _delay(failures: int) -> float:
    if failures <= 0:
        return 0.0
    return RETRY_DELAYS_SECONDS[min(failures, len(RETRY_DELAYS_SECONDS)) - 1]


def _scope_name(scope: str) -> str:
    return "all namespaces" if scope == ALL_NAMESPACES else f"namespace {scope}"


def _as_dict(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):  # generic resources are dicts already
        return obj
    result: Mapping[str, Any] = obj.to_dict()
    return result
