"""Read a model's config.json from the Hugging Face Hub (the planner's only network I/O).

The pure planner never calls this; the operator (or the CLI) may, and passes the result to
`plan_for_spec(..., facts=...)`. Any failure becomes PlacementError("ModelFactsUnavailable")
telling the user to put the facts in spec.model.facts.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from argosy_operator.api import ModelFacts
from argosy_operator.planner.errors import PlacementError
from argosy_operator.planner.facts import facts_from_hf_config

DEFAULT_ENDPOINT = "https://huggingface.co"


FACTS_FIELDS = ("hiddenSize, numHiddenLayers, numAttentionHeads, numKeyValueHeads, intermediateSize, vocabSize, "
                "maxPositionEmbeddings")


class HubError(Exception):
    """config.json could not be read; `status` is the hub's HTTP status (None: no answer)."""

    def __init__(self, status: int | None, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why

    @property
    def gated(self) -> bool:
        """The hub wants a token with access: a gated or private repository (401 without a token, 403 with one)."""
        return self.status in (401, 403)


def unavailable(repo: str, why: str) -> PlacementError:
    return PlacementError(
        "ModelFactsUnavailable",
        f"Could not read config.json of {repo} from the Hugging Face Hub ({why}); add spec.model.facts "
        f"({FACTS_FIELDS}) to the LLMDeployment.",
    )


def fetch_config(
    repo: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """`<endpoint>/<repo>/resolve/<revision>/config.json` (endpoint: $HF_ENDPOINT or the Hub); HubError on failure."""
    base = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    quoted_revision = urllib.parse.quote(revision or "main", safe="")
    url = f"{base}/{urllib.parse.quote(repo)}/resolve/{quoted_revision}/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "argosy-operator"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            config = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise HubError(exc.code, f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise HubError(None, f"hub unreachable: {getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:
        raise HubError(None, "config.json is not JSON") from exc
    if not isinstance(config, dict):
        raise HubError(None, "config.json is not an object")
    return config


def fetch_facts(
    repo: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    timeout: float = 5.0,
) -> ModelFacts:
    """Facts from the repository's config.json (the CLI's lookup); PlacementError on failure."""
    try:
        config = fetch_config(repo, revision=revision, token=token, endpoint=endpoint, timeout=timeout)
    except HubError as exc:
        hint = " - check spec.hfTokenSecretRef" if exc.gated else ""
        raise unavailable(repo, exc.why + hint) from exc
    return facts_from_hf_config(config)
