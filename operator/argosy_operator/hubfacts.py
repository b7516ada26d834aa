"""config.json facts from the Hugging Face Hub for hf:// models the planner does not ship.

Only consulted when the spec has no inline facts and the shipped table does not know
the repository. Results (and failures) are cached, so an unreachable hub costs one
attempt per model every few minutes, not one per reconcile.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time

from argosy_operator.api import LLMDeploymentSpec, ModelFacts
from argosy_operator.hubfetch import fetch_facts
from argosy_operator.kubeapi import ApiError, KubeApi, resource_path
from argosy_operator.planner import PlacementError, find_shipped
from argosy_operator.planner.facts import hf_repo_id

FAILURE_TTL_SECONDS = 300.0
# Bounded: the oldest lookups are forgotten first (a forgotten model is simply fetched again).
MAX_CACHED = 512


@dataclasses.dataclass
class _Entry:
    facts: ModelFacts | None
    error: PlacementError | None
    at: float


class HubFacts:
    def __init__(self, api: KubeApi, *, enabled: bool = True) -> None:
        self._api = api
        self.enabled = enabled
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

    async def _token(self, namespace: str, spec: LLMDeploymentSpec) -> str | None:
        ref = spec.hf_token_secret_ref
        if ref is None:
            return None
        try:
            secret = await self._api.request("GET", resource_path("v1", "Secret", namespace, ref.name))
        except ApiError as e:
            raise PlacementError(
                "ModelFactsUnavailable",
                f"cannot read Secret {ref.name} for the Hugging Face token: {e.message}",
            ) from e
        value = (secret.get("data") or {}).get(ref.key)
        if not value:
            return None
        try:
            return base64.b64decode(value).decode().strip()
        except (ValueError, UnicodeDecodeError) as e:
            raise PlacementError(
                "ModelFactsUnavailable",
                f"key {ref.key} of Secret {ref.name} is not a UTF-8 text token",
            ) from e

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
            token = await self._token(namespace, spec)
            facts = await asyncio.to_thread(fetch_facts, repo, revision=spec.model.revision, token=token)
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
