"""config.json facts from the Hugging Face Hub for hf:// models the planner does not ship.

Only consulted when the spec has no inline facts, the shipped table does not know the
repository, and the placement is planned (sticky placements need no facts). The public
config.json is read first, anonymously. Only when the hub answers that the repository
is gated or private (401/403) does the operator read the token from spec.hfTokenSecretRef,
and a Secret it may not read becomes a condition that says what to do. Results (and
failures) are cached, so an unreachable hub costs one attempt per model every few
minutes, not one per reconcile.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time

from argosy_operator.api import LLMDeploymentSpec, ModelFacts, SecretKeyRef
from argosy_operator.hubfetch import FACTS_FIELDS, HubError, fetch_config, unavailable
from argosy_operator.kubeapi import ApiError, KubeApi
from argosy_operator.planner import PlacementError, facts_from_hf_config, find_shipped
from argosy_operator.planner.facts import hf_repo_id

GRANT = "let the operator read it (Helm value operator.readHfTokenSecrets=true)"
INLINE = f"or add spec.model.facts ({FACTS_FIELDS}) to the LLMDeployment"

FAILURE_TTL_SECONDS = 300.0
# Bounded: the oldest lookups are forgotten first (a forgotten model is simply fetched again).
MAX_CACHED = 512


@dataclasses.dataclass
class _Entry:
    facts: ModelFacts | None
    error: PlacementError | None
    at: float


class HubFacts:
    def __init__(self, api: KubeApi, *, enabled: bool = True, endpoint: str | None = None) -> None:
        self._api = api
        self.enabled = enabled
        self.endpoint = endpoint
        """The hub's base URL; None: $HF_ENDPOINT or the public Hub."""
        self._cache: dict[tuple[str, str, str, str], _Entry] = {}

    @staticmethod
    def needed(spec: LLMDeploymentSpec) -> str | None:
        """The hub repository to read, or None when the planner already has the facts."""
        if spec.model.facts is not None:
            return None
        repo = hf_repo_id(spec.model.uri)
        if repo is None or find_shipped(repo) is not None:
            return None
        return repo

    async def _token(self, namespace: str, repo: str, ref: SecretKeyRef, gated: HubError) -> str:
        def refused(what: str) -> PlacementError:
            return PlacementError("ModelFactsUnavailable", (
                f"{repo} is gated or private on the Hugging Face Hub ({gated.why} without a token) and {what}"))

        try:
            secret = await self._api.get("v1", "Secret", namespace, ref.name)
            if secret is None:
                raise ApiError(404, "NotFound", f'secrets "{ref.name}" not found')
        except ApiError as e:
            if e.status in (401, 403):
                raise refused(f"the operator may not read Secret {ref.name} (spec.hfTokenSecretRef): {GRANT}, "
                              f"{INLINE}.") from e
            if e.status == 404:
                raise refused(f"Secret {ref.name} (spec.hfTokenSecretRef) does not exist in namespace {namespace}: "
                              f"create it with a token that has access, {INLINE}.") from e
            raise refused(f"reading Secret {ref.name} failed ({e.status} {e.reason}); {INLINE}.") from e
        value = (secret.get("data") or {}).get(ref.key)
        if not value:
            raise refused(f"Secret {ref.name} has no key {ref.key} (spec.hfTokenSecretRef.key): add the token "
                          f"there, {INLINE}.")
        try:
            return base64.b64decode(value).decode().strip()
        except (ValueError, UnicodeDecodeError) as e:
            raise refused(f"key {ref.key} of Secret {ref.name} is not a UTF-8 text token; {INLINE}.") from e

    async def _read(self, namespace: str, repo: str, spec: LLMDeploymentSpec) -> ModelFacts:
        revision = spec.model.revision
        try:
            config = await asyncio.to_thread(fetch_config, repo, revision=revision, endpoint=self.endpoint)
        except HubError as e:
            if not e.gated:
                raise unavailable(repo, e.why) from e
            ref = spec.hf_token_secret_ref
            if ref is None:
                raise PlacementError("ModelFactsUnavailable", (
                    f"{repo} is gated or private on the Hugging Face Hub ({e.why} without a token): set "
                    f"spec.hfTokenSecretRef to a Secret with a token that has access and {GRANT}, {INLINE}.")) from e
            token = await self._token(namespace, repo, ref, e)
            try:
                config = await asyncio.to_thread(fetch_config, repo, revision=revision, token=token,
                                                 endpoint=self.endpoint)
            except HubError as e2:
                if e2.gated:
                    raise PlacementError("ModelFactsUnavailable", (
                        f"the token in Secret {ref.name} has no access to {repo} on the Hugging Face Hub "
                        f"({e2.why}): accept the model's terms with the token's account or use another token, "
                        f"{INLINE}.")) from e2
                raise unavailable(repo, e2.why) from e2
        return facts_from_hf_config(config)

    async def facts(self, namespace: str, spec: LLMDeploymentSpec) -> ModelFacts | None:
        """Facts read from the hub, None when not needed or disabled; PlacementError on failure."""
        repo = self.needed(spec)
        if repo is None or not self.enabled:
            return None
        ref = spec.hf_token_secret_ref
        key = (repo, spec.model.revision or "main", namespace, f"{ref.name}/{ref.key}" if ref else "")
        entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None and (entry.error is None or now - entry.at < FAILURE_TTL_SECONDS):
            if entry.error is not None:
                raise entry.error
            return entry.facts
        try:
            facts = await self._read(namespace, repo, spec)
        except PlacementError as e:
            self._remember(key, _Entry(None, e, now))
            raise
        self._remember(key, _Entry(facts, None, now))
        return facts

    def _remember(self, key: tuple[str, str, str, str], entry: _Entry) -> None:
        self._cache.pop(key, None)
        self._cache[key] = entry
        while len(self._cache) > MAX_CACHED:
            del self._cache[next(iter(self._cache))]
