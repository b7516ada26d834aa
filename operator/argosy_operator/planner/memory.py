"""Per-GPU memory estimate of a vLLM worker, mirroring vLLM's startup memory profiling.

vLLM (V1 engine) sizes its KV cache at startup as

    KV memory per GPU = total GPU memory x gpu_memory_utilization
                        - weights - peak activation (a dummy forward pass of max_num_batched_tokens
                          tokens plus a dummy sampler pass of max_num_seqs requests)
                        - non-torch memory (CUDA context growth, NCCL and all-reduce buffers)
                        - CUDA graph memory (estimated before allocating the cache since v0.21)

and logs the result as "GPU KV cache size: N tokens". With pipeline parallelism every stage
profiles its own layers and the engine gives all of them the block count of the smallest: the
stage with the most layers (and the embeddings or the output head) binds. This module reproduces
that budget from config.json facts, stage by stage. The constants are calibrated against
published vLLM startup logs; see docs/planner.md for the calibration table and the expected error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from argosy_operator.api import ModelFacts
from argosy_operator.planner.facts import parameter_counts

MIB = 1 << 20
GIB = 1 << 30

# vLLM allocates the KV cache in blocks of this many tokens.
BLOCK_SIZE = 16
# The GFD label nvidia.com/gpu.memory is what NVML reports; CUDA (and so vLLM's "total memory")
# sees about this much less (H100 80GB: 81559 MiB labelled, 79.19 GiB in vLLM's log).
CUDA_RESERVED_MIB = 450
# Memory outside PyTorch's allocator: ~0.25 GiB on one GPU, more with NCCL and custom all-reduce buffers.
NON_TORCH_SINGLE_GPU = GIB // 4
NON_TORCH_MULTI_GPU = 3 * GIB // 4
# CUDA graphs captured for decode batch sizes: a fixed part plus a per-layer part.
CUDA_GRAPH_BASE = GIB // 5
CUDA_GRAPH_PER_LAYER = GIB // 100
# The dummy sampler pass holds fp32 logits for max_num_seqs requests several times over
# (logits, temperature-scaled copy, top-k/top-p sort).
SAMPLER_LOGIT_COPIES = 3
# Default group size of 4-bit AWQ/GPTQ checkpoints.
DEFAULT_QUANT_GROUP = 128

FOUR_BIT = frozenset({"awq", "awq_marlin", "gptq", "gptq_marlin", "bitsandbytes", "mxfp4", "modelopt_fp4"})
EIGHT_BIT = frozenset({"fp8", "fbgemm_fp8", "modelopt", "experts_int8"})
GROUPED_FOUR_BIT = frozenset({"awq", "awq_marlin", "gptq", "gptq_marlin"})


@dataclass(frozen=True)
class EngineSettings:
    """The vLLM engine flags that change memory use."""

    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    pp_layer_partition: tuple[int, ...] | None = None
    """Layers per pipeline stage from VLLM_PP_LAYER_PARTITION; None: vLLM's own split."""


@dataclass(frozen=True)
class MemoryEstimate:
    """One GPU of the binding pipeline stage, in bytes, and the replica's KV capacity in tokens."""

    budget: int
    weights: int
    activation: int
    sampler: int
    non_torch: int
    cuda_graphs: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_cache_tokens: int
    max_model_len: int
    stage_layers: tuple[int, ...] = ()
    """Decoder layers of each pipeline stage."""
    binding_stage: int = 0
    """The stage whose KV cache is the smallest (vLLM sizes every stage to it)."""

    @property
    def overhead(self) -> int:
        return self.activation + self.sampler + self.non_torch + self.cuda_graphs

    @property
    def max_concurrency(self) -> float:
        return self.kv_cache_tokens / self.max_model_len

    @property
    def holds_one_sequence(self) -> bool:
        return self.kv_cache_tokens >= self.max_model_len


def effective_quantization(facts: ModelFacts, settings: EngineSettings) -> str | None:
    return settings.quantization or facts.quantization


def weight_bits(facts: ModelFacts, settings: EngineSettings) -> int:
    quant = effective_quantization(facts, settings)
    if quant in FOUR_BIT:
        return 4
    if quant in EIGHT_BIT:
        return 8
    if quant == "compressed-tensors":
        return facts.weight_bits or 8
    return 16


def compute_dtype_bytes(facts: ModelFacts, settings: EngineSettings) -> int:
    """Bytes per activation/unquantized weight. `auto` keeps 16-bit checkpoints and casts fp32 down."""
    if settings.dtype in ("float32", "float"):
        return 4
    return 2


def compute_dtype_name(facts: ModelFacts, settings: EngineSettings) -> str:
    if settings.dtype == "auto":
        return "bfloat16" if facts.torch_dtype == "float32" else facts.torch_dtype
    return {"half": "float16", "float": "float32"}.get(settings.dtype, settings.dtype)


def kv_element_bytes(facts: ModelFacts, settings: EngineSettings) -> int:
    if settings.kv_cache_dtype.startswith("fp8"):
        return 1
    if settings.kv_cache_dtype == "bfloat16":
        return 2
    return compute_dtype_bytes(facts, settings)


def quant_group_size(facts: ModelFacts, settings: EngineSettings) -> int:
    if effective_quantization(facts, settings) == "mxfp4":
        return 32
    return facts.quantization_group_size or DEFAULT_QUANT_GROUP


def weights_bytes(facts: ModelFacts, settings: EngineSettings) -> int:
    """Bytes of weights for the whole replica.

    Quantization shrinks the projection weights (only the experts for experts_int8); embeddings,
    the output head and norms stay 16-bit, as in vLLM.
    """
    counts = parameter_counts(facts)
    scale = facts.parameters / counts.total if facts.parameters else 1.0
    total = counts.total * scale
    unit = compute_dtype_bytes(facts, settings)
    bits = weight_bits(facts, settings)
    if bits == 16:
        return int(total * unit)
    quant = effective_quantization(facts, settings)
    quantized = (counts.experts if quant == "experts_int8" else counts.linear) * scale
    if bits == 8:
        per_weight = 1.0
    else:
        # 4-bit values plus one 16-bit scale and a 4-bit zero point per group.
        group = quant_group_size(facts, settings)
        per_weight = 0.5 + (1.0 if quant == "mxfp4" else 2.5) / group
    return int(quantized * per_weight + (total - quantized) * 2)


def stage_layers(num_layers: int, pipeline: int, partition: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Decoder layers per pipeline stage, as vLLM splits them (vllm.distributed.utils.get_pp_indices).

    An even share each; the remainder goes one layer at a time to the stages before the last,
    starting from the second-to-last (the last stage also runs the output head). A
    VLLM_PP_LAYER_PARTITION given in engine.env replaces the split.
    """
    if partition is not None:
        return partition
    base, extra = divmod(num_layers, pipeline)
    parts = [base] * pipeline
    for index in range(2, extra + 2):
        parts[-index] += 1
    return tuple(parts)


def kv_bytes_per_token(
    facts: ModelFacts, settings: EngineSettings, tensor: int, pipeline: int, *, layers: int | None = None
) -> int:
    """KV-cache bytes one GPU stores per token (vLLM's page size divided by the block size).

    Standard attention stores K and V for the KV heads of this rank: heads are split across
    tensor-parallel ranks, and replicated when tensor > KV heads. Multi-head latent attention
    (DeepSeek-V2/V3) stores one compressed latent (kv_lora_rank + qk_rope_head_dim) per token per
    layer on every rank: it is not split by tensor parallelism.
    """
    if layers is None:
        layers = math.ceil(facts.num_hidden_layers / pipeline)
    element = kv_element_bytes(facts, settings)
    if facts.uses_mla:
        latent = (facts.kv_lora_rank or 0) + (facts.qk_rope_head_dim or 0)
        return layers * latent * element
    kv_heads_per_rank = max(1, facts.kv_heads // tensor)
    return 2 * layers * kv_heads_per_rank * facts.head_size * element


def stage_weights_bytes(facts: ModelFacts, settings: EngineSettings, layers: int, *, first: bool, last: bool) -> int:
    """Weight bytes of one pipeline stage (all its tensor ranks together).

    Decoder layers share the replica's layer weights evenly; the first stage also holds the
    embeddings and the last the output head (a copy of the embeddings when they are tied and
    the stages differ, as vLLM builds it).
    """
    counts = parameter_counts(facts)
    scale = facts.parameters / counts.total if facts.parameters else 1.0
    # Embeddings and the output head stay 16-bit under weight quantization (see weights_bytes).
    unit = compute_dtype_bytes(facts, settings) if weight_bits(facts, settings) == 16 else 2
    table = facts.vocab_size * facts.hidden_size * scale * unit
    head_in_total = 0.0 if facts.tie_word_embeddings else table
    per_layer = (weights_bytes(facts, settings) - table - head_in_total) / facts.num_hidden_layers
    stage = per_layer * layers
    if first:
        stage += table
    if last and not (first and facts.tie_word_embeddings):
        stage += table
    return int(stage)


def is_h100_class(product: str, memory_mib: int) -> bool:
    """vLLM raises its batching defaults on >= 70 GiB GPUs other than the A100."""
    return memory_mib >= 70 * 1024 and "a100" not in product.lower()


def default_max_num_batched_tokens(product: str, memory_mib: int) -> int:
    return 8192 if is_h100_class(product, memory_mib) else 2048


def default_max_num_seqs(product: str, memory_mib: int) -> int:
    return 1024 if is_h100_class(product, memory_mib) else 256


def activation_bytes(facts: ModelFacts, settings: EngineSettings, tensor: int, tokens: int) -> int:
    """Peak activation of the profiling forward pass over `tokens` tokens on one rank."""
    h = facts.hidden_size
    if facts.uses_mla:
        q_head = (facts.qk_nope_head_dim or 0) + (facts.qk_rope_head_dim or 0)
        attention = facts.num_attention_heads * (q_head + (facts.v_head_dim or 0)) // tensor
        attention += (facts.kv_lora_rank or 0) + (facts.qk_rope_head_dim or 0)
    else:
        attention = (facts.num_attention_heads + 2 * facts.kv_heads) * facts.head_size // tensor
    mlp = 0
    has_dense = not facts.is_moe or facts.first_k_dense_layers > 0
    if has_dense:
        mlp = 2 * facts.intermediate_size // tensor
    if facts.is_moe:
        width = facts.moe_intermediate_size or facts.intermediate_size
        top_k = facts.num_experts_per_token or 2
        mlp = max(mlp, top_k * (3 * width // tensor + h))
    per_token = 4 * h + attention + mlp
    return tokens * per_token * compute_dtype_bytes(facts, settings)


def estimate(
    facts: ModelFacts,
    settings: EngineSettings,
    *,
    product: str,
    memory_mib: int,
    tensor: int,
    pipeline: int,
) -> MemoryEstimate:
    """Estimate one GPU of a replica with `tensor` x `pipeline` GPUs of `memory_mib` MiB.

    Every pipeline stage is estimated on its own; the result is the binding stage (the fewest
    KV tokens), whose capacity is the replica's.
    """
    gpus = tensor * pipeline
    max_model_len = settings.max_model_len or facts.max_position_embeddings
    budget = int((memory_mib - CUDA_RESERVED_MIB) * MIB * settings.gpu_memory_utilization)
    batched = settings.max_num_batched_tokens or default_max_num_batched_tokens(product, memory_mib)
    seqs = settings.max_num_seqs or default_max_num_seqs(product, memory_mib)
    activation = activation_bytes(facts, settings, tensor, batched)
    non_torch = NON_TORCH_SINGLE_GPU if gpus == 1 else NON_TORCH_MULTI_GPU
    layers = stage_layers(facts.num_hidden_layers, pipeline, settings.pp_layer_partition)
    stages: list[MemoryEstimate] = []
    for index, count in enumerate(layers):
        last = index == pipeline - 1
        weights = stage_weights_bytes(facts, settings, count, first=index == 0, last=last) // tensor
        # Only the last stage computes logits, so only it runs the dummy sampler pass.
        sampler = seqs * facts.vocab_size * 4 * SAMPLER_LOGIT_COPIES if last else 0
        cuda_graphs = 0 if settings.enforce_eager else CUDA_GRAPH_BASE + CUDA_GRAPH_PER_LAYER * count
        kv_cache = budget - weights - activation - sampler - non_torch - cuda_graphs
        per_token = kv_bytes_per_token(facts, settings, tensor, pipeline, layers=max(count, 1))
        blocks = kv_cache // (per_token * BLOCK_SIZE) if kv_cache > 0 else 0
        stages.append(
            MemoryEstimate(
                budget=budget,
                weights=weights,
                activation=activation,
                sampler=sampler,
                non_torch=non_torch,
                cuda_graphs=cuda_graphs,
                kv_cache=kv_cache,
                kv_bytes_per_token=per_token,
                kv_cache_tokens=blocks * BLOCK_SIZE,
                max_model_len=max_model_len,
                stage_layers=layers,
                binding_stage=index,
            )
        )
    return min(stages, key=lambda stage: (stage.kv_cache_tokens, stage.kv_cache))
