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
  ``metadata.name``; its policy is the annotation ``argosy.dev/routing-policy``;
- a pod with the annotation ``argosy.dev/backend-key-id`` demands that key (vLLM's
  VLLM_API_KEY): it is the entry ``key-<id>`` of the Secret labelled
  ``argosy.dev/backend-key=<deployment>`` in its namespace. The gateway sends it as the
  bearer token, and routes no request to such a pod before it has read the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
BACKEND_KEY_LABEL: Final = "argosy.dev/backend-key"
BACKEND_KEY_ID_ANNOTATION: Final = "argosy.dev/backend-key-id"
BACKEND_KEY_ENTRY_PREFIX: Final = "key-"
HTTP_PORT_NAME: Final = "http"
DEFAULT_PORT: Final = 8000
PODS: Final = "pods"
DEPLOYMENTS: Final = "llmdeployments"
SECRETS: Final = "secrets"
POD_LABEL_SELECTOR: Final = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{ROLE_LABEL} in ({','.join(SERVING_ROLES)})"

Body = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    deployment: str | None
    served_names: tuple[str, ...] | None  # None: take the LLMDeployment's names
    endpoint: str | None  # None while the pod is not ready to serve
    backend_key_id: str | None = None  # the key it demands (argosy.dev/backend-key-id); None: none


@dataclass(frozen=True, slots=True)
class BackendKeys:
    """One LLMDeployment's backend keys (its Secret), by id."""

    namespace: str
    deployment: str
    keys: Mapping[str, str] = field(repr=False)  # never in a log line


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
    key_id = annotations.get(BACKEND_KEY_ID_ANNOTATION)
    return PodInfo(
        namespace=str(metadata.get("namespace", "")),
        deployment=deployment if isinstance(deployment, str) else None,
        served_names=served,
        endpoint=endpoint,
        backend_key_id=key_id if isinstance(key_id, str) and key_id else None,
    )


def backend_keys(body: Body) -> BackendKeys:
    """The keys of a backend-key Secret (its ``data`` is base64, as the API returns it)."""
    metadata = _mapping(body.get("metadata"))
    keys: dict[str, str] = {}
    for entry, value in _mapping(body.get("data")).items():
        if not (isinstance(entry, str) and entry.startswith(BACKEND_KEY_ENTRY_PREFIX) and isinstance(value, str)):
            continue
        try:
            keys[entry[len(BACKEND_KEY_ENTRY_PREFIX) :]] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.warning("Secret %s: ignoring the malformed entry %s", object_key(body), entry)
    deployment = _mapping(metadata.get("labels")).get(BACKEND_KEY_LABEL)
    return BackendKeys(
        namespace=str(metadata.get("namespace", "")),
        deployment=deployment if isinstance(deployment, str) else "",
        keys=keys,
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
        self.secrets: dict[str, BackendKeys] = {}

    def _store(self, resource: str) -> tuple[dict[str, Any], Any]:
        if resource == PODS:
            return self.pods, pod_info
        if resource == SECRETS:
            return self.secrets, backend_keys
        return self.deployments, deployment_info

    def apply(self, resource: str, event_type: str | None, body: Body) -> bool:
        """Apply one watch event (type ADDED/MODIFIED/DELETED, or None while listing) to ``resource``
        (PODS, DEPLOYMENTS or SECRETS); True when the routes may have changed."""
        known, info_of = self._store(resource)
        key = object_key(body)
        if event_type == "DELETED":
            return known.pop(key, None) is not None
        info = info_of(body)
        if known.get(key) == info:
            return False
        known[key] = info
        return True

    def replace(self, resource: str, namespace: str | None, bodies: Iterable[Body]) -> None:
        """A fresh LIST of ``resource`` in ``namespace`` (None: every namespace) replaces, in one
        step, everything known of it there: objects deleted while no watch ran are gone."""
        known, info = self._store(resource)
        fresh = {object_key(body): info(body) for body in bodies}
        if namespace is None:
            known.clear()
        else:
            for key in [k for k, v in known.items() if v.namespace == namespace]:
                del known[key]
        known.update(fresh)

    def apply_pod_event(self, event_type: str | None, body: Body) -> bool:
        return self.apply(PODS, event_type, body)

    def apply_deployment_event(self, event_type: str | None, body: Body) -> bool:
        return self.apply(DEPLOYMENTS, event_type, body)

    def _keys_by_deployment(self) -> dict[tuple[str, str], Mapping[str, str]]:
        found: dict[tuple[str, str], Mapping[str, str]] = {}
        for secret in self.secrets.values():
            if secret.deployment:
                found[(secret.namespace, secret.deployment)] = secret.keys
        return found

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
        keys = self._keys_by_deployment()
        upstream_keys: dict[str, str] = {}
        for key in sorted(self.pods):
            pod = self.pods[key]
            if pod.endpoint is None:
                continue
            if pod.backend_key_id is not None:
                backend_key = keys.get((pod.namespace, pod.deployment or ""), {}).get(pod.backend_key_id)
                if backend_key is None:
                    # Its key is not read yet (or was revoked): the pod would answer 401.
                    log.debug("pod %s: waiting for its backend key %s", key, pod.backend_key_id)
                    continue
                upstream_keys[pod.endpoint] = backend_key
            owner = self.deployments.get(f"{pod.namespace}/{pod.deployment}") if pod.deployment else None
            names = pod.served_names or (owner.served_names if owner is not None else ())
            for name in names:
                listed = endpoints.setdefault(name, [])
                if pod.endpoint not in listed:
                    listed.append(pod.endpoint)
                if owner is not None and owner.policy is not None:
                    policies.setdefault(name, owner.policy)
        return RouteTable.build(
            (
                ModelRoute(name, tuple(urls), policies.get(name, default_policy), refs.get(name))
                for name, urls in endpoints.items()
            ),
            upstream_keys,
        )
