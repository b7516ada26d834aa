"""The operator's own Kubernetes client: lightkube's AsyncClient, with plain dicts in and out.

The operator reads through kopf's watch caches; this client carries the few calls a
reconcile makes (server-side apply, delete with a UID precondition, the status
subresource, Events, one GET to check ownership) and the leader-election Lease.
Credentials come from one lightkube configuration (a kubeconfig, or the pod's service
account, whose rotated token lightkube re-reads), and kopf's login is derived from
the same configuration (`kopf_connection_info`), so both talk to the same cluster as
the same identity.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
import kopf
from lightkube import ApiError as LightkubeApiError
from lightkube import AsyncClient, ConfigError, KubeConfig, SingleConfig
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from argosy_operator.settings import API_VERSION, FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION

Credentials = SingleConfig
"""One cluster, one user: what `load_credentials` returns and both clients log in with."""

LLMDeploymentResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class CredentialsError(Exception):
    """No usable cluster configuration; the message says what was tried."""


def load_credentials(kubeconfig: str | None) -> Credentials:
    """The kubeconfig file's current context, or in-cluster (service account) when None.

    Without a path, lightkube tries the pod's service account first, then $KUBECONFIG,
    then ~/.kube/config.
    """
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = config.get()
    except (ConfigError, OSError, KeyError, ValueError) as e:
        where = kubeconfig or "the in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise CredentialsError(f"cannot load Kubernetes credentials from {where}: {e}") from e
    if single is None:
        raise CredentialsError("the kubeconfig has no current context")
    return single


def kopf_connection_info(config: Credentials) -> kopf.ConnectionInfo:
    """kopf's login, from the same configuration as the lightkube client.

    A service-account token file is read at every call: kopf logs in again when the
    API server answers 401, which is how a rotated token reaches kopf's watches.
    """
    cluster, user = config.cluster, config.user
    token = None
    certificate_path = private_key_path = None
    certificate_data = private_key_data = None
    username = password = None
    if user is not None:
        if user.exec is not None or user.auth_provider is not None:
            raise CredentialsError(
                f"context {config.context_name}: exec and auth-provider credential plugins are not supported; "
                "use a token, a client certificate or the in-cluster service account")
        token = user.token
        if user.token_file:
            token = Path(str(config.abs_file(user.token_file))).read_text().strip()
        certificate_path = str(config.abs_file(user.client_cert)) if user.client_cert else None
        private_key_path = str(config.abs_file(user.client_key)) if user.client_key else None
        certificate_data = user.client_cert_data
        private_key_data = user.client_key_data
        username, password = user.username, user.password
    return kopf.ConnectionInfo(
        server=cluster.server,
        ca_path=str(config.abs_file(cluster.certificate_auth)) if cluster.certificate_auth else None,
        ca_data=cluster.certificate_auth_data,
        insecure=cluster.insecure,
        certificate_path=certificate_path,
        certificate_data=certificate_data,
        private_key_path=private_key_path,
        private_key_data=private_key_data,
        username=username,
        password=password,
        scheme="Bearer" if token else None,
        token=token,
        default_namespace=config.namespace,
    )


def resource_for(api_version: str, kind: str) -> Any:
    """lightkube's typed resource class for a built-in kind, or the LLMDeployment's generic one."""
    if (api_version, kind) == (API_VERSION, KIND):
        return LLMDeploymentResource
    return resource_registry.load(api_version, kind)


class KubeApi:
    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        observe: Callable[[str, float], None] | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self._observe = observe
        self.client = AsyncClient(credentials, field_manager=FIELD_MANAGER, timeout=httpx2.Timeout(timeout),
                                  transport=transport)

    async def close(self) -> None:
        await self.client.close()

    @contextlib.contextmanager
    def _call(self, method: str) -> Iterator[None]:
        """Time one API call and translate lightkube's and httpx's errors into ours."""
        started = time.perf_counter()
        try:
            yield
        except LightkubeApiError as e:
            status = e.status
            raise ApiError(int(status.code or e.response.status_code), str(status.reason or ""),
                           str(status.message or "")) from e
        except httpx2.HTTPStatusError as e:  # an error body that is not a Kubernetes Status
            raise ApiError(e.response.status_code, e.response.reason_phrase, e.response.text[:500]) from e
        except httpx2.TransportError as e:
            # An OSError, like any other connection failure: retried with backoff, not reported as a status.
            raise ConnectionError(f"Kubernetes API unreachable: {e!r}") from e
        finally:
            if self._observe is not None:
                self._observe(method, time.perf_counter() - started)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object as the API returns it, or None when it does not exist."""
        try:
            with self._call("GET"):
                obj = await self.client.get(resource_for(api_version, kind), name, namespace=namespace)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return _as_dict(obj)

    async def list(self, api_version: str, kind: str, namespace: str | None,
                   labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        with self._call("LIST"):
            return [_as_dict(obj) async for obj in self.client.list(
                resource_for(api_version, kind), namespace=namespace, labels=dict(labels) if labels else None)]

    async def apply(self, body: Mapping[str, Any], *, force: bool = True) -> None:
        """Server-side apply of the whole desired object, as field manager argosy-operator."""
        meta = body["metadata"]
        with self._call("PATCH"):
            await self.client.patch(resource_for(body["apiVersion"], body["kind"]), meta["name"], dict(body),
                                    namespace=meta.get("namespace"), patch_type=PatchType.APPLY, force=force)

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           patch: Mapping[str, Any]) -> None:
        """A JSON merge patch of the status subresource; ApiError(404) when the object is gone."""
        with self._call("PATCH"):
            await self.client.patch(resource_for(api_version, kind).Status, name, dict(patch),
                                    namespace=namespace, patch_type=PatchType.MERGE)

    async def patch_merge(self, api_version: str, kind: str, namespace: str, name: str,
                          patch: Mapping[str, Any]) -> None:
        """A JSON merge patch of the object itself (never creates it); ApiError(404) when it is gone."""
        with self._call("PATCH"):
            await self.client.patch(resource_for(api_version, kind), name, dict(patch),
                                    namespace=namespace, patch_type=PatchType.MERGE)

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        resource = resource_for(body["apiVersion"], body["kind"])
        with self._call("POST"):
            return _as_dict(await self.client.create(resource.from_dict(dict(body))))

    async def replace(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT the object; with metadata.resourceVersion set, 409 when someone wrote in between."""
        resource = resource_for(body["apiVersion"], body["kind"])
        with self._call("PUT"):
            return _as_dict(await self.client.replace(resource.from_dict(dict(body))))

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str, *,
                     uid: str | None = None) -> bool:
        """Delete in the background; with `uid`, only that incarnation (a UID precondition).

        False when there was nothing to delete: gone already, or replaced by an object
        with another UID (409), which is somebody else's to keep.
        """
        # lightkube's delete() sends no body, and preconditions exist only in the body
        # (DeleteOptions): build the request with lightkube's own generic client.
        generic = self.client._client
        request = generic.prepare_request("delete", res=resource_for(api_version, kind), name=name,
                                          namespace=namespace)
        request.data = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                        **({"preconditions": {"uid": uid}} if uid else {})}
        try:
            with self._call("DELETE"):
                response = await generic.send(generic.build_adapter_request(request))
                generic.handle_response("delete", response, request)
        except ApiError as e:
            if e.status in (404, 409):
                return False
            raise
        return True


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)
