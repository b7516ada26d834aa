"""The route table: an immutable snapshot of which endpoints serve which model.

Discovery builds a new table whenever something changes and swaps it in with one
attribute assignment, so a request always sees one consistent snapshot. Pure: no
web framework, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

LEAST_OUTSTANDING: Final = "least-outstanding"
ROUND_ROBIN: Final = "round-robin"
PREFIX_AFFINITY: Final = "prefix-affinity"
SESSION_AFFINITY: Final = "session-affinity"
POLICY_NAMES: Final[tuple[str, ...]] = (LEAST_OUTSTANDING, ROUND_ROBIN, PREFIX_AFFINITY, SESSION_AFFINITY)
DEFAULT_POLICY: Final = LEAST_OUTSTANDING


def endpoint_address(url: str) -> str:
    """``http://10.0.0.7:8000/`` -> ``10.0.0.7:8000`` (the value of ``x-argosy-endpoint``)."""
    address = url.split("://", 1)[-1]
    return address.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class DeploymentRef:
    """The LLMDeployment behind a route, as far as waking it from zero needs it."""

    namespace: str
    name: str
    replicas: int | None = None
    """spec.replicas (the scale subresource); None when unknown."""
    autoscaling: bool = False
    """spec.autoscaling.enabled: the gateway may wake it (patch its scale to 1) and hold requests."""
    resource_version: str | None = None
    """The object's resourceVersion when read, the precondition of the wake-up patch."""


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One served model name: its ready endpoints (base URLs) and routing policy.

    A model with no ready endpoint is known (it answers 503, not 404).
    """

    name: str
    endpoints: tuple[str, ...]
    policy: str = DEFAULT_POLICY
    # Not part of a route's identity (endpoints and policy are); every watch event publishes a
    # new table anyway, so a changed scale is seen without comparing it.
    deployment: DeploymentRef | None = field(default=None, compare=False)

    @property
    def ready(self) -> bool:
        return bool(self.endpoints)

    @property
    def scaled_to_zero(self) -> bool:
        return not self.endpoints and self.deployment is not None and self.deployment.replicas == 0


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: Mapping[str, ModelRoute] = field(default_factory=lambda: MappingProxyType({}))
    upstream_keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    """Endpoint -> the backend key it demands (sent as ``Authorization: Bearer``); absent: none."""
    _with_key: dict[str, tuple[Mapping[str, str], Mapping[str, str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """Endpoint -> the last headers given to ``upstream_headers`` and what it made of them."""

    @classmethod
    def build(cls, routes: Iterable[ModelRoute], upstream_keys: Mapping[str, str] | None = None) -> RouteTable:
        by_name: dict[str, ModelRoute] = {}
        for route in routes:
            previous = by_name.get(route.name)
            if previous is None:
                by_name[route.name] = route
            else:
                # The same served name from two sources: serve from the union of endpoints,
                # keeping the first source's policy.
                merged = previous.endpoints + tuple(e for e in route.endpoints if e not in previous.endpoints)
                by_name[route.name] = ModelRoute(previous.name, merged, previous.policy, previous.deployment)
        return cls(MappingProxyType(dict(sorted(by_name.items()))), MappingProxyType(dict(upstream_keys or {})))

    def upstream_headers(self, endpoint: str, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``headers`` with the endpoint's backend key as the bearer token, when it demands one.

        The client's own Authorization (a gateway API key) is never among ``headers``.
        """
        key = self.upstream_keys.get(endpoint)
        if key is None:
            return headers
        cached = self._with_key.get(endpoint)
        if cached is not None and cached[0] is headers:  # the proxy's shared mapping, held here
            return cached[1]
        merged = MappingProxyType({**headers, "Authorization": f"Bearer {key}"})
        if len(self._with_key) > 4096:
            self._with_key.clear()
        self._with_key[endpoint] = (headers, merged)
        return merged

    def get(self, model: str) -> ModelRoute | None:
        return self.routes.get(model)

    def model_names(self) -> list[str]:
        return list(self.routes)

    def endpoints(self) -> frozenset[str]:
        return frozenset(e for route in self.routes.values() for e in route.endpoints)


EMPTY_TABLE: Final = RouteTable()
