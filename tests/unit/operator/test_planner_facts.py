"""Model facts: the shipped table, config.json parsing, parameter counts (the Hub fetch: test_hubfacts.py)."""

from __future__ import annotations

import pytest
from argosy_operator.api import LLMDeploymentSpec, ModelSource
from argosy_operator.planner import (
    GpuPool,
    PlacementError,
    facts_from_hf_config,
    find_shipped,
    parameter_count,
    plan_for_spec,
    resolve_facts,
    shipped_models,
)

REQUIRED_MODELS = [
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b",
    "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "qwen3-8b", "qwen3-32b", "qwen3-235b-a22b", "mistral-7b",
    "mixtral-8x7b", "mixtral-8x22b", "gemma-2-9b", "gemma-2-27b", "phi-3-mini", "phi-4", "deepseek-v3",
]  # fmt: skip


def test_at_least_twenty_models_ship_including_the_issue_list() -> None:
    names = {m.name for m in shipped_models()}
    assert len(names) >= 20
    assert set(REQUIRED_MODELS) <= names


@pytest.mark.parametrize("model", shipped_models(), ids=lambda m: m.name)
def test_computed_parameters_match_the_published_count(model) -> None:  # type: ignore[no-untyped-def]
    computed = parameter_count(model.facts)
    assert computed == pytest.approx(model.published_parameters, rel=0.02)


def test_moe_counts_all_experts_not_just_the_active_ones() -> None:
    mixtral = find_shipped("mixtral-8x7b")
    assert mixtral is not None
    assert parameter_count(mixtral.facts) == pytest.approx(46.7e9, rel=0.01)  # not the ~12.9B active


def test_lookup_by_name_repo_id_or_uri_case_insensitive() -> None:
    by_name = find_shipped("llama-3.1-8b")
    assert by_name is not None
    assert find_shipped("hf://meta-llama/Llama-3.1-8B-Instruct") is by_name
    assert find_shipped("META-LLAMA/meta-llama-3.1-8b-instruct") is by_name
    assert find_shipped("acme/unknown-model") is None


def test_config_json_fields_are_mapped() -> None:
    config = {
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64},
    }
    facts = facts_from_hf_config(config)
    assert (facts.num_experts, facts.num_experts_per_token, facts.kv_heads, facts.head_size) == (8, 2, 8, 128)
    assert (facts.quantization, facts.weight_bits, facts.quantization_group_size) == ("awq", 4, 64)


def test_multimodal_config_uses_its_text_config() -> None:
    config = {
        "architectures": ["SomeVisionLM"],
        "text_config": {
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "intermediate_size": 8192,
            "vocab_size": 32000,
            "max_position_embeddings": 8192,
        },
    }
    facts = facts_from_hf_config(config)
    assert (facts.hidden_size, facts.num_hidden_layers, facts.architecture) == (2048, 16, "SomeVisionLM")


def test_config_without_required_fields_is_a_clear_error() -> None:
    with pytest.raises(PlacementError) as caught:
        facts_from_hf_config({"hidden_size": 10})
    assert caught.value.reason == "UnknownModel"
    assert "spec.model.facts" in caught.value.message


def test_inline_facts_win_over_the_table() -> None:
    source = ModelSource.model_validate(
        {
            "uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
            "facts": {
                "hiddenSize": 1024,
                "numHiddenLayers": 4,
                "numAttentionHeads": 8,
                "intermediateSize": 4096,
                "vocabSize": 1000,
                "maxPositionEmbeddings": 2048,
            },
        }
    )
    assert resolve_facts(source).num_hidden_layers == 4


def test_unknown_hub_model_asks_for_facts() -> None:
    with pytest.raises(PlacementError) as caught:
        resolve_facts(ModelSource(uri="hf://acme/secret-model"))
    assert caught.value.reason == "ModelFactsUnavailable"
    assert "spec.model.facts" in caught.value.message


def test_pvc_model_without_facts_is_unknown() -> None:
    with pytest.raises(PlacementError) as caught:
        resolve_facts(ModelSource(uri="pvc://models/llama"))
    assert caught.value.reason == "UnknownModel"


def test_plan_for_spec_uses_facts_fetched_by_the_caller() -> None:
    spec = LLMDeploymentSpec.model_validate({"model": {"uri": "hf://acme/tiny"}, "engine": {"maxModelLen": 4096}})
    fetched = facts_from_hf_config(
        {
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
        }
    )
    placement = plan_for_spec(spec, [GpuPool("NVIDIA-L4", 23034, 1, 1)], facts=fetched)
    assert placement.tensor_parallel_size == 1 and placement.max_concurrency > 4


def test_a_config_that_is_not_an_object_is_an_unknown_model_not_a_crash() -> None:
    with pytest.raises(PlacementError) as raised:
        facts_from_hf_config([1, 2])  # type: ignore[arg-type]
    assert raised.value.reason == "UnknownModel"
    assert "spec.model.facts" in raised.value.message


def test_an_odd_quantization_config_is_ignored_and_wrong_types_are_explained() -> None:
    base = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "intermediate_size": 14336, "vocab_size": 128256}
    assert facts_from_hf_config({**base, "quantization_config": "fp8"}).quantization is None
    with pytest.raises(PlacementError, match="lacks a field"):
        facts_from_hf_config({**base, "hidden_size": None})
