"""kopf registration: every handler hands off to the Runtime in one line.

kopf provides the watch streams and the in-memory indexes; all triggers end in the
Runtime's work queue, whose single reconcile function does the work (controller.py).
No change-detection handlers (on.create/on.update) and no kopf timers: a timer makes
kopf put a finalizer on every object, which blocks `kubectl delete` whenever the
operator is not running. The work queue's periodic resync gives the same safety net.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from argosy_operator import observe
from argosy_operator.backendkey import LABEL_BACKEND_KEY
from argosy_operator.builders import GPU_PRODUCT_LABEL, LABEL_MANAGED_BY
from argosy_operator.controller import Runtime
from argosy_operator.settings import FIELD_MANAGER, GROUP, PLURAL, VERSION

MANAGED = {LABEL_MANAGED_BY: FIELD_MANAGER}
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={FIELD_MANAGER}"
KOPF_ANNOTATION_PREFIX = "kopf.argosy.dev"
# What the operator creates (ConfigMaps: inline chat templates; StatefulSets: replicas that span
# nodes) and the pods its controllers create: watched by its label, cached, and each change re-runs
# its LLMDeployment's reconcile.
CHILD_RESOURCES = (("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"), ("", "v1", "services"),
                   ("", "v1", "configmaps"), ("", "v1", "pods"))
# The backend-key Secrets (backendkey.py), and no other Secret: watched by both labels.
SECRETS = ("", "v1", "secrets")
BACKEND_KEY_LABELS = {**MANAGED, LABEL_BACKEND_KEY: kopf.PRESENT}


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's "last handled" state, kept nowhere: only change handlers (on.create/on.update) read it.

    The operator registers none (every trigger ends in the work queue, which compares what
    should exist with what does), so each watch event skips the copy and the comparison.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for the embedded operator."""
    # kopf's own bookkeeping (if a handler ever needs it) goes to annotations, which a
    # structural CRD schema does not prune; never to "status.kopf".
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_ANNOTATION_PREFIX)
    # No change handlers, so no diff base: kopf would otherwise deep-copy every watched body
    # (managedFields and all) and parse an annotation on every watch event, for nothing.
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = f"{KOPF_ANNOTATION_PREFIX}/finalizer"
    # We record our own Events for condition transitions; kopf's per-handler ones are noise.
    settings.posting.enabled = False
    # No dynamic discovery of namespaces and CRDs: the watched namespaces are given, the CRD is
    # known, and least-privilege RBAC (the chart) grants neither listing, which kopf would retry.
    settings.scanning.disabled = True
    # Watch only what we own (and only GPU nodes): server-side filtering keeps the
    # operator's memory proportional to its own objects, not to the cluster.
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = MANAGED_SELECTOR
    settings.watching.label_selectors[SECRETS] = f"{MANAGED_SELECTOR},{LABEL_BACKEND_KEY}"
    settings.watching.label_selectors[("", "v1", "nodes")] = GPU_PRODUCT_LABEL
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return runtime.connection_info()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await runtime.stop()

    # Handlers are coroutines: kopf would run plain functions in a thread pool, and the
    # work queue is not thread-safe (nor needs to be).
    # Indexes: the operator's informer caches. Resource handlers below only start once
    # kopf has listed every indexed resource, so the first reconcile sees a full cache.
    @kopf.index(GROUP, VERSION, PLURAL, registry=registry,
                id="argosy_llmdeployments")
    async def argosy_llmdeployments(namespace: str | None, name: str, body: kopf.Body,
                                    **_: Any) -> dict[Any, Any]:
        return {(namespace, name): observe.trim_llmdeployment(body)}

    @kopf.index("", "v1", "nodes", labels={GPU_PRODUCT_LABEL: kopf.PRESENT}, registry=registry,
                id="argosy_gpu_nodes")
    async def argosy_gpu_nodes(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {None: observe.trim_node(body)}

    @kopf.index("apps", "v1", "deployments", labels=MANAGED, registry=registry,
                id="argosy_deployments")
    async def argosy_deployments(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = observe.owner_key(body)
        return {key: observe.trim_child(body)} if key else {}

    @kopf.index("apps", "v1", "statefulsets", labels=MANAGED, registry=registry,
                id="argosy_statefulsets")
    async def argosy_statefulsets(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = observe.owner_key(body)
        return {key: observe.trim_child(body)} if key else {}

    @kopf.index("", "v1", "services", labels=MANAGED, registry=registry,
                id="argosy_services")
    async def argosy_services(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = observe.owner_key(body)
        return {key: observe.trim_child(body)} if key else {}

    @kopf.index("", "v1", "configmaps", labels=MANAGED, registry=registry,
                id="argosy_config_maps")
    async def argosy_config_maps(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = observe.owner_key(body)
        return {key: observe.trim_child(body)} if key else {}

    @kopf.index("", "v1", "pods", labels=MANAGED, registry=registry,
                id="argosy_pods")
    async def argosy_pods(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = observe.owner_key(body)
        return {key: observe.trim_pod(body)} if key else {}

    if runtime.settings.backend_keys:  # off: no Secret is watched (the chart grants none)
        @kopf.index(*SECRETS, labels=BACKEND_KEY_LABELS, registry=registry, id="argosy_backend_keys")
        async def argosy_backend_keys(body: kopf.Body, **_: Any) -> dict[Any, Any]:
            key = observe.owner_key(body)
            return {key: observe.trim_backend_key(body)} if key else {}

    # Triggers.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="llmdeployment_changed")
    async def llmdeployment_changed(namespace: str | None, name: str, **kwargs: Any) -> None:
        runtime.attach_indexes(kwargs)
        if namespace:
            runtime.enqueue((namespace, name))

    async def child_changed(body: kopf.Body, **kwargs: Any) -> None:
        runtime.attach_indexes(kwargs)
        key = observe.owner_key(body)
        if key is not None:
            runtime.enqueue(key)

    for resource in CHILD_RESOURCES:
        kopf.on.event(*resource, labels=MANAGED, registry=registry,
                      id=f"child_changed_{resource[2]}")(child_changed)
    # A deleted or edited backend-key Secret is repaired at once (a deleted one with a new key).
    if runtime.settings.backend_keys:
        kopf.on.event(*SECRETS, labels=BACKEND_KEY_LABELS, registry=registry,
                      id="child_changed_secrets")(child_changed)

    @kopf.on.event("", "v1", "nodes", labels={GPU_PRODUCT_LABEL: kopf.PRESENT}, registry=registry,
                   id="gpu_node_changed")
    async def gpu_node_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
        runtime.attach_indexes(kwargs)
        runtime.node_changed(observe.trim_node(body), deleted=type == "DELETED")

    logging.getLogger(__name__).debug("handlers registered")
