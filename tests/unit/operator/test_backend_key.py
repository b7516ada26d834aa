"""The backend key's pure decisions: which key new pods get, and what the Secret holds next."""

from __future__ import annotations

import base64

import pytest
from argosy_operator import backendkey, builders, observe, sticky
from argosy_operator.api import LLMDeploymentSpec
from argosy_operator.backendkey import KeyPlan, ObservedKeys, plan_keys


def keys(*ids: str, current: str | None = None, rotated_for: str | None = None) -> ObservedKeys:
    return ObservedKeys(ids=frozenset(ids), current=current, rotated_for=rotated_for, uid="s-1",
                        resource_version="7", owner_uid="u-1")


def fixed_id() -> str:
    return "new"


@pytest.mark.parametrize(("enabled", "observed", "request_", "in_use", "expected"), [
    # First pass: a Secret with one new key.
    (True, None, None, set(), KeyPlan(current="new", create=True, add="new", reason="new backend key")),
    # Steady state, with or without pods: nothing to write, the same key (a restart never regenerates it).
    (True, keys("a", current="a"), None, {"a"}, KeyPlan(current="a")),
    (True, keys("a", current="a", rotated_for="r1"), "r1", set(), KeyPlan(current="a", rotated_for="r1")),
    # A new rotation request: a new current key; the old one stays while pods use it.
    (True, keys("a", current="a"), "r1", {"a"},
     KeyPlan(current="new", add="new", rotated_for="r1",
             reason="rotation requested (argosy.dev/rotate-backend-key=r1)")),
    # Rotating again before the last roll finished: keys that pods still use stay, unused ones go.
    (True, keys("a", "b", "c", current="c", rotated_for="r1"), "r2", {"b"},
     KeyPlan(current="new", add="new", rotated_for="r2", remove=frozenset({"a"}),
             reason="rotation requested (argosy.dev/rotate-backend-key=r2)")),
    # The roll is over: the previous key goes.
    (True, keys("a", "b", current="b", rotated_for="r1"), "r1", {"b"},
     KeyPlan(current="b", remove=frozenset({"a"}), rotated_for="r1", reason="no pod uses the previous key")),
    # Someone removed the current entry by hand: a new one (pods keep theirs while they run).
    (True, keys("a", current="b"), None, {"a"},
     KeyPlan(current="new", add="new", reason="the Secret had no current key")),
    # Turned off: pods start without a key; the Secret stays while a pod uses one, then goes.
    (False, None, None, set(), KeyPlan(current=None)),
    (False, keys("a", "b", current="b"), None, {"b"},
     KeyPlan(current=None, remove=frozenset({"a"}), reason="backend key turned off; kept while pods use it")),
    (False, keys("a", current="a"), None, set(),
     KeyPlan(current=None, delete=True, reason="backend key turned off; no pod uses it")),
])
def test_plan_keys(enabled: bool, observed: ObservedKeys | None, request_: str | None, in_use: set[str],
                   expected: KeyPlan) -> None:
    assert plan_keys(enabled, observed, request_, frozenset(in_use), make_id=fixed_id) == expected


def test_the_created_secret_is_owned_labelled_and_holds_one_random_key() -> None:
    plan = plan_keys(True, None, "r0", frozenset(), make_id=fixed_id)
    secret = backendkey.build_secret("m", "ns", "u-1", plan)
    assert secret["metadata"]["name"] == "m-backend-key"
    assert secret["metadata"]["labels"]["argosy.dev/backend-key"] == "m"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "argosy-operator"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert secret["metadata"]["annotations"] == {"argosy.dev/backend-key-current": "new",
                                                 "argosy.dev/backend-key-rotated-for": "r0"}
    key = base64.b64decode(secret["data"]["key-new"]).decode()
    assert len(key) >= 40 and key != base64.b64decode(backendkey.build_secret("m", "ns", "u-1", plan)["data"][
        "key-new"]).decode()
    parsed = backendkey.observed(secret)
    assert parsed is not None and parsed.ids == {"new"} and parsed.current == "new" and parsed.owner_uid == "u-1"


def test_a_patch_adds_and_removes_entries_against_the_version_read() -> None:
    plan = KeyPlan(current="new", add="new", rotated_for="r1", remove=frozenset({"a"}))
    patch = backendkey.secret_patch(plan, "7", make_key=lambda: "k")
    assert patch == {"data": {"key-a": None, "key-new": base64.b64encode(b"k").decode()},
                     "metadata": {"annotations": {"argosy.dev/backend-key-current": "new",
                                                  "argosy.dev/backend-key-rotated-for": "r1"},
                                  "resourceVersion": "7"}}
    assert backendkey.secret_patch(KeyPlan(current="b", remove=frozenset({"a"})), "8") == {
        "data": {"key-a": None}, "metadata": {"resourceVersion": "8"}}


def test_the_operator_keeps_no_key_value_in_memory() -> None:
    secret = backendkey.build_secret("m", "ns", "u-1", plan_keys(True, None, None, frozenset(), make_id=fixed_id))
    trimmed = observe.trim_backend_key({**secret, "metadata": {**secret["metadata"], "managedFields": [{}]}})
    assert trimmed["data"] == {"key-new": ""}
    assert "managedFields" not in trimmed["metadata"]
    assert backendkey.observed(trimmed) == backendkey.observed(secret)


def test_pods_get_the_key_from_the_secret_and_carry_its_id() -> None:
    inputs = builders.ServerInputs(
        name="m", namespace="ns", owner_uid="u-1", model_uri="hf://org/model", served_model_names=("m",),
        replicas=1, image="vllm/vllm-openai:v0.32.0", tensor_parallel_size=1, pipeline_parallel_size=1,
        max_model_len=None, gpu_memory_utilization=0.9, backend_key_id="abcd",
        env=({"name": "VLLM_API_KEY", "value": "mine"},))
    template = builders.build_deployment(inputs)["spec"]["template"]
    assert template["metadata"]["annotations"]["argosy.dev/backend-key-id"] == "abcd"
    env = template["spec"]["containers"][0]["env"]
    # Ours wins over a user's variable of the same name (the gateway holds only ours).
    assert [e for e in env if e["name"] == "VLLM_API_KEY"] == [
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "m-backend-key", "key": "key-abcd"}}}]
    # The key is never on the command line (visible in the pod spec and in ps).
    assert not any("api-key" in a for a in template["spec"]["containers"][0]["args"])
    without = builders.build_deployment(builders.ServerInputs(**{**inputs.__dict__, "backend_key_id": None}))
    assert "argosy.dev/backend-key-id" not in without["spec"]["template"]["metadata"]["annotations"]


def test_pod_key_ids_and_rotation_request_are_read_from_metadata() -> None:
    pods = [{"metadata": {"annotations": {"argosy.dev/backend-key-id": "a"}}},
            {"metadata": {"annotations": {"argosy.dev/backend-key-id": "b"}, "deletionTimestamp": "x"}},
            {"metadata": {}}]
    assert backendkey.pod_key_ids(pods) == {"a", "b"}  # a terminating pod still uses its key
    assert backendkey.rotation_request({"metadata": {"annotations": {"argosy.dev/rotate-backend-key": "7"}}}) == "7"
    assert backendkey.rotation_request({"metadata": {}}) is None


def test_the_key_is_on_by_default_and_toggling_it_never_moves_the_placement() -> None:
    on = LLMDeploymentSpec.model_validate({"model": {"uri": "hf://org/model"}})
    off = LLMDeploymentSpec.model_validate({"model": {"uri": "hf://org/model"}, "backendKey": {"enabled": False}})
    assert on.backend_key.enabled and not off.backend_key.enabled
    assert sticky.spec_hash(on) == sticky.spec_hash(off)
    with pytest.raises(ValueError, match="extra"):
        LLMDeploymentSpec.model_validate({"model": {"uri": "hf://org/model"}, "backendKey": {"enable": False}})
