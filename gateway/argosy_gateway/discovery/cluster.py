"""What the gateway knows about the cluster, built from LISTs and watch events. Pure: object
dicts in, route tables out; no Kubernetes client.

The contract with the operator (docs/gateway.md):

- serving pods carry ``app.kubernetes.io/managed-by=argosy-operator``,
  ``argosy.dev/role`` = ``server`` or ``leader``, ``argosy.dev/deployment=<name>`` and the
  annotation ``argosy.dev/served-model-names`` (a JSON list);
- a pod is an endpoint while it is Ready, has an IP and is not being deleted;
  its port is the container port named ``http`` (default 8000);
- an LLMDeployment makes its served names known even with no ready pod (503, not 404);
  its names are ``status.servedModelNames``, else ``spec.model.servedModelNames``, else
  ``metadata.name``; its policy is the annotation ``argosy.dev/routing-policy``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from argosy_gateway.routetable import POLICY_NAMES, DeploymentRef, ModelRoute, RouteTable

log = logging.getLogger(__name__)

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "argosy-operator"
ROLE_LABEL: Final = "argosy.dev/role"
SERVING_ROLES: Final = ("server", "leader")
DEPLOYMENT_LABEL: Final = "argosy.dev/deployment"
SERVED_NAMES_ANNOTATION: Final = "argosy.dev/served-model-names"
POLICY_ANNOTATION: Final = "argosy.dev/routing-policy"
HTTP_PORT_NAME: Final = "http"
DEFAULT_PORT: Final = 8000
PODS: Final = "pods"
DEPLOYMENTS: Final = "llmdeployments"
POD_LABEL_SELECTOR: Final = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{ROLE_LABEL} in ({','.join(SERVING_ROLES)})"

Body = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    deployment: str | None
    served_names: tuple[str, ...] | None  # None: take the LLMDeployment's names
    endpoint: str | None  # None while the pod is not ready to serve


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    namespace: str
    name: str
    served_names: tuple[str, ...]
    policy: str | None
    ref: DeploymentRef | None = None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _names(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(dict.fromkeys(value))
    return None


def object_key(body: Body) -> str:
    metadata = _mapping(body.get("metadata"))
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def pod_info(body: Body) -> PodInfo:
    metadata = _mapping(body.get("metadata"))
    labels = _mapping(metadata.get("labels"))
    annotations = _mapping(metadata.get("annotations"))
    status = _mapping(body.get("status"))
    served: tuple[str, ...] | None = None
    raw_names = annotations.get(SERVED_NAMES_ANNOTATION)
    if isinstance(raw_names, str):
        try:
            served = _names(json.loads(raw_names))
        except ValueError:
            served = None
        if served is None:
            log.warning("pod %s: ignoring a malformed %s annotation", object_key(body), SERVED_NAMES_ANNOTATION)
    ready = (
        labels.get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE
        and labels.get(ROLE_LABEL) in SERVING_ROLES
        and not metadata.get("deletionTimestamp")
        and status.get("phase") == "Running"
        and any(
            isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
    )
    ip = status.get("podIP")
    endpoint = None
    if ready and isinstance(ip, str) and ip:
        host = f"[{ip}]" if ":" in ip else ip
        endpoint = f"http://{host}:{_http_port(body)}"
    deployment = labels.get(DEPLOYMENT_LABEL)
    return PodInfo(
        namespace=str(metadata.get("namespace", "")),
        deployment=deployment if isinstance(deployment, str) else None,
        served_names=served,
        endpoint=endpoint,
    )


def _http_port(body: Body) -> int:
    for container in _mapping(body.get("spec")).get("containers") or ():
        for port in _mapping(container).get("ports") or ():
            port = _mapping(port)
            number = port.get("containerPort")
            if port.get("name") == HTTP_PORT_NAME and isinstance(number, int) and 0 < number < 65536:
                return number
    return DEFAULT_PORT


def deployment_info(body: Body) -> DeploymentInfo:
    metadata = _mapping(body.get("metadata"))
    name = str(metadata.get("name", ""))
    served = (
        _names(_mapping(body.get("status")).get("servedModelNames"))
        or _names(_mapping(_mapping(body.get("spec")).get("model")).get("servedModelNames"))
        or ((name,) if name else ())
    )
    policy = _mapping(metadata.get("annotations")).get(POLICY_ANNOTATION)
    if policy is not None and policy not in POLICY_NAMES:
        log.warning("LLMDeployment %s: unknown routing policy %r, using the default", object_key(body), policy)
        policy = None
    spec = _mapping(body.get("spec"))
    replicas = spec.get("replicas")
    version = metadata.get("resourceVersion")
    ref = DeploymentRef(
        namespace=str(metadata.get("namespace", "")),
        name=name,
        replicas=replicas if isinstance(replicas, int) else None,
        autoscaling=_mapping(spec.get("autoscaling")).get("enabled") is True,
        resource_version=version if isinstance(version, str) else None,
    )
    return DeploymentInfo(
        namespace=str(metadata.get("namespace", "")),
        name=name,
        served_names=served,
        policy=policy if isinstance(policy, str) else None,
        ref=ref,
    )


class ClusterState:
    """Pods and LLMDeployments by ``namespace/name``; bounded by what exists in the cluster."""

    def __init__(self) -> None:
        self.pods: dict[str, PodInfo] = {}
        self.deployments: dict[str, DeploymentInfo] = {}

    def apply(self, resource: str, event_type: str | None, body: Body) -> bool:
        """Apply one watch event to ``resource`` (PODS or DEPLOYMENTS); True when routes may change."""
        if resource == PODS:
            return self.apply_pod_event(event_type, body)
        return self.apply_deployment_event(event_type, body)

    def replace(self, resource: str, namespace: str | None, bodies: Iterable[Body]) -> None:
        """A fresh LIST of ``resource`` in ``namespace`` (None: every namespace) replaces, in one
        step, everything known of it there: objects deleted while no watch ran are gone."""
        known: dict[str, Any] = self.pods if resource == PODS else self.deployments
        info = pod_info if resource == PODS else deployment_info
        fresh = {object_key(body): info(body) for body in bodies}
        if namespace is None:
            known.clear()
        else:
            for key in [k for k, v in known.items() if v.namespace == namespace]:
                del known[key]
        known.update(fresh)

    def apply_pod_event(self, event_type: str | None, body: Body) -> bool:
        """Apply one watch event (type ADDED/MODIFIED/DELETED, or None while listing).

        Returns True when the routes may have changed.
        """
        key = object_key(body)
        if event_type == "DELETED":
            return self.pods.pop(key, None) is not None
        info = pod_info(body)
        if self.pods.get(key) == info:
            return False
        self.pods[key] = info
        return True

    def apply_deployment_event(self, event_type: str | None, body: Body) -> bool:
        key = object_key(body)
        if event_type == "DELETED":
            return self.deployments.pop(key, None) is not None
        info = deployment_info(body)
        if self.deployments.get(key) == info:
            return False
        self.deployments[key] = info
        return True

    def route_table(self, default_policy: str) -> RouteTable:
        endpoints: dict[str, list[str]] = {}
        policies: dict[str, str] = {}
        refs: dict[str, DeploymentRef] = {}
        for deployment in sorted(self.deployments.values(), key=lambda d: (d.namespace, d.name)):
            for name in deployment.served_names:
                endpoints.setdefault(name, [])
                if deployment.ref is not None:
                    refs.setdefault(name, deployment.ref)
                if deployment.policy is not None:
                    policies.setdefault(name, deployment.policy)
        for key in sorted(self.pods):
            pod = self.pods[key]
            if pod.endpoint is None:
                continue
            owner = self.deployments.get(f"{pod.namespace}/{pod.deployment}") if pod.deployment else None
            names = pod.served_names or (owner.served_names if owner is not None else ())
            for name in names:
                listed = endpoints.setdefault(name, [])
                if pod.endpoint not in listed:
                    listed.append(pod.endpoint)
                if owner is not None and owner.policy is not None:
                    policies.setdefault(name, owner.policy)
        return RouteTable.build(
            ModelRoute(name, tuple(urls), policies.get(name, default_policy), refs.get(name))
            for name, urls in endpoints.items()
        )
