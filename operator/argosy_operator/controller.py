"""The controller: the work queue, the periodic resync and the reconcile of one key.

kopf feeds it (handlers.py); it owns the per-process state: the API client shared
with kopf's login, the metrics, and references to kopf's indexes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from argosy_operator import observe
from argosy_operator.hubfacts import HubFacts
from argosy_operator.kubeapi import Credentials, KubeApi, kopf_connection_info
from argosy_operator.leader import LeaderElector, default_identity
from argosy_operator.metrics import OperatorMetrics
from argosy_operator.reconcile import ReconcileContext, reconcile
from argosy_operator.settings import OperatorSettings
from argosy_operator.workqueue import Outcome, WorkQueue, outcome_label

logger = logging.getLogger(__name__)

INDEX_NAMES = ("argosy_llmdeployments", "argosy_gpu_nodes", "argosy_deployments", "argosy_statefulsets",
               "argosy_services", "argosy_config_maps", "argosy_pods", "argosy_backend_keys")


class _Children(Mapping[Any, tuple[Any, ...]]):
    """Deployments, StatefulSets, Services and ConfigMaps of one owner, read through their indexes."""

    def __init__(self, *indexes: Mapping[Any, Any]) -> None:
        self._indexes = indexes

    def __getitem__(self, key: Any) -> tuple[Any, ...]:
        found: list[Any] = []
        for index in self._indexes:
            store = index.get(key)
            if store is not None:
                found.extend(store)
        if not found:
            raise KeyError(key)
        return tuple(found)

    def __iter__(self) -> Any:
        seen: set[Any] = set()
        for index in self._indexes:
            for key in index:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Runtime:
    def __init__(
        self, settings: OperatorSettings, credentials: Credentials, metrics: OperatorMetrics
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.metrics = metrics
        self.api = KubeApi(
            credentials, observe=lambda method, seconds: metrics.api_latency.labels(method).observe(seconds))
        self.queue: WorkQueue[observe.ObjectKey] = WorkQueue(
            self._process, workers=settings.workers, on_depth=metrics.queue_depth.set)
        self._indexes: dict[str, Mapping[Any, Any]] = {}
        self._node_views: dict[str, tuple[Any, ...]] = {}
        # The GPU nodes as the last pass saw them, and what sticky placement reads of them:
        # computed again only when kopf's index holds other node objects (a node event).
        self._node_tables = observe.NodeTables()
        self._resync_handle: asyncio.TimerHandle | None = None
        self._synced = False
        self._stopping: asyncio.Task[None] | None = None
        self.ctx = ReconcileContext(api=self.api, metrics=metrics, backend_keys=settings.backend_keys,
                                    hub=HubFacts(self.api, enabled=settings.hub_lookup,
                                                 endpoint=settings.hub_endpoint))
        # Without leader election this process is the only operator and leads from the start;
        # with it, it stands by (watching, never writing) until it holds the Lease.
        self.elector: LeaderElector | None = None
        self.leading = not settings.leader_election
        if settings.leader_election:
            self.elector = LeaderElector(
                self.api,
                namespace=settings.lease_namespace or credentials.namespace,
                name=settings.lease_name,
                identity=default_identity(),
                on_started=self.start_leading,
                on_stopped=self.stop_leading,
            )
        metrics.leader.set(1 if self.leading else 0)

    def begin(self) -> None:
        """Start campaigning for the Lease (a no-op without leader election); needs the event loop."""
        if self.elector is not None:
            self.elector.start()

    # -- leadership ----------------------------------------------------------------

    def start_leading(self) -> None:
        self.leading = True
        self.metrics.leader.set(1)
        if self._stopping is not None and not self._stopping.done():
            self._stopping.add_done_callback(lambda _: self._start_work())
        else:
            self._start_work()

    def stop_leading(self) -> None:
        """Stop every reconcile now (cancelling passes in flight) and write nothing more."""
        self.leading = False
        self.metrics.leader.set(0)
        if self._resync_handle is not None:
            self._resync_handle.cancel()
            self._resync_handle = None
        self._stopping = asyncio.create_task(self.queue.stop(), name="stop-reconciling")

    def _start_work(self) -> None:
        if not (self._synced and self.leading):
            return
        self.queue.start()
        self._enqueue_all()  # a new leader owes every object a pass; the queue de-duplicates
        if self._resync_handle is None:
            self._resync_handle = asyncio.get_running_loop().call_later(
                self.settings.resync_seconds, self._schedule_resync)

    # -- kopf side ---------------------------------------------------------------

    def connection_info(self) -> kopf.ConnectionInfo:
        return kopf_connection_info(self.credentials)

    def attach_indexes(self, kwargs: Mapping[str, Any]) -> None:
        """Keep references to kopf's indexes (live mappings) and start working.

        kopf calls resource handlers only after every index finished its initial
        listing, so the first call is the moment the caches are complete.
        """
        if self._synced:
            return
        wanted = INDEX_NAMES if self.settings.backend_keys else INDEX_NAMES[:-1]
        missing = [n for n in wanted if n not in kwargs]
        if missing:
            raise RuntimeError(f"kopf did not pass the indexes {missing}")
        self._indexes = {n: kwargs[n] for n in wanted}
        self._synced = True
        logger.info("caches synced: %d LLMDeployments, %d GPU nodes; %s",
                    len(self._indexes["argosy_llmdeployments"]),
                    len(tuple(self._indexes["argosy_gpu_nodes"].get(None, ()))),
                    "reconciling" if self.leading else "standing by until this replica holds the Lease")
        self._start_work()

    def autoscaling_snapshot(self) -> tuple[list[Any], Any] | None:
        """Every LLMDeployment, and the pods index (pods by owner), from the watch caches; None until synced.

        The autoscaler reads these each look instead of listing them from the API server, and
        takes from the pods index only the owners it looks at, before it next awaits anything.
        """
        if not self._synced:
            return None
        deployments = self._indexes["argosy_llmdeployments"]
        return [body for key in list(deployments) for body in deployments.get(key, ())], self._indexes["argosy_pods"]

    def enqueue(self, key: observe.ObjectKey) -> None:
        if self.leading:  # a standby queues nothing: start_leading enqueues every object
            self.queue.add(key)

    def node_changed(self, node: Mapping[str, Any], *, deleted: bool) -> None:
        """GPU inventory changed (not just a heartbeat): every placement's capacity is checked again.

        Placements are sticky (sticky.py): this re-plans nothing; it updates Degraded.
        """
        name = str(node["metadata"]["name"])
        view = None if deleted else observe.gpu_view(node)
        before = self._node_views.pop(name, None) if deleted else self._node_views.get(name)
        if view is not None:
            self._node_views[name] = view
        if before != view and self._synced and self.leading:
            self._enqueue_all()  # the queue de-duplicates, so a burst of node events is cheap

    def _enqueue_all(self) -> None:
        index = self._indexes.get("argosy_llmdeployments")
        if index is None:
            return
        keys = list(index)
        self.metrics.managed.set(len(keys))
        self.queue.resync(keys)

    def _schedule_resync(self) -> None:
        self._enqueue_all()
        loop = asyncio.get_running_loop()
        self._resync_handle = loop.call_later(self.settings.resync_seconds, self._schedule_resync)

    async def stop(self) -> None:
        if self._resync_handle is not None:
            self._resync_handle.cancel()
        await self.queue.stop()  # no pass is running when the Lease is released
        if self.elector is not None:
            await self.elector.stop()
        if self._stopping is not None:
            await asyncio.gather(self._stopping, return_exceptions=True)
        await self.api.close()

    # -- the work ----------------------------------------------------------------

    def observation(self, key: observe.ObjectKey) -> observe.Observation:
        idx = self._indexes
        obs = observe.observe(
            key,
            idx.get("argosy_llmdeployments"),
            idx.get("argosy_gpu_nodes"),
            _Children(idx["argosy_deployments"], idx["argosy_statefulsets"], idx["argosy_services"],
                      idx["argosy_config_maps"]),
            idx.get("argosy_pods"),
            idx.get("argosy_backend_keys"),
        )
        self._node_tables = tables = self._node_tables.current(obs.nodes)
        return dataclasses.replace(obs, gpus=tables.gpus, pools=tables.pools)

    async def _process(self, key: observe.ObjectKey) -> Outcome:
        started = time.perf_counter()
        result = "error"
        try:
            outcome = await reconcile(self.ctx, self.observation(key))
            result = outcome_label(outcome)
            return outcome
        except Exception as e:
            self.metrics.errors.labels(type(e).__name__).inc()
            raise
        finally:
            self.metrics.reconciles.labels(result).inc()
            self.metrics.duration.observe(time.perf_counter() - started)
