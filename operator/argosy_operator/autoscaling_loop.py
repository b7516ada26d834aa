"""The autoscaler's I/O: look at the load every few seconds and write the scale subresource.

Each look reads the LLMDeployments and their serving pods (servers and multi-node leaders,
never workers) from the operator's watch caches (no API call; a LIST only when the loop runs
without them), reads ``/metrics`` of every ready one and, when configured, of the
gateways (requests held while a model wakes), hands the numbers to the pure
``autoscaler.decide`` and carries out its decision:

- a changed replica count is a patch of ``llmdeployments/scale`` with the object's
  resourceVersion as precondition (a gateway that woke the model meanwhile wins; the
  next look sees its write), and an Event with the numbers behind it;
- the decision and the stabilization windows go to ``status.autoscaling`` (a merge patch
  of that key only), so a restarted operator continues where this one stopped.

Settings (environment): ``ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS`` (default 15),
``ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_METRICS`` (comma-separated /metrics URLs of the
gateways) and ``ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_SELECTOR`` (a label selector of
gateway pods in ``..._GATEWAY_NAMESPACE``, read on ``..._GATEWAY_PORT``, default 8080;
the chart sets these three).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from argosy_operator import autoscaler
from argosy_operator.api import AutoscalingSpec, AutoscalingStatus
from argosy_operator.settings import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION, OperatorSettings

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 15.0
DEFAULT_GATEWAY_PORT = 8080
SCRAPE_TIMEOUT_SECONDS = 3.0
# Servers and multi-node leaders; never workers (they serve no HTTP).
SERVING_PODS: dict[str, str | list[str]] = {
    "app.kubernetes.io/managed-by": "argosy-operator",
    "argosy.dev/role": ["server", "leader"],
}
DEPLOYMENT_LABEL = "argosy.dev/deployment"

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
FINISHED = "vllm:request_success_total"
HELD = "argosy_gateway_requests_held"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    gateway_metrics_urls: tuple[str, ...] = ()
    gateway_selector: str | None = None
    gateway_namespace: str | None = None
    """Where the gateway pods run; None: the watched namespaces."""
    gateway_port: int = DEFAULT_GATEWAY_PORT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LoopSettings:
        env = os.environ if env is None else env
        prefix = "ARGOSY_OPERATOR_AUTOSCALER_"
        urls = tuple(u.strip() for u in env.get(prefix + "GATEWAY_METRICS", "").split(",") if u.strip())
        interval = float(env.get(prefix + "INTERVAL_SECONDS") or DEFAULT_INTERVAL_SECONDS)
        if interval <= 0:
            raise ValueError(f"{prefix}INTERVAL_SECONDS must be positive, not {interval:g}")
        selector = env.get(prefix + "GATEWAY_SELECTOR") or None
        parse_selector(selector)  # a bad selector fails at start, not at every look
        return cls(
            interval_seconds=interval,
            gateway_metrics_urls=urls,
            gateway_selector=selector,
            gateway_namespace=env.get(prefix + "GATEWAY_NAMESPACE") or None,
            gateway_port=int(env.get(prefix + "GATEWAY_PORT") or DEFAULT_GATEWAY_PORT),
        )


# -- reading what the cluster says (plain dicts in, plain values out) ---------------------------


def _samples(text: str) -> Iterable[tuple[str, Mapping[str, str], float]]:
    # By sample name: the parser groups families by TYPE lines, which vLLM's colon names and
    # counters' _total suffix do not always line up with.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def parse_vllm_metrics(text: str) -> tuple[float, float, float | None]:
    """(running, waiting, finished) summed over the engines of one /metrics page."""
    running = waiting = 0.0
    finished: float | None = None
    for name, _, value in _samples(text):
        if name == RUNNING:
            running += value
        elif name == WAITING:
            waiting += value
        elif name == FINISHED:
            finished = (finished or 0.0) + value
    return running, waiting, finished


def parse_held(text: str) -> dict[str, float]:
    """Requests held per model name on one gateway's /metrics page."""
    held: dict[str, float] = {}
    for name, labels, value in _samples(text):
        if name == HELD:
            model = labels.get("model", "")
            held[model] = held.get(model, 0.0) + value
    return held


def _ready_endpoint(pod: Mapping[str, Any]) -> str | None:
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    if metadata.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()):
        return None
    port = 8000
    for container in (pod.get("spec") or {}).get("containers") or ():
        for p in container.get("ports") or ():
            if p.get("name") == "http" and isinstance(p.get("containerPort"), int):
                port = p["containerPort"]
    ip = str(status["podIP"])
    return f"http://{f'[{ip}]' if ':' in ip else ip}:{port}/metrics"


def served_names(body: Mapping[str, Any]) -> list[str]:
    status, spec = body.get("status") or {}, body.get("spec") or {}
    names = status.get("servedModelNames") or (spec.get("model") or {}).get("servedModelNames")
    return list(names) if names else [str(body["metadata"]["name"])]


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(int(seconds), UTC).isoformat().replace("+00:00", "Z")


def restored_state(status: AutoscalingStatus | None) -> autoscaler.State:
    """The autoscaler's memory as status.autoscaling kept it (after an operator restart)."""
    if status is None:
        return autoscaler.State()
    return autoscaler.State(
        desired_replicas=status.desired_replicas,
        last_active=_timestamp(status.last_active_time),
        recommendations=tuple((float(t), int(r)) for t, r in status.recommendations),
    )


def status_patch(decision: autoscaler.Decision, last_scale_time: float | None) -> dict[str, Any]:
    state = decision.state
    return {
        "status": {
            "autoscaling": {
                "desiredReplicas": decision.replicas,
                "lastScaleTime": _iso(last_scale_time),
                "lastActiveTime": _iso(state.last_active),
                "inFlight": decision.in_flight,
                "message": decision.message[:4096],
                "recommendations": [[int(t), r] for t, r in state.recommendations],
            }
        }
    }


def settings_of(spec: AutoscalingSpec) -> autoscaler.Settings:
    return autoscaler.Settings(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        target_in_flight_per_replica=spec.target_in_flight_per_replica,
        scale_up_window_seconds=spec.scale_up_window_seconds,
        scale_down_window_seconds=spec.scale_down_window_seconds,
        scale_to_zero_after_seconds=spec.scale_to_zero_after_seconds,
    )


# -- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Memory:
    state: autoscaler.State
    persisted: autoscaler.State
    last_scale_time: float | None = None


PodsByOwner = Mapping[tuple[str, str], Iterable[Mapping[str, Any]]]
Snapshot = tuple[Iterable[Mapping[str, Any]], PodsByOwner]
"""What the operator's watch caches hold: every LLMDeployment, and the pods of each, by (namespace, name)."""


class AutoscalingLoop:
    """One task: every interval, one decision per LLMDeployment with spec.autoscaling.enabled."""

    def __init__(
        self,
        settings: OperatorSettings,
        loop_settings: LoopSettings,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
        is_leader: Callable[[], bool] = lambda: True,
        client: Any = None,
        snapshot: Callable[[], Snapshot | None] | None = None,
    ) -> None:
        self.is_leader = is_leader
        """Only the operator replica holding the Lease scales (a standby looks at nothing)."""
        self._snapshot = snapshot
        """The operator's caches (None from it until they are synced); without it, each look LISTs."""
        self.settings = settings
        self.loop_settings = loop_settings
        self._clock = clock
        self._memory: dict[str, _Memory] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: Any = client
        """The operator's own lightkube AsyncClient (kubeapi.KubeApi.client): one client, one login."""
        self._owns_client = client is None
        self._http: aiohttp.ClientSession | None = None
        labels = ["namespace", "llmdeployment", "model"]
        self.desired = Gauge("argosy_operator_autoscaler_desired_replicas",
                             "Replicas the autoscaler wants.", labels, registry=registry)
        self.ready = Gauge("argosy_operator_autoscaler_ready_replicas",
                           "Ready serving replicas the autoscaler saw.", labels, registry=registry)
        self.in_flight = Gauge("argosy_operator_autoscaler_in_flight_requests",
                               "Requests running, waiting and held in the gateway at the last look.",
                               labels, registry=registry)
        self.decisions = Counter("argosy_operator_autoscaler_decisions",
                                 "Replica changes the autoscaler made, by reason.", [*labels, "reason"],
                                 registry=registry)
        self.scrape_errors = Counter("argosy_operator_autoscaler_scrape_errors",
                                     "Serving pods or gateways whose /metrics could not be read.",
                                     ["target"], registry=registry)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()
        if self._client is not None and self._owns_client:
            await self._client.close()

    async def _run(self) -> None:
        log.info("autoscaler: a look every %gs", self.loop_settings.interval_seconds)
        while True:
            started = time.monotonic()
            try:
                if self.is_leader():
                    await self.look()
            except Exception:  # one bad look must not end autoscaling; the next one retries
                log.exception("autoscaler look failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.loop_settings.interval_seconds - elapsed))

    # -- I/O -----------------------------------------------------------------------------------

    def _kube(self) -> Any:
        if self._client is None:
            from lightkube import AsyncClient, KubeConfig

            kubeconfig = self.settings.kubeconfig
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            self._client = AsyncClient(config, field_manager=FIELD_MANAGER, trust_env=False)
        return self._client

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS))
        return self._http

    async def _list(self, resource: Any, labels: Mapping[str, Any] | None = None,
                    namespace: str | None = None) -> list[dict[str, Any]]:
        from lightkube.core.generic_client import ALL_NS

        client = self._kube()
        namespaces: Iterable[Any] = (namespace,) if namespace else self.settings.namespaces or (ALL_NS,)
        found: list[dict[str, Any]] = []
        for namespace in namespaces:
            async for item in client.list(resource, namespace=namespace, labels=labels):
                found.append(item if isinstance(item, dict) else item.to_dict())
        return found

    async def _scrape(self, url: str, target: str) -> str | None:
        try:
            async with self._session().get(url) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                return await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            self.scrape_errors.labels(target).inc()
            log.debug("cannot read %s: %s", url, error)
            return None

    async def _held_by_model(self) -> dict[str, float]:
        urls = list(self.loop_settings.gateway_metrics_urls)
        if self.loop_settings.gateway_selector:
            selector = parse_selector(self.loop_settings.gateway_selector)
            for pod in await self._list(_pods(), selector, self.loop_settings.gateway_namespace):
                status = pod.get("status") or {}
                if status.get("podIP") and not (pod.get("metadata") or {}).get("deletionTimestamp"):
                    urls.append(f"http://{status['podIP']}:{self.loop_settings.gateway_port}/metrics")
        held: dict[str, float] = {}
        for text in await asyncio.gather(*(self._scrape(u, "gateway") for u in urls)):
            for model, count in parse_held(text or "").items():
                held[model] = held.get(model, 0.0) + count
        return held

    async def look(self) -> None:
        """One look at every autoscaled LLMDeployment."""
        from lightkube.generic_resource import create_namespaced_resource

        resource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
        snapshot = self._snapshot() if self._snapshot is not None else None
        if self._snapshot is not None and snapshot is None:
            return  # the caches are not synced yet: deciding on a partial view could scale down
        everything = snapshot[0] if snapshot is not None else await self._list(resource)
        deployments = [dict(d) for d in everything
                       if ((d.get("spec") or {}).get("autoscaling") or {}).get("enabled") is True]
        alive = {_key(d) for d in deployments}
        for key in set(self._memory) - alive:
            del self._memory[key]
        if not deployments:
            return
        if snapshot is not None:
            cached = snapshot[1]  # every model's pods: copy only those of the models looked at
            keys = ((str(d["metadata"]["namespace"]), str(d["metadata"]["name"])) for d in deployments)
            pods_by_owner = {key: [dict(p) for p in cached.get(key, ()) if is_serving(p)] for key in keys}
        else:
            pods_by_owner = {}
            for pod in await self._list(_pods(), SERVING_PODS):
                metadata = pod.get("metadata") or {}
                owner = (metadata.get("labels") or {}).get(DEPLOYMENT_LABEL)
                if owner:
                    pods_by_owner.setdefault((str(metadata.get("namespace")), str(owner)), []).append(pod)
        held = await self._held_by_model()
        await asyncio.gather(*(self._decide_one(resource, d, pods_by_owner, held) for d in deployments))

    async def _decide_one(
        self,
        resource: Any,
        body: dict[str, Any],
        pods_by_owner: Mapping[tuple[str, str], list[dict[str, Any]]],
        held: Mapping[str, float],
    ) -> None:
        metadata = body["metadata"]
        namespace, name = str(metadata["namespace"]), str(metadata["name"])
        try:
            spec = AutoscalingSpec.model_validate(body["spec"]["autoscaling"])
            status = AutoscalingStatus.model_validate((body.get("status") or {}).get("autoscaling") or {})
        except ValidationError as error:
            log.warning("%s/%s: cannot autoscale, spec.autoscaling is invalid: %s", namespace, name, error)
            return
        key = _key(body)
        memory = self._memory.get(key)
        if memory is None:
            restored = restored_state(status if (body.get("status") or {}).get("autoscaling") else None)
            memory = self._memory[key] = _Memory(restored, restored, _timestamp(status.last_scale_time))
        endpoints = [(p["metadata"]["name"], _ready_endpoint(p)) for p in pods_by_owner.get((namespace, name), [])]
        ready = [(pod, url) for pod, url in endpoints if url is not None]
        pages = await asyncio.gather(*(self._scrape(url, "pod") for _, url in ready))
        samples: list[autoscaler.PodSample] = []
        unreachable = 0
        for (pod, _), page in zip(ready, pages, strict=True):
            if page is None:
                unreachable += 1
                continue
            running, waiting, finished = parse_vllm_metrics(page)
            samples.append(autoscaler.PodSample(pod, running, waiting, finished))
        names = served_names(body)
        replicas = int((body.get("spec") or {}).get("replicas", 1))
        observation = autoscaler.Observation(
            now=self._clock(),
            current_replicas=replicas,
            ready_replicas=len(ready),
            samples=tuple(samples),
            unreachable=unreachable,
            held=math.ceil(sum(held.get(n, 0.0) for n in names)),
        )
        decision = autoscaler.decide(settings_of(spec), observation, memory.state)
        labels = (namespace, name, names[0])
        self.desired.labels(*labels).set(decision.replicas)
        self.ready.labels(*labels).set(len(ready))
        self.in_flight.labels(*labels).set(decision.in_flight)

        if decision.changed:
            if not await write_scale(self._kube(), resource, namespace, name, decision.replicas,
                                     metadata.get("resourceVersion")):
                log.info("%s/%s: replicas changed meanwhile; deciding again next look", namespace, name)
                return  # keep the old state: this decision did not happen
            memory.last_scale_time = observation.now
            self.decisions.labels(*labels, decision.reason).inc()
            log.info("%s/%s: %s", namespace, name, decision.message)
            await self._event(body, decision)
        memory.state = decision.state
        if decision.changed or autoscaler.persisted_differs(memory.persisted, decision.state, settings_of(spec)):
            await self._write_status(resource, namespace, name, decision, memory.last_scale_time)
            memory.persisted = decision.state

    async def _write_status(self, resource: Any, namespace: str, name: str, decision: autoscaler.Decision,
                            last_scale_time: float | None) -> None:
        from lightkube.core.exceptions import ApiError
        from lightkube.types import PatchType

        try:
            await self._kube().patch(resource.Status, name, status_patch(decision, last_scale_time),
                                     namespace=namespace, patch_type=PatchType.MERGE)
        except ApiError as error:
            log.warning("%s/%s: cannot record the autoscaler's state: %s", namespace, name, error)

    async def _event(self, body: Mapping[str, Any], decision: autoscaler.Decision) -> None:
        from lightkube.core.exceptions import ApiError

        try:
            await self._kube().create(event_for(body, decision, self._clock()))
        except ApiError as error:  # Events are best effort
            log.debug("cannot post the autoscaler's Event: %s", error)


async def write_scale(client: Any, resource: Any, namespace: str, name: str, replicas: int,
                      resource_version: str | None) -> bool:
    """Set replicas through the scale subresource; False when the object changed since it was read.

    The one write of the autoscaler (kept small so the client can be swapped).
    """
    from lightkube.core.exceptions import ApiError
    from lightkube.types import PatchType

    body: dict[str, Any] = {"spec": {"replicas": replicas}}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        await client.patch(resource.Scale, name, body, namespace=namespace, patch_type=PatchType.MERGE)
    except ApiError as error:
        if error.status.code in (404, 409):
            return False
        raise
    return True


def event_for(body: Mapping[str, Any], decision: autoscaler.Decision, now: float) -> Any:
    from lightkube.models.core_v1 import EventSource, ObjectReference
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Event

    metadata = body["metadata"]
    stamp = datetime.fromtimestamp(now, UTC)
    return Event(
        metadata=ObjectMeta(generateName=f"{metadata['name']}.", namespace=metadata["namespace"]),
        involvedObject=ObjectReference(
            apiVersion=f"{GROUP}/{VERSION}", kind=KIND, name=metadata["name"], namespace=metadata["namespace"],
            uid=metadata.get("uid"), resourceVersion=metadata.get("resourceVersion"),
        ),
        reason=decision.reason,
        message=decision.message[:1024],
        type="Normal",
        source=EventSource(component=FIELD_MANAGER),
        firstTimestamp=stamp,
        lastTimestamp=stamp,
        count=1,
        reportingComponent=FIELD_MANAGER,
    )


def is_serving(pod: Mapping[str, Any]) -> bool:
    """A server or a group leader made by the operator (SERVING_PODS' labels): what the autoscaler reads."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (labels.get("app.kubernetes.io/managed-by") == SERVING_PODS["app.kubernetes.io/managed-by"]
            and labels.get("argosy.dev/role") in SERVING_PODS["argosy.dev/role"])


def _key(body: Mapping[str, Any]) -> str:
    metadata = body["metadata"]
    return f"{metadata['namespace']}/{metadata['name']}/{metadata.get('uid', '')}"


def _pods() -> Any:
    from lightkube.resources.core_v1 import Pod

    return Pod


def parse_selector(selector: str | None) -> dict[str, str] | None:
    """`a=b,c=d` as lightkube's label filter (equality terms only: gateway pods are found by labels)."""
    if not selector:
        return None
    labels: dict[str, str] = {}
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        if not sep or not key.strip() or any(c in term for c in "!()"):
            raise ValueError(f"label selector term {term!r}: only key=value terms are supported")
        labels[key.strip()] = value.strip().lstrip("=")
    return labels


def start_autoscaling(settings: OperatorSettings, registry: CollectorRegistry,
                      is_leader: Callable[[], bool] = lambda: True, client: Any = None,
                      snapshot: Callable[[], Snapshot | None] | None = None) -> AutoscalingLoop:
    """The operator runtime's one hook: start the loop now; ``await loop.stop()`` on the way out."""
    loop = AutoscalingLoop(settings, LoopSettings.from_env(), registry, is_leader=is_leader, client=client,
                           snapshot=snapshot)
    loop.start()
    return loop
