"""Kubernetes discovery: kopf watches LLMDeployments and serving Pods; every change
rebuilds the route table (pure, in ``cluster.py``) and publishes it.

kopf runs embedded, in its own thread and event loop, with an app-local registry.
The separate loop matters: when kopf's root tasks stop, kopf cancels every task of
the loop it runs in, and in the main thread it installs its own SIGINT/SIGTERM
handlers; neither may touch the gateway's loop. Publishing crosses back with
``call_soon_threadsafe``; the route table is immutable, so nothing else is shared.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import kopf
import yaml

from argosy_gateway.discovery import Publish
from argosy_gateway.discovery.cluster import POD_LABEL_SELECTOR, ClusterState
from argosy_gateway.routetable import RouteTable
from argosy_gateway.settings import GatewaySettings

try:  # kopf's record of what the API server offers; not re-exported by kopf, so guarded
    from kopf._cogs.structs.references import Insights
except ImportError:  # pragma: no cover - another kopf layout: fall back to kopf's ready flag
    Insights = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

GROUP = "argosy.dev"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
# Before the first publish, wait for the initial listings: until no event for this long...
SETTLE_QUIET_SECONDS = 0.3
# ...but no longer than this after kopf reports ready.
SETTLE_MAX_SECONDS = 5.0
RESTART_DELAY_SECONDS = 5.0


def login_from_kubeconfig(path: Path) -> kopf.ConnectionInfo:
    """kopf credentials from the current context of one kubeconfig file.

    Supports what clusters commonly hand out: a server with CA (file or data), client
    certificates (file or data), a bearer token, or basic auth. Exec plugins are not run.
    """
    config: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise kopf.LoginError(f"{path} is not a kubeconfig")

    def by_name(section: str, name: object) -> dict[str, Any]:
        for item in config.get(section) or ():
            if isinstance(item, dict) and item.get("name") == name:
                value = item.get(section[:-1])
                return value if isinstance(value, dict) else {}
        raise kopf.LoginError(f"{path}: no {section[:-1]} named {name!r}")

    context = by_name("contexts", config.get("current-context"))
    cluster = by_name("clusters", context.get("cluster"))
    user = by_name("users", context.get("user"))

    def file_path(value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else path.parent / candidate)

    def data(value: object) -> bytes | None:
        return base64.b64decode(value) if isinstance(value, str) and value else None

    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise kopf.LoginError(f"{path}: the current context's cluster has no server")
    return kopf.ConnectionInfo(
        server=server,
        ca_path=file_path(cluster.get("certificate-authority")),
        ca_data=data(cluster.get("certificate-authority-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        certificate_path=file_path(user.get("client-certificate")),
        certificate_data=data(user.get("client-certificate-data")),
        private_key_path=file_path(user.get("client-key")),
        private_key_data=data(user.get("client-key-data")),
        token=user.get("token"),
        username=user.get("username"),
        password=user.get("password"),
        default_namespace=context.get("namespace"),
    )


class _Watcher:
    """Runs inside kopf's thread: applies events to the state and publishes tables."""

    def __init__(self, settings: GatewaySettings, publish: Publish) -> None:
        self.settings = settings
        self.publish = publish
        self.state = ClusterState()
        self.settled = False
        self.logged_in = asyncio.Event()
        self.last_event = time.monotonic()
        self._flush_scheduled = False

    def changed(self) -> None:
        self.last_event = time.monotonic()
        if self.settled and not self._flush_scheduled:
            # Coalesce a burst of events into one table, built after the current batch.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self.publish(self.state.route_table(self.settings.default_policy))

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        kubeconfig = self.settings.kubeconfig

        @kopf.on.login(registry=registry)
        async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            if kubeconfig is not None:
                info: kopf.ConnectionInfo | None = await asyncio.to_thread(login_from_kubeconfig, kubeconfig)
            else:
                info = kopf.login_with_service_account(**kwargs)
            if info is not None:
                self.logged_in.set()
            return info

        @kopf.on.event("v1", "pods", registry=registry)
        async def on_pod(event: kopf.RawEvent, **_: Any) -> None:
            if self.state.apply_pod_event(event.get("type"), event["object"]):
                self.changed()

        @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
        async def on_deployment(event: kopf.RawEvent, **_: Any) -> None:
            if self.state.apply_deployment_event(event.get("type"), event["object"]):
                self.changed()

        return registry

    def operator_settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.posting.enabled = False  # the gateway only reads; it posts no Events
        settings.peering.standalone = True
        # No dynamic namespace/CRD discovery: least-privilege RBAC grants neither listing.
        settings.scanning.disabled = True
        settings.watching.label_selectors["v1", "pods"] = POD_LABEL_SELECTOR
        settings.watching.server_timeout = 300
        settings.watching.connect_timeout = 10
        settings.networking.error_backoffs = [1, 2, 5]
        return settings

    async def main(self, stop: threading.Event) -> None:
        ready = asyncio.Event()
        namespaces = list(self.settings.namespaces)
        insights = Insights() if Insights is not None else None
        operator = asyncio.create_task(
            kopf.operator(
                registry=self.registry(),
                settings=self.operator_settings(),
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                stop_flag=stop,
                ready_flag=ready,
                insights=insights,
            )
        )
        # kopf reports ready even while its login keeps failing or the API server cannot be
        # reached. Wait for credentials and for its first successful API discovery too, then
        # for the initial listings to arrive.
        conditions = [ready.wait(), self.logged_in.wait()]
        if insights is not None:
            conditions.append(insights.ready_resources.wait())
        ready_wait = asyncio.create_task(_all(conditions))
        await asyncio.wait([operator, ready_wait], return_when=asyncio.FIRST_COMPLETED)
        if not operator.done():
            self.last_event = max(self.last_event, time.monotonic())
            started = time.monotonic()
            while time.monotonic() - self.last_event < SETTLE_QUIET_SECONDS:
                if time.monotonic() - started > SETTLE_MAX_SECONDS or operator.done():
                    break
                await asyncio.sleep(0.05)
            self.settled = True
            self.flush()
        ready_wait.cancel()
        await operator


class _ExpectedKopfWarnings(logging.Filter):
    """Drops kopf's note that it ignores OS signals in a thread: that is the point here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OS signals are ignored")


def _quiet_kopf_logs() -> None:
    # kopf logs every handler run at INFO: one line per pod event is noise for a proxy.
    objects = logging.getLogger("kopf.objects")
    if objects.getEffectiveLevel() < logging.WARNING and not log.isEnabledFor(logging.DEBUG):
        objects.setLevel(logging.WARNING)
    running = logging.getLogger("kopf._core.reactor.running")
    if not any(isinstance(f, _ExpectedKopfWarnings) for f in running.filters):
        running.addFilter(_ExpectedKopfWarnings())


async def _all(conditions: list[Coroutine[Any, Any, Any]]) -> None:
    await asyncio.gather(*conditions)


class KubernetesDiscovery:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        _quiet_kopf_logs()

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()

        def call_in_gateway_loop(callback: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the gateway's loop is closing
                loop.call_soon_threadsafe(callback, *args)

        scope = ", ".join(self.settings.namespaces) or "all namespaces"
        while True:
            stop = threading.Event()
            finished = asyncio.Event()
            thread = threading.Thread(
                target=_run_in_thread,
                args=(self.settings, lambda table: call_in_gateway_loop(publish, table), stop),
                kwargs={"on_exit": functools.partial(call_in_gateway_loop, finished.set)},
                name="argosy-kubernetes-discovery",
                daemon=True,
            )
            log.info("watching LLMDeployments and serving pods in %s", scope)
            thread.start()
            try:
                await finished.wait()
            except asyncio.CancelledError:
                stop.set()
                await asyncio.to_thread(thread.join, 10)
                raise
            log.error("Kubernetes discovery stopped; restarting in %.0f s", RESTART_DELAY_SECONDS)
            await asyncio.sleep(RESTART_DELAY_SECONDS)


def _run_in_thread(
    settings: GatewaySettings,
    publish: Callable[[RouteTable], None],
    stop: threading.Event,
    on_exit: Callable[[], None],
) -> None:
    watcher = _Watcher(settings, publish)
    try:
        asyncio.run(watcher.main(stop))
    except Exception:
        log.exception("Kubernetes discovery failed")
    finally:
        on_exit()
