"""Scale from zero: a request for a sleeping model wakes it and waits for a ready replica.

A model whose LLMDeployment has ``spec.autoscaling.enabled`` and no ready endpoint does
not answer 503 at once. The gateway patches the model's scale subresource to one replica
(only when it reads zero, with the object's resourceVersion as precondition, so several
gateway replicas seeing the first requests together make one scale-up and never undo a
larger scale someone else wrote), then holds the request until discovery publishes a
route table in which the model has an endpoint, and the proxy forwards it (streaming or
not: nothing was sent to the client yet). A request waits at most ``wake_timeout_seconds``
and at most ``wake_queue_length`` requests wait per model; past either it gets the usual
503 with Retry-After.

The held count per model is a gauge (``argosy_gateway_requests_held``) the operator's
autoscaler reads as demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from argosy_gateway import errors
from argosy_gateway.routetable import DeploymentRef, ModelRoute, RouteTable
from argosy_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

FIELD_MANAGER = "argosy-gateway"
# After a wake-up patch, another one for the same object waits this long (the table may lag).
REPATCH_SECONDS = 5.0
# A new endpoint that does not accept connections yet is tried again after this long.
PROBE_SECONDS = 0.25
CONNECT_TIMEOUT_SECONDS = 1.0

ScalePatch = Callable[[DeploymentRef], Awaitable[bool]]
"""Patch one LLMDeployment's scale to 1 replica; True when written, False on a conflict."""


def _starting(model: str, message: str, code: str, retry_after: int) -> errors.GatewayError:
    return errors.GatewayError(
        503, message, error_type="service_unavailable_error", param="model", code=code, retry_after=retry_after
    )


def queue_full(model: str, limit: int, retry_after: int) -> errors.GatewayError:
    message = f"The model '{model}' is starting and already holds {limit} waiting requests; retry later."
    return _starting(model, message, "wake_queue_full", retry_after)


def wake_timed_out(model: str, seconds: float, retry_after: int) -> errors.GatewayError:
    message = f"The model '{model}' is starting; no replica became ready within {seconds:g} s. Retry later."
    return _starting(model, message, "model_starting", retry_after)


async def _accepts_connections(endpoint: str) -> bool:
    """Whether ``http://host:port`` accepts a TCP connection (the server is listening)."""
    address = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), CONNECT_TIMEOUT_SECONDS
        )
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def lightkube_scale_patch(settings: GatewaySettings) -> tuple[ScalePatch, Callable[[], Awaitable[None]]]:
    """The wake-up write (and a close function) on lightkube: `patch llmdeployments/scale`, nothing else."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.core.exceptions import ApiError
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.types import PatchType

    resource = create_namespaced_resource("argosy.dev", "v1alpha1", "LLMDeployment", "llmdeployments")
    client: AsyncClient | None = None

    def connect() -> AsyncClient:
        nonlocal client
        if client is None:
            config = (
                KubeConfig.from_file(settings.kubeconfig) if settings.kubeconfig is not None else KubeConfig.from_env()
            )
            client = AsyncClient(config, field_manager=FIELD_MANAGER, trust_env=False)
        return client

    async def patch(ref: DeploymentRef) -> bool:
        body: dict[str, Any] = {"spec": {"replicas": 1}}
        if ref.resource_version:
            body["metadata"] = {"resourceVersion": ref.resource_version}
        try:
            await connect().patch(
                resource.Scale, ref.name, body, namespace=ref.namespace, patch_type=PatchType.MERGE
            )
        except ApiError as error:
            if error.status.code == 409:  # changed since we read it: the next table tells us how
                return False
            raise
        return True

    async def close() -> None:
        if client is not None:
            await client.close()

    return patch, close


class Waker:
    """Holds requests for models without a ready replica while waking them from zero."""

    def __init__(
        self,
        settings: GatewaySettings,
        registry: CollectorRegistry,
        table: Callable[[], RouteTable],
        patch: ScalePatch | None = None,
    ) -> None:
        self.settings = settings
        self._table = table
        self.patch_scale = patch
        self._close: Callable[[], Awaitable[None]] | None = None
        self._published = asyncio.Event()
        self._held: dict[str, int] = {}
        self._patching: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._patched_at: dict[tuple[str, str, str | None], float] = {}
        self._confirmed: set[str] = set()
        self.waking: set[str] = set()
        """Models being woken: their requests wait until an endpoint accepted a connection."""
        self.held_gauge = Gauge(
            "argosy_gateway_requests_held",
            "Requests waiting for a model to get a ready replica (scale from zero).",
            ["model"],
            registry=registry,
        )
        self.wakeups = Counter(
            "argosy_gateway_wakeups",
            "Scale-from-zero patches sent, by result (patched, conflict, error).",
            ["model", "result"],
            registry=registry,
        )
        self.held_seconds = Histogram(
            "argosy_gateway_held_seconds",
            "How long requests were held before a replica was ready (or they gave up), by outcome.",
            ["model", "outcome"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )

    def table_published(self, table: RouteTable) -> None:
        """Discovery swapped the table: wake every waiter to look again."""
        if self._confirmed:
            self._confirmed &= table.endpoints()
        self._published.set()
        self._published = asyncio.Event()

    def held(self, model: str) -> int:
        return self._held.get(model, 0)

    async def ready_route(self, route: ModelRoute) -> ModelRoute:
        """A route with endpoints for ``route.name``, after waking the model if it sleeps; raises 503."""
        settings = self.settings
        ref = route.deployment
        if ref is None or not ref.autoscaling:  # not (or no longer) woken by the gateway
            self.waking.discard(route.name)
            if route.endpoints:
                return route
            raise errors.no_ready_replica(route.name, settings.retry_after_seconds)
        model = route.name
        held = self._held.get(model, 0)
        if held >= settings.wake_queue_length:
            self.held_seconds.labels(model, "queue_full").observe(0)
            raise queue_full(model, settings.wake_queue_length, settings.retry_after_seconds)
        self._held[model] = held + 1
        self.waking.add(model)
        gauge = self.held_gauge.labels(model)
        gauge.inc()
        started = time.monotonic()
        outcome = "cancelled"
        deadline = started + settings.wake_timeout_seconds
        try:
            while True:
                current = self._table().get(model)
                if current is None:
                    outcome = "gone"
                    self.waking.discard(model)
                    raise errors.no_ready_replica(model, settings.retry_after_seconds)
                if current.endpoints:
                    listening = await self._listening(current.endpoints)
                    if listening:
                        outcome = "ready"
                        self.waking.discard(model)
                        return dataclasses.replace(current, endpoints=listening)
                if current.deployment is not None:
                    self._wake(model, current.deployment)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome = "timeout"
                    raise wake_timed_out(model, settings.wake_timeout_seconds, settings.retry_after_seconds)
                pause = PROBE_SECONDS if current.endpoints else REPATCH_SECONDS
                with contextlib.suppress(TimeoutError):
                    # Look again on every table, and now and then in case a patch was refused.
                    await asyncio.wait_for(self._published.wait(), min(remaining, pause))
        finally:
            gauge.dec()
            count = self._held.get(model, 1) - 1
            if count > 0:
                self._held[model] = count
            else:
                self._held.pop(model, None)
            self.held_seconds.labels(model, outcome).observe(time.monotonic() - started)

    async def _listening(self, endpoints: tuple[str, ...]) -> tuple[str, ...]:
        """The endpoints that accept a connection, each checked until it did once.

        A held request has waited already; sending it to a replica that is Ready in the API
        but whose server is not listening yet (a readiness gate or probe that lags) would turn
        the wait into a 502. Only held requests pay this, once per new endpoint.
        """
        unknown = [e for e in endpoints if e not in self._confirmed]
        if unknown:
            results = await asyncio.gather(*(_accepts_connections(e) for e in unknown))
            self._confirmed.update(e for e, ok in zip(unknown, results, strict=True) if ok)
        return tuple(e for e in endpoints if e in self._confirmed)

    def _wake(self, model: str, ref: DeploymentRef) -> None:
        """Patch the scale to 1 when it reads 0: once per resourceVersion, one patch in flight per object."""
        if ref.replicas != 0:
            return  # already asked for (by us, another gateway, the autoscaler or a person)
        key = (ref.namespace, ref.name)
        running = self._patching.get(key)
        if running is not None and not running.done():
            return
        version_key = (ref.namespace, ref.name, ref.resource_version)
        now = time.monotonic()
        if now - self._patched_at.get(version_key, -REPATCH_SECONDS) < REPATCH_SECONDS:
            return
        self._patched_at = {k: t for k, t in self._patched_at.items() if now - t < REPATCH_SECONDS}
        self._patched_at[version_key] = now
        self._patching[key] = asyncio.create_task(self._send(model, ref), name=f"wake {ref.namespace}/{ref.name}")

    async def _send(self, model: str, ref: DeploymentRef) -> None:
        if self.patch_scale is None:
            self.patch_scale, self._close = lightkube_scale_patch(self.settings)
        try:
            written = await self.patch_scale(ref)
        except Exception as error:  # the held requests keep waiting; the next look retries
            self.wakeups.labels(model, "error").inc()
            log.warning("cannot wake %s/%s (scale to 1): %s", ref.namespace, ref.name, error)
            return
        finally:
            self._patching.pop((ref.namespace, ref.name), None)
        self.wakeups.labels(model, "patched" if written else "conflict").inc()
        if written:
            log.info("woke %s/%s: scale 0 -> 1 for model %s", ref.namespace, ref.name, model)

    async def close(self) -> None:
        for task in list(self._patching.values()):
            task.cancel()
        if self._close is not None:
            await self._close()
