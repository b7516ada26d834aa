"""The per-GPU memory estimate: KV bytes per token, quantization, and calibration against vLLM logs."""

from __future__ import annotations

import pytest
from argosy_operator.planner import EngineSettings, estimate, find_shipped
from argosy_operator.planner.memory import GIB, kv_bytes_per_token, weights_bytes

H100 = ("NVIDIA-H100-80GB-HBM3", 81559)


def _facts(name: str):  # type: ignore[no-untyped-def]
    shipped = find_shipped(name)
    assert shipped is not None
    return shipped.facts


def test_llama_8b_kv_is_128_kib_per_token() -> None:
    # 2 (K and V) x 32 layers x 8 KV heads x 128 head dim x 2 bytes
    assert kv_bytes_per_token(_facts("llama-3.1-8b"), EngineSettings(), 1, 1) == 131072


def test_kv_heads_split_across_tensor_ranks() -> None:
    facts = _facts("llama-3.1-70b")
    assert kv_bytes_per_token(facts, EngineSettings(), 4, 1) * 4 == kv_bytes_per_token(facts, EngineSettings(), 1, 1)


def test_kv_heads_are_replicated_when_tensor_exceeds_them() -> None:
    facts = _facts("qwen3-235b-a22b")  # 4 KV heads
    settings = EngineSettings()
    assert kv_bytes_per_token(facts, settings, 8, 1) == kv_bytes_per_token(facts, settings, 4, 1)


def test_mla_stores_one_latent_per_token_not_split_by_tensor() -> None:
    facts = _facts("deepseek-v3")
    # 61 layers x (kv_lora_rank 512 + rope 64) x 2 bytes, on every rank
    assert kv_bytes_per_token(facts, EngineSettings(), 1, 1) == 61 * 576 * 2
    assert kv_bytes_per_token(facts, EngineSettings(), 8, 1) == 61 * 576 * 2


def test_fp8_kv_cache_doubles_the_tokens() -> None:
    facts = _facts("llama-3.1-8b")
    plain = estimate(
        facts, EngineSettings(max_model_len=8192), product=H100[0], memory_mib=H100[1], tensor=1, pipeline=1
    )
    fp8 = estimate(
        facts,
        EngineSettings(max_model_len=8192, kv_cache_dtype="fp8"),
        product=H100[0],
        memory_mib=H100[1],
        tensor=1,
        pipeline=1,
    )
    assert fp8.kv_cache_tokens == pytest.approx(2 * plain.kv_cache_tokens, rel=0.001)


@pytest.mark.parametrize(
    ("quantization", "ratio"),
    [(None, 1.0), ("fp8", 0.53), ("awq", 0.29)],
)
def test_quantization_shrinks_weights(quantization: str | None, ratio: float) -> None:
    facts = _facts("llama-3.1-70b")
    bf16 = weights_bytes(facts, EngineSettings())
    # Embeddings and the output head (2.1B parameters) stay 16-bit.
    assert weights_bytes(facts, EngineSettings(quantization=quantization)) / bf16 == pytest.approx(ratio, abs=0.02)


def test_enforce_eager_frees_the_cuda_graph_memory_for_kv() -> None:
    facts = _facts("llama-3.1-8b")
    graphs = estimate(facts, EngineSettings(), product=H100[0], memory_mib=H100[1], tensor=1, pipeline=1)
    eager = estimate(
        facts, EngineSettings(enforce_eager=True), product=H100[0], memory_mib=H100[1], tensor=1, pipeline=1
    )
    assert eager.cuda_graphs == 0 < graphs.cuda_graphs
    assert eager.kv_cache - graphs.kv_cache == graphs.cuda_graphs


def test_bigger_batched_token_budget_costs_kv_cache() -> None:
    facts = _facts("llama-3.1-8b")
    small = estimate(
        facts, EngineSettings(max_num_batched_tokens=2048), product=H100[0], memory_mib=H100[1], tensor=1, pipeline=1
    )
    big = estimate(
        facts, EngineSettings(max_num_batched_tokens=32768), product=H100[0], memory_mib=H100[1], tensor=1, pipeline=1
    )
    assert big.activation > small.activation
    assert big.kv_cache_tokens < small.kv_cache_tokens


# Published vLLM startup logs (sources and settings in docs/planner.md, "Calibration").
@pytest.mark.parametrize(
    ("model", "product", "memory_mib", "tensor", "settings", "facts_update", "logged_tokens", "tolerance"),
    [
        # RTX 3090, Llama 3.1 8B, --max-model-len 20000 (vLLM issue 10517): 1952 blocks x 16.
        ("llama-3.1-8b", "NVIDIA-GeForce-RTX-3090", 24576, 1,
         {"max_model_len": 20000, "max_num_batched_tokens": 20000, "max_num_seqs": 256, "enforce_eager": True},
         {}, 31232, 0.05),
        # Same GPU and model at --max-model-len 29000: vLLM reports 23648 tokens of KV cache.
        ("llama-3.1-8b", "NVIDIA-GeForce-RTX-3090", 24576, 1,
         {"max_model_len": 29000, "max_num_batched_tokens": 29000, "max_num_seqs": 256, "enforce_eager": True},
         {}, 23648, 0.05),
        # H100, Llama 3.1 70B int8 (w8a8), --max-model-len 2048 --gpu-memory-utilization 0.98
        # (vLLM PR 12569): 1381 blocks x 16. That vLLM did not yet reserve CUDA-graph memory.
        ("llama-3.1-70b", "NVIDIA-H100-80GB-HBM3", 81559, 1,
         {"max_model_len": 2048, "gpu_memory_utilization": 0.98, "enforce_eager": True},
         {"quantization": "compressed-tensors", "weight_bits": 8}, 22096, 0.05),
    ],
)  # fmt: skip
def test_estimate_matches_published_vllm_logs(
    model: str,
    product: str,
    memory_mib: int,
    tensor: int,
    settings: dict[str, object],
    facts_update: dict[str, object],
    logged_tokens: int,
    tolerance: float,
) -> None:
    facts = _facts(model).model_copy(update=facts_update)
    result = estimate(
        facts,
        EngineSettings(**settings),  # type: ignore[arg-type]
        product=product,
        memory_mib=memory_mib,
        tensor=tensor,
        pipeline=1,
    )
    assert result.kv_cache_tokens == pytest.approx(logged_tokens, rel=tolerance)


def test_weights_of_an_int8_70b_match_vllms_load_log() -> None:
    # "Loading model weights took 67.7229 GB" (vLLM reports GiB) for the w8a8 70B checkpoint.
    facts = _facts("llama-3.1-70b").model_copy(update={"quantization": "compressed-tensors", "weight_bits": 8})
    assert weights_bytes(facts, EngineSettings()) / GIB == pytest.approx(67.72, rel=0.01)
