"""spec.engine.chatTemplate: an inline template becomes an owned ConfigMap, a referenced one is checked."""

from __future__ import annotations

from typing import Any

from argosy_operator import builders, chattemplate
from argosy_operator.api import ConfigMapKeyRef
from argosy_operator.observe import Observation
from argosy_operator.reconcile import reconcile
from test_diffplan_reconcile import NODES, SMALL, FakeApi, ctx, lld

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def _applied(api: FakeApi, kind_path: str) -> list[dict[str, Any]]:
    return [c[3] for c in api.of("PATCH") if kind_path in c[1] and not c[1].endswith("/status")]


async def test_inline_template_is_stored_in_an_owned_config_map_and_passed_to_vllm() -> None:
    api = FakeApi()
    spec = {**SMALL, "engine": {"chatTemplate": {"inline": TEMPLATE}}}
    await reconcile(ctx(api), Observation(("ns", "m"), lld(spec), NODES))
    (config_map,) = _applied(api, "/configmaps/")
    assert config_map["data"] == {builders.CHAT_TEMPLATE_KEY: TEMPLATE}
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    (deployment,) = _applied(api, "/deployments/")
    pod = deployment["spec"]["template"]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--chat-template") + 1] == f"{builders.CHAT_TEMPLATE_DIR}/{builders.CHAT_TEMPLATE_FILE}"
    assert pod["metadata"]["annotations"][builders.ANNOTATION_CHAT_TEMPLATE_HASH] == builders.content_hash(TEMPLATE)


async def test_a_missing_config_map_starts_no_pod_and_names_what_is_missing() -> None:
    api = FakeApi()  # every GET answers 404
    spec = {**SMALL, "engine": {"chatTemplate": {"configMapKeyRef": {"name": "templates", "key": "chat.jinja"}}}}
    await reconcile(ctx(api), Observation(("ns", "m"), lld(spec), NODES))
    assert _applied(api, "/deployments/") == []
    ((_, _, _, patch),) = api.of("PATCH", "/status")
    placed = next(c for c in patch["status"]["conditions"] if c["type"] == "PlacementFound")
    assert (placed["status"], placed["reason"]) == ("False", "ChatTemplateNotFound")
    assert "ConfigMap ns/templates does not exist" in placed["message"]


def test_a_missing_key_lists_the_keys_the_config_map_has() -> None:
    ref = ConfigMapKeyRef(name="templates", key="chat.jinja")
    failure = chattemplate.from_config_map(ref, "ns", {"data": {"other.jinja": "x", "a.jinja": "y"}})
    assert isinstance(failure, chattemplate.TemplateFailure)
    assert "has no key 'chat.jinja' (its keys: a.jinja, other.jinja)" in failure.message


def test_an_edited_referenced_template_changes_the_hash_that_rolls_the_pods() -> None:
    ref = ConfigMapKeyRef(name="templates", key="chat.jinja")
    first = chattemplate.from_config_map(ref, "ns", {"data": {"chat.jinja": TEMPLATE}})
    second = chattemplate.from_config_map(ref, "ns", {"data": {"chat.jinja": TEMPLATE + "\n"}})
    assert isinstance(first, builders.ChatTemplateMount) and isinstance(second, builders.ChatTemplateMount)
    assert (first.config_map, first.key) == ("templates", "chat.jinja")
    assert first.content_hash != second.content_hash
