"""manifests/examples/ do what their comments promise, on the sandbox's GPU pools."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_operator import api
from argosy_operator.planner import facts, inventory, sizing

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"


def _examples() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") == api.KIND:  # an example may bring what it needs (a ConfigMap)
                found[f"{path.name}:{doc['metadata']['name']}"] = doc
    return found


@pytest.fixture(scope="module")
def sandbox_pools() -> list[Any]:
    from argosy_sandbox.pools import DEFAULT_POOLS, node_manifests

    nodes = copy.deepcopy(node_manifests(DEFAULT_POOLS))
    for node in nodes:  # kwok marks them Ready once they register
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return inventory.inventory_from_nodes(nodes)


def test_the_promised_examples_exist():
    names = {path.name for path in EXAMPLES.glob("*.yaml")}
    assert names == {
        "llama-8b.yaml",
        "llama-70b-tensor-parallel.yaml",
        "qwen-7b-on-l4.yaml",
        "two-models.yaml",
        "llama-405b-multi-node.yaml",
        "baichuan-remote-code.yaml",
    }


@pytest.mark.parametrize("key", sorted(_examples()))
def test_example_is_a_valid_llmdeployment_of_a_known_model(key):
    doc = _examples()[key]
    assert doc["apiVersion"] == f"{api.GROUP}/{api.VERSION}" and doc["kind"] == api.KIND
    assert "namespace" not in doc["metadata"], "examples go to the namespace `kubectl apply -n` names"
    spec = api.LLMDeploymentSpec.model_validate(doc["spec"])
    known = facts.find_shipped(spec.model.uri) is not None or spec.model.facts is not None
    assert known, "the operator sizes it without reaching the Hub"


# name -> (tensor, pipeline, pods per replica, GPU product or None for any)
EXPECTED = {
    "llama-8b.yaml:llama-8b": (1, 1, 1, None),
    "qwen-7b-on-l4.yaml:qwen-7b": (1, 1, 1, "NVIDIA-L4"),
    "two-models.yaml:llama-8b": (1, 1, 1, None),
    "two-models.yaml:mistral-7b": (1, 1, 1, None),
    "llama-405b-multi-node.yaml:llama-405b": (8, 2, 2, "NVIDIA-H100-80GB-HBM3"),
    "baichuan-remote-code.yaml:baichuan-7b": (1, 1, 1, None),
}


def test_the_remote_code_example_brings_the_config_map_its_template_names():
    docs = list(yaml.safe_load_all((EXAMPLES / "baichuan-remote-code.yaml").read_text()))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (model,) = [d for d in docs if d["kind"] == api.KIND]
    ref = model["spec"]["engine"]["chatTemplate"]["configMapKeyRef"]
    assert ref["name"] == config_map["metadata"]["name"] and ref["key"] in config_map["data"]
    assert model["spec"]["model"]["trustRemoteCode"] is True


@pytest.mark.parametrize("key", sorted(_examples()))
def test_example_gets_the_placement_its_comment_describes(key, sandbox_pools):
    spec = api.LLMDeploymentSpec.model_validate(_examples()[key]["spec"])
    placement = sizing.plan_for_spec(spec, sandbox_pools)
    assert placement.max_concurrency >= 1
    if key == "llama-70b-tensor-parallel.yaml:llama-70b":
        assert placement.tensor_parallel_size >= 2 and placement.pipeline_parallel_size == 1
        assert placement.pods_per_replica == 1
        return
    tensor, pipeline, pods, product = EXPECTED[key]
    assert (placement.tensor_parallel_size, placement.pipeline_parallel_size, placement.pods_per_replica) == (
        tensor,
        pipeline,
        pods,
    ), placement.reason
    if product:
        assert placement.gpu_product == product


def test_two_models_example_serves_two_distinct_names():
    docs = [d for k, d in _examples().items() if k.startswith("two-models.yaml:")]
    names = [n for d in docs for n in d["spec"]["model"]["servedModelNames"]]
    assert len(docs) == 2 and len(set(names)) == len(names)
