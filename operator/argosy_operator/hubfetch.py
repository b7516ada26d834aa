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

from argosy_operator.api import ModelFacts
from argosy_operator.planner.errors import PlacementError
from argosy_operator.planner.facts import facts_from_hf_config

DEFAULT_ENDPOINT = "https://huggingface.co"


def _unavailable(repo: str, why: str) -> PlacementError:
    return PlacementError(
        "ModelFactsUnavailable",
        f"Could not read config.json of {repo} from the Hugging Face Hub ({why}); add spec.model.facts "
        "(hiddenSize, numHiddenLayers, numAttentionHeads, numKeyValueHeads, intermediateSize, vocabSize, "
        "maxPositionEmbeddings) to the LLMDeployment.",
    )


def fetch_facts(
    repo: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    timeout: float = 5.0,
) -> ModelFacts:
    """Facts from `<endpoint>/<repo>/resolve/<revision>/config.json` (endpoint: $HF_ENDPOINT or the Hub)."""
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
        hint = " - check spec.hfTokenSecretRef" if exc.code in (401, 403) else ""
        raise _unavailable(repo, f"HTTP {exc.code}{hint}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise _unavailable(repo, f"hub unreachable: {getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:
        raise _unavailable(repo, "config.json is not JSON") from exc
    if not isinstance(config, dict):
        raise _unavailable(repo, "config.json is not an object")
    return facts_from_hf_config(config)
