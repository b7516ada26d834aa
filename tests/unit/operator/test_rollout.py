"""spec.rollout: the serving Deployment's surge and unavailability, validated as Kubernetes does, and a
change of it alone re-plans nothing and rolls no pod."""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
import pytest
from argosy_operator import builders, crd
from argosy_operator.api import LLMDeploymentSpec, RolloutSpec
from argosy_operator.diffplan import plan_children, stamped
from argosy_operator.group_builders import build_workload
from argosy_operator.reconcile import decide
from test_builders import BASE
from test_sticky import SPEC, UID, h100, lld, placed_on_h100

BOTH_ZERO = "rollout.maxSurge and rollout.maxUnavailable cannot both be 0"


def strategy(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["strategy"])


def test_by_default_one_replica_at_a_time_and_no_surge_pod() -> None:
    spec = LLMDeploymentSpec.model_validate({"model": {"uri": "hf://a/b"}})
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (0, 1)
    assert strategy(builders.build_deployment(BASE)) == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}


@pytest.mark.parametrize(("rollout", "rendered"), [
    pytest.param({"maxSurge": 1, "maxUnavailable": 0}, {"maxSurge": 1, "maxUnavailable": 0}, id="surge, no outage"),
    pytest.param({"maxSurge": "25%", "maxUnavailable": "50%"}, {"maxSurge": "25%", "maxUnavailable": "50%"},
                 id="percentages pass through for Kubernetes to round"),
    pytest.param({"maxUnavailable": 2}, {"maxSurge": 0, "maxUnavailable": 2}, id="faster, fewer replicas"),
    pytest.param({"maxSurge": "100%", "maxUnavailable": "0%"}, {"maxSurge": "100%", "maxUnavailable": "0%"},
                 id="a full second set, then switch"),
])
def test_the_rollout_fields_become_the_deployments_rolling_update(rollout: dict[str, Any],
                                                                   rendered: dict[str, Any]) -> None:
    d = decide(lld({**SPEC, "rollout": rollout}), (h100(0), h100(1)))
    assert d.failure is None
    [deployment] = [o for o in d.desired if o["kind"] == "Deployment"]
    assert strategy(dict(deployment)) == {"type": "RollingUpdate", "rollingUpdate": rendered}


@pytest.mark.parametrize(("rollout", "message"), [
    pytest.param({"maxSurge": 0, "maxUnavailable": 0}, BOTH_ZERO, id="both 0"),
    pytest.param({"maxUnavailable": "0%"}, BOTH_ZERO, id="0% with the default surge"),
    pytest.param({"maxSurge": "0%", "maxUnavailable": 0}, BOTH_ZERO, id="0% and 0"),
    pytest.param({"maxUnavailable": "101%"}, "should match pattern", id="more than 100% unavailable"),
    pytest.param({"maxSurge": "1"}, "should match pattern", id="a number as a string"),
    pytest.param({"maxSurge": "05%"}, "should match pattern", id="leading zero"),
    pytest.param({"maxSurge": -1}, "greater than or equal to 0", id="negative"),
    pytest.param({"maxSurge": True}, "valid integer", id="a boolean"),
    pytest.param({"maxSurge": 1, "surge": 1}, "Extra inputs are not permitted", id="unknown field"),
])
def test_a_rollout_that_cannot_work_is_refused_with_the_reason(rollout: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        RolloutSpec.model_validate(rollout)
    # The operator, handed such a spec anyway (an older CRD), says why and starts nothing.
    d = decide(lld({**SPEC, "rollout": rollout}), (h100(0), h100(1)))
    assert d.failure is not None and d.failure.reason == "InvalidSpec"
    assert "spec.rollout" in d.failure.message and message in d.failure.message
    assert not [o for o in d.desired if o["kind"] == "Deployment"]


def test_the_crd_refuses_both_zero_and_bad_strings_at_admission() -> None:
    rollout = crd.openapi_schema(LLMDeploymentSpec)["properties"]["rollout"]
    assert "default" not in rollout  # absent: the operator's defaults; an object with CEL rules gets no {}
    [rule] = rollout["x-kubernetes-validations"]
    assert rule["message"].startswith(BOTH_ZERO)
    surge, unavailable = rollout["properties"]["maxSurge"], rollout["properties"]["maxUnavailable"]
    assert surge["x-kubernetes-int-or-string"] and unavailable["x-kubernetes-int-or-string"]
    assert (surge["default"], unavailable["default"]) == (0, 1)
    assert surge["minimum"] == unavailable["minimum"] == 0
    assert unavailable["pattern"] == "^(100|[1-9]?[0-9])%$"


def test_changing_only_the_rollout_re_plans_nothing_and_rolls_no_pod() -> None:
    deployment, previous = placed_on_h100()
    d = decide(lld({**SPEC, "rollout": {"maxSurge": 1, "maxUnavailable": 0}}, generation=2), (h100(0), h100(1)),
               previous=previous, now="2026-01-02T00:00:00Z")
    assert d.replanned is None and d.failure is None
    assert d.placement is not None and d.placement.to_api() == previous["placement"]
    changed = dict(d.desired[0])
    assert changed["spec"]["template"] == deployment["spec"]["template"]  # the pods stay as they are
    assert strategy(changed)["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # ... but the Deployment itself is applied again with the new strategy.
    live = [stamped(deployment), stamped(dict(d.desired[1]))]
    assert not plan_children(UID, d.desired, live, keep=d.keep).is_noop


def test_groups_keep_their_own_one_group_at_a_time_replacement() -> None:
    group = dataclasses.replace(BASE, tensor_parallel_size=8, pipeline_parallel_size=2, pods_per_replica=2,
                                max_surge=1, max_unavailable=0)
    sets = [o for o in build_workload(group) if o["kind"] == "StatefulSet"]
    assert sets and all(s["spec"]["updateStrategy"] == {"type": "OnDelete"} for s in sets)
