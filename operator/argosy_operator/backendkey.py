"""The backend key: what vLLM demands (VLLM_API_KEY) and only the gateway sends. Pure.

Per LLMDeployment the operator keeps one Secret, `<name>-backend-key`, that it owns and
labels `argosy.dev/backend-key: <name>`. Its data holds one entry per key in use,
`key-<id>`; its annotation `argosy.dev/backend-key-current` names the id new pods get.
Each serving pod carries its key's id as the annotation `argosy.dev/backend-key-id` and
reads exactly that entry as VLLM_API_KEY, and the gateway sends each pod the key its own
annotation names. A rotation therefore needs no moment where two keys must be accepted:

1. a new id and key are added to the Secret, which becomes current (the old entry stays);
2. the pod template names the new id, so the pods roll; until a new pod is ready the old
   pods serve with the old key, and the gateway routes a pod only once it has its key;
3. when no pod carries an old id any more, that entry is removed from the Secret.

Rotation is asked for with the annotation `argosy.dev/rotate-backend-key` on the
LLMDeployment: each new value rotates once (the value handled is recorded on the Secret).
Deleting the Secret also gives a new key, and revokes the old one at once (the gateway no
longer has it, so the old pods get no traffic until their replacements are ready).

The key values never pass through here except when made: the observed Secret is trimmed
to its entry names (observe.trim_backend_key), and writes are merge patches.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from argosy_operator.builders import (
    ANNOTATION_BACKEND_KEY_ID,
    LABEL_MANAGED_BY,
    backend_key_entry,
    backend_key_secret_name,
    child_labels,
    owner_reference,
)

LABEL_BACKEND_KEY = "argosy.dev/backend-key"
ANNOTATION_KEY_ID = ANNOTATION_BACKEND_KEY_ID
ANNOTATION_CURRENT = "argosy.dev/backend-key-current"
ANNOTATION_ROTATED_FOR = "argosy.dev/backend-key-rotated-for"
"""On the Secret: the rotation request last handled."""
ROTATE_ANNOTATION = "argosy.dev/rotate-backend-key"
"""On the LLMDeployment: any new value asks for a new key."""
ENTRY_PREFIX = "key-"
KEY_BYTES = 32
secret_name = backend_key_secret_name
entry = backend_key_entry


def new_key_id() -> str:
    return secrets.token_hex(4)


def new_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


@dataclasses.dataclass(frozen=True)
class ObservedKeys:
    """The operator's Secret as a reconcile sees it: entry ids and bookkeeping, never values."""

    ids: frozenset[str]
    current: str | None
    rotated_for: str | None
    uid: str | None = None
    resource_version: str | None = None
    owner_uid: str | None = None


def observed(secret: Mapping[str, Any] | None) -> ObservedKeys | None:
    """ObservedKeys from a (trimmed or full) Secret; None when there is none."""
    if secret is None:
        return None
    meta = secret.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    ids = frozenset(k[len(ENTRY_PREFIX):] for k in secret.get("data") or {} if k.startswith(ENTRY_PREFIX))
    owners = [o.get("uid") for o in meta.get("ownerReferences") or () if o.get("controller")]
    return ObservedKeys(
        ids=ids,
        current=annotations.get(ANNOTATION_CURRENT),
        rotated_for=annotations.get(ANNOTATION_ROTATED_FOR),
        uid=meta.get("uid"),
        resource_version=meta.get("resourceVersion"),
        owner_uid=owners[0] if owners else None,
    )


def rotation_request(body: Mapping[str, Any]) -> str | None:
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(ROTATE_ANNOTATION)
    return str(value) if value is not None else None


def pod_key_ids(pods: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The key ids the observed pods (terminating ones too) were started with."""
    found = set()
    for pod in pods:
        value = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_KEY_ID)
        if isinstance(value, str) and value:
            found.add(value)
    return frozenset(found)


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """What to do with the Secret in this pass, and which key new pods get."""

    current: str | None
    """The id the pod template names; None: vLLM starts without a key."""
    create: bool = False
    add: str | None = None
    """A new id to add (and make current)."""
    remove: frozenset[str] = frozenset()
    delete: bool = False
    rotated_for: str | None = None
    reason: str = ""

    @property
    def writes(self) -> bool:
        return self.create or self.add is not None or bool(self.remove) or self.delete


def plan_keys(
    enabled: bool,
    keys: ObservedKeys | None,
    request: str | None,
    in_use: frozenset[str],
    make_id: Callable[[], str] = new_key_id,
) -> KeyPlan:
    """Decide the Secret's next state from what is observed.

    `request` is the LLMDeployment's rotation annotation; `in_use` the ids the pods carry.
    An entry is kept while any pod carries its id, so a pod whose container restarts
    always finds its key and the gateway can always reach it.
    """
    if not enabled:
        if keys is None:
            return KeyPlan(current=None)
        unused = keys.ids - in_use
        if unused == keys.ids:
            return KeyPlan(current=None, delete=True, reason="backend key turned off; no pod uses it")
        return KeyPlan(current=None, remove=unused, reason="backend key turned off; kept while pods use it")
    if keys is None or keys.current is None or keys.current not in keys.ids:
        key_id = make_id()
        if keys is None:
            return KeyPlan(current=key_id, create=True, add=key_id, rotated_for=request, reason="new backend key")
        return KeyPlan(current=key_id, add=key_id, rotated_for=request, remove=keys.ids - in_use,
                       reason="the Secret had no current key")
    if request is not None and request != keys.rotated_for:
        key_id = make_id()
        return KeyPlan(current=key_id, add=key_id, rotated_for=request, remove=keys.ids - in_use - {keys.current},
                       reason=f"rotation requested ({ROTATE_ANNOTATION}={request})")
    stale = keys.ids - in_use - {keys.current}
    if stale:
        return KeyPlan(current=keys.current, remove=stale, rotated_for=keys.rotated_for,
                       reason="no pod uses the previous key")
    return KeyPlan(current=keys.current, rotated_for=keys.rotated_for)


def _encoded(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def build_secret(name: str, namespace: str, owner_uid: str, plan: KeyPlan,
                 make_key: Callable[[], str] = new_key) -> dict[str, Any]:
    """The Secret to create for a plan with `create`."""
    assert plan.add is not None
    annotations = {ANNOTATION_CURRENT: plan.add}
    if plan.rotated_for is not None:
        annotations[ANNOTATION_ROTATED_FOR] = plan.rotated_for
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(name),
            "namespace": namespace,
            "labels": {**child_labels(name), LABEL_BACKEND_KEY: name},
            "annotations": annotations,
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "data": {entry(plan.add): _encoded(make_key())},
    }


def secret_patch(plan: KeyPlan, resource_version: str | None,
                 make_key: Callable[[], str] = new_key) -> dict[str, Any]:
    """A JSON merge patch for a plan that adds or removes entries of an existing Secret.

    With the observed resourceVersion, so a write based on a stale view fails (409)
    instead of rotating twice or dropping an entry just added.
    """
    data: dict[str, str | None] = {entry(i): None for i in sorted(plan.remove)}
    annotations: dict[str, str | None] = {}
    if plan.add is not None:
        data[entry(plan.add)] = _encoded(make_key())
        annotations[ANNOTATION_CURRENT] = plan.add
        annotations[ANNOTATION_ROTATED_FOR] = plan.rotated_for
    metadata: dict[str, Any] = {}
    if annotations:
        metadata["annotations"] = annotations
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    patch: dict[str, Any] = {"data": data}
    if metadata:
        patch["metadata"] = metadata
    return patch


def is_backend_key_secret(body: Mapping[str, Any]) -> bool:
    labels = (body.get("metadata") or {}).get("labels") or {}
    return LABEL_BACKEND_KEY in labels and LABEL_MANAGED_BY in labels
