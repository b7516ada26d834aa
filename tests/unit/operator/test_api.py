"""Parsing LLMDeployment specs the way the operator receives them."""

from __future__ import annotations

from typing import Any

import pytest
from argosy_operator.api import (
    DEFAULT_VLLM_IMAGE,
    LLMDeploymentSpec,
    LLMDeploymentStatus,
    PlacementStatus,
    served_names,
)
from pydantic import ValidationError


def spec(**overrides: Any) -> dict[str, Any]:
    return {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, **overrides}


def test_minimal_spec_gets_the_documented_defaults() -> None:
    parsed = LLMDeploymentSpec.model_validate(spec())
    assert parsed.replicas == 1
    assert parsed.gpu.count == "auto" and parsed.gpu.products == []
    assert (parsed.parallelism.tensor, parsed.parallelism.pipeline) == ("auto", "auto")
    assert parsed.engine.image == DEFAULT_VLLM_IMAGE
    assert parsed.engine.gpu_memory_utilization == 0.9
    assert parsed.planning.target_sequences == 4
    assert parsed.hf_token_secret_ref is None
    assert parsed.engine.distributed_executor == "mp"


def test_default_image_is_pinned() -> None:
    repository, _, tag = DEFAULT_VLLM_IMAGE.partition(":")
    assert repository == "vllm/vllm-openai"
    assert tag.startswith("v") and tag != "latest"


def test_full_camel_case_spec_parses() -> None:
    body = {
        "model": {
            "uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
            "servedModelNames": ["llama-8b", "llama"],
            "revision": "main",
        },
        "replicas": 2,
        "gpu": {"count": 2, "products": ["NVIDIA-H100-80GB-HBM3"]},
        "parallelism": {"tensor": 2, "pipeline": "auto"},
        "engine": {
            "dtype": "bfloat16",
            "quantization": "fp8",
            "kvCacheDtype": "fp8",
            "maxModelLen": 8192,
            "gpuMemoryUtilization": 0.85,
            "maxNumBatchedTokens": 4096,
            "enforceEager": True,
            "distributedExecutor": "ray",
            "args": ["--enable-prefix-caching"],
            "env": [
                {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
        },
        "hfTokenSecretRef": {"name": "hf-token", "key": "token"},
        "scheduling": {
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
            "priorityClassName": "high",
        },
        "planning": {"targetSequences": 8},
    }
    parsed = LLMDeploymentSpec.model_validate(body)
    assert parsed.gpu.count == 2 and parsed.parallelism.tensor == 2
    assert parsed.engine.kv_cache_dtype == "fp8"
    assert parsed.engine.distributed_executor == "ray"
    assert parsed.engine.env[1].value_from == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert parsed.scheduling.tolerations[0].effect == "NoSchedule"
    assert parsed.hf_token_secret_ref is not None and parsed.hf_token_secret_ref.key == "token"
    # Round trip: what the operator would write back is what the user wrote.
    assert LLMDeploymentSpec.model_validate(parsed.to_api()) == parsed


@pytest.mark.parametrize(
    "bad",
    [
        spec(replicas=-1),
        spec(gpu={"count": 0}),
        spec(gpu={"count": "all"}),
        spec(parallelism={"tensor": "two"}),
        spec(engine={"gpuMemoryUtilization": 1.5}),
        spec(engine={"dtype": "int3"}),
        spec(engine={"quantization": "magic"}),
        spec(unknownField=True),
        spec(engine={"maxModelLen": 8}),
        spec(engine={"distributedExecutor": "torchrun"}),
        {"model": {"uri": "hf://a/b", "extra": 1}},
        {},
    ],
)
def test_invalid_specs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LLMDeploymentSpec.model_validate(bad)


def test_served_names_default_to_the_object_name() -> None:
    assert served_names(LLMDeploymentSpec.model_validate(spec()), "llama-8b") == ["llama-8b"]
    named = LLMDeploymentSpec.model_validate(spec(model={"uri": "hf://a/b", "servedModelNames": ["x", "y"]}))
    assert served_names(named, "llama-8b") == ["x", "y"]


def test_status_serialises_in_api_spelling() -> None:
    status = LLMDeploymentStatus(
        observed_generation=3,
        replicas=2,
        ready_replicas=1,
        selector="argosy.dev/deployment=llama,argosy.dev/role=server",
        placement=PlacementStatus.model_validate(
            {
                "tensorParallelSize": 2,
                "pipelineParallelSize": 1,
                "gpusPerPod": 2,
                "podsPerReplica": 1,
                "gpuProduct": "NVIDIA-L4",
                "weightsGiB": 14.96,
                "kvCacheTokens": 173744,
                "maxConcurrency": 21.21,
                "reason": "r",
            }
        ),
    )
    body = status.to_api()
    assert body["observedGeneration"] == 3 and body["readyReplicas"] == 1
    assert body["placement"]["weightsGiB"] == 14.96


def test_autoscaling_is_off_unless_asked_and_gets_documented_defaults() -> None:
    assert LLMDeploymentSpec.model_validate(spec()).autoscaling is None
    parsed = LLMDeploymentSpec.model_validate(spec(autoscaling={"enabled": True, "maxReplicas": 4}))
    scaling = parsed.autoscaling
    assert scaling is not None and scaling.enabled
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_in_flight_per_replica) == (1, 4, 16)
    assert (scaling.scale_up_window_seconds, scaling.scale_down_window_seconds) == (15, 300)
    assert scaling.scale_to_zero_after_seconds == 600
    assert parsed.engine.termination_grace_period_seconds == 300


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        ({"enabled": True, "minReplicas": 3, "maxReplicas": 2}, "minReplicas must not exceed"),
        ({"enabled": True}, "maxReplicas"),
        ({"enabled": True, "maxReplicas": 2, "minReplicas": -1}, "greater than or equal to 0"),
        ({"enabled": True, "maxReplicas": 2, "targetInFlightPerReplica": 0}, "greater than or equal to 1"),
        ({"enabled": True, "maxReplicas": 2, "scaleToZeroAfter": 5}, "Extra inputs"),
    ],
)
def test_bad_autoscaling_is_refused_with_the_reason(autoscaling: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMDeploymentSpec.model_validate(spec(autoscaling=autoscaling))


def test_minimum_drain_time_is_enforced() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 10"):
        LLMDeploymentSpec.model_validate(spec(engine={"terminationGracePeriodSeconds": 1}))
