"""Where a model's chat template comes from (spec.engine.chatTemplate), and what is wrong with it.

Pure apart from `read_referenced`, the one API read: an inline template is stored in a
ConfigMap the operator owns; a referenced ConfigMap key is read so its hash goes into the
pod template (vLLM reads the template once, at startup, so only a new pod sees an edit).
A referenced ConfigMap or key that does not exist is a failure that names it: no pod is
started with a template vLLM could not open.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from argosy_operator import builders
from argosy_operator.api import ChatTemplate, ConfigMapKeyRef

REASON_NOT_FOUND = "ChatTemplateNotFound"


@dataclasses.dataclass(frozen=True)
class TemplateFailure:
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class ResolvedTemplate:
    mount: builders.ChatTemplateMount
    owned_config_map: Mapping[str, Any] | None = None
    """The ConfigMap to apply for an inline template; None for a referenced one."""


class ConfigMapReader(Protocol):
    async def __call__(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


def from_config_map(ref: ConfigMapKeyRef, namespace: str, config_map: Mapping[str, Any] | None) -> (
        builders.ChatTemplateMount | TemplateFailure):
    """The mount for a referenced key, or the failure that names what is missing."""
    where = f"ConfigMap {namespace}/{ref.name}"
    if config_map is None:
        return TemplateFailure(REASON_NOT_FOUND, (
            f"spec.engine.chatTemplate.configMapKeyRef: {where} does not exist; create it with the key "
            f"{ref.key!r}, or remove chatTemplate. No serving pod is started with a missing template."))
    data = config_map.get("data") or {}
    text = data.get(ref.key)
    if not isinstance(text, str):
        keys = ", ".join(sorted(data)) or "none"
        return TemplateFailure(REASON_NOT_FOUND, (
            f"spec.engine.chatTemplate.configMapKeyRef: {where} has no key {ref.key!r} (its keys: {keys}). "
            "No serving pod is started with a missing template."))
    return builders.ChatTemplateMount(ref.name, ref.key, builders.content_hash(text))


def inline(name: str, namespace: str, uid: str, text: str) -> ResolvedTemplate:
    config_map = builders.build_chat_template_config_map(name, namespace, uid, text)
    mount = builders.ChatTemplateMount(
        builders.chat_template_config_map_name(name), builders.CHAT_TEMPLATE_KEY, builders.content_hash(text))
    return ResolvedTemplate(mount=mount, owned_config_map=config_map)


async def resolve(template: ChatTemplate | None, name: str, namespace: str, uid: str,
                  read: ConfigMapReader) -> ResolvedTemplate | TemplateFailure | None:
    """Resolve spec.engine.chatTemplate; reads the API only for a configMapKeyRef."""
    if template is None:
        return None
    if template.inline is not None:
        return inline(name, namespace, uid, template.inline)
    assert template.config_map_key_ref is not None  # the model validator guarantees one of the two
    ref = template.config_map_key_ref
    mount = from_config_map(ref, namespace, await read(namespace, ref.name))
    return mount if isinstance(mount, TemplateFailure) else ResolvedTemplate(mount=mount)
