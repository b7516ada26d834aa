"""Table-driven placement decisions: model x GPU pool x settings, impossible requests included.

Each expectation follows from the sizing rules in docs/planner.md (worked through in the
comments where the answer is not obvious).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from argosy_operator.planner import (
    EngineSettings,
    GpuPool,
    PlacementError,
    PlanRequest,
    estimate,
    find_shipped,
    plan,
)
from argosy_operator.planner.memory import stage_layers

L4_1 = GpuPool("NVIDIA-L4", 23034, gpus_per_node=1, nodes=4)
L4_4 = GpuPool("NVIDIA-L4", 23034, gpus_per_node=4, nodes=2)
L40S_4 = GpuPool("NVIDIA-L40S", 46068, gpus_per_node=4, nodes=2)
A100_40 = GpuPool("NVIDIA-A100-SXM4-40GB", 40960, gpus_per_node=8, nodes=2)
A100_80 = GpuPool("NVIDIA-A100-SXM4-80GB", 81920, gpus_per_node=8, nodes=2)
H100 = GpuPool("NVIDIA-H100-80GB-HBM3", 81559, gpus_per_node=8, nodes=2)
H100_ONE_NODE = GpuPool("NVIDIA-H100-80GB-HBM3", 81559, gpus_per_node=8, nodes=1)
H200 = GpuPool("NVIDIA-H200", 143771, gpus_per_node=8, nodes=1)


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    pools: list[GpuPool]
    settings: dict[str, object] = field(default_factory=dict)
    tensor: int | None = None
    pipeline: int | None = None
    gpu_count: int | None = None
    products: tuple[str, ...] = ()
    target: int = 4
    # expected placement ...
    tp: int | None = None
    pp: int = 1
    pods: int = 1
    gpus_per_pod: int | None = None
    product: str | None = None
    meets_target: bool | None = True
    # ... or expected failure
    error: str | None = None
    message_has: tuple[str, ...] = ()


LEN_8K = {"max_model_len": 8192}

CASES = [
    # Small models: one GPU is plenty.
    Case("llama-1b-on-L4", "llama-3.2-1b", [L4_1], LEN_8K, tp=1, product="NVIDIA-L4"),
    Case("qwen-0.5b-on-L4", "qwen2.5-0.5b", [L4_1], {"max_model_len": 4096}, tp=1, product="NVIDIA-L4"),
    Case("phi-3-mini-on-L4", "phi-3-mini", [L4_1], {}, tp=1, product="NVIDIA-L4"),
    Case("llama-3b-on-L4-16k", "llama-3.2-3b", [L4_4], {"max_model_len": 16384}, tp=1),
    # At 32k one L4 holds ~3.5 sequences of Llama 3.2 3B (112 KiB of KV per token): tensor 2.
    Case("llama-3b-on-L4-32k", "llama-3.2-3b", [L4_4], {"max_model_len": 32768}, tp=2),
    # Llama 3.1 8B on L4: 15 GiB of weights leave ~3.6 sequences of 8k on one L4, below the target of 4.
    Case("llama-8b-L4-grows-to-tp2", "llama-3.1-8b", [L4_4], LEN_8K, tp=2, product="NVIDIA-L4"),
    Case("llama-8b-L4-target-1", "llama-3.1-8b", [L4_4], LEN_8K, target=1, tp=1),
    Case(
        "llama-8b-L4-single-gpu-nodes",
        "llama-3.1-8b",
        [L4_1],
        LEN_8K,
        tp=1,
        meets_target=False,
        message_has=("below the target",),
    ),
    Case("llama-8b-H100", "llama-3.1-8b", [H100], LEN_8K, tp=1, product="NVIDIA-H100-80GB-HBM3"),
    # At the default 131,072-token context one H100 holds ~3.3 sequences: two GPUs are needed.
    Case("llama-8b-H100-128k", "llama-3.1-8b", [H100], {}, tp=2),
    # Two L4s (45 GiB) are a smaller footprint than one H100 (80 GiB).
    Case("llama-8b-prefers-smaller-footprint", "llama-3.1-8b", [H100, L4_4], LEN_8K, tp=2, product="NVIDIA-L4"),
    # One A100-40GB (40 GiB) beats two L4s (45 GiB).
    Case(
        "llama-8b-A100-40-beats-two-L4", "llama-3.1-8b", [L4_4, A100_40], LEN_8K, tp=1, product="NVIDIA-A100-SXM4-40GB"
    ),
    Case(
        "llama-8b-products-allow-list",
        "llama-3.1-8b",
        [L4_4, H100],
        LEN_8K,
        products=("NVIDIA-H100-80GB-HBM3",),
        tp=1,
        product="NVIDIA-H100-80GB-HBM3",
    ),
    Case(
        "llama-8b-products-case-insensitive",
        "llama-3.1-8b",
        [L4_4, H100],
        LEN_8K,
        products=("nvidia-l4",),
        tp=2,
        product="NVIDIA-L4",
    ),
    # One 1-GPU L4 node cannot hold a 131,072-token sequence: pipeline across nodes; the target of
    # 4 sequences is not reached even on all 4 nodes, so the most capacity wins.
    Case(
        "llama-8b-128k-L4-single-gpu-nodes-pipeline",
        "llama-3.1-8b",
        [L4_1],
        {},
        tp=1,
        pp=4,
        pods=4,
        gpus_per_pod=1,
        meets_target=False,
    ),
    # Llama 3.1 70B bf16 (131 GiB): TP2 on H100 holds ~1.9 sequences of 8k, TP4 meets the target.
    Case("llama-70b-H100", "llama-3.1-70b", [H100], LEN_8K, tp=4, product="NVIDIA-H100-80GB-HBM3"),
    # The reason names what was given and what chosen (issue 9: it used to say "Explicit parallelism").
    Case(
        "llama-70b-H100-pipeline-1-given",
        "llama-3.1-70b",
        [H100],
        LEN_8K,
        pipeline=1,
        tp=4,
        message_has=("Given pipeline 1; chose tensor 4 on 4 x NVIDIA-H100-80GB-HBM3: the fewest GPUs", "target of 4"),
    ),
    Case("llama-70b-H100-target-1", "llama-3.1-70b", [H100], LEN_8K, target=1, tp=2),
    Case("llama-70b-A100-80", "llama-3.1-70b", [A100_80], LEN_8K, tp=4),
    Case("llama-70b-A100-40", "llama-3.1-70b", [A100_40], LEN_8K, tp=8),
    Case("llama-3.3-70b-fp8-H100", "llama-3.3-70b", [H100], {**LEN_8K, "quantization": "fp8"}, tp=2),
    Case(
        "llama-70b-fp8-low-utilization",
        "llama-3.1-70b",
        [H100],
        {**LEN_8K, "quantization": "fp8", "gpu_memory_utilization": 0.5},
        tp=4,
    ),
    Case("llama-70b-awq-L4", "llama-3.1-70b", [L4_4], {**LEN_8K, "quantization": "awq"}, tp=4),
    Case(
        "llama-70b-kv-fp8-A100-80-target-1",
        "llama-3.1-70b",
        [A100_80],
        {**LEN_8K, "kv_cache_dtype": "fp8"},
        target=1,
        tp=2,
    ),
    # Llama 3.1 405B bf16 (756 GiB) needs more than one 8 x H100 node: tensor 8 x pipeline 2.
    Case(
        "llama-405b-two-H100-nodes",
        "llama-3.1-405b",
        [H100],
        LEN_8K,
        tp=8,
        pp=2,
        pods=2,
        gpus_per_pod=8,
        message_has=(
            "Chose tensor 8 x pipeline 2 on 2 nodes x 8 NVIDIA-H100-80GB-HBM3, 2 pods per replica",
            "one node of 8 x NVIDIA-H100-80GB-HBM3 cannot hold one 8,192-token sequence",
            "one stage per node",
            "meeting the target of 4",
        ),
    ),
    # An explicit pipeline with tensor = the GPUs of a node is a group of two pods, also for a small model.
    Case(
        "explicit-tensor-8-pipeline-2-spans-nodes",
        "llama-3.1-70b",
        [H100],
        LEN_8K,
        tensor=8,
        pipeline=2,
        tp=8,
        pp=2,
        pods=2,
        gpus_per_pod=8,
        message_has=("Given tensor 8 and pipeline 2 (spec) on 2 nodes x 8 NVIDIA-H100-80GB-HBM3, 2 pods per replica",),
    ),
    Case(
        "explicit-pipeline-2-tensor-auto-on-single-gpu-nodes",
        "llama-3.1-8b",
        [L4_1],
        LEN_8K,
        pipeline=2,
        tp=1,
        pp=2,
        pods=2,
        gpus_per_pod=1,
        message_has=("Given pipeline 2; chose tensor 1", "the given values need 2 nodes"),
    ),
    Case(
        "llama-405b-H200-node",
        "llama-3.1-405b",
        [H200],
        LEN_8K,
        tp=8,
        product="NVIDIA-H200",
        message_has=("Chose tensor 8 x pipeline 1 on 8 x NVIDIA-H200: the fewest GPUs whose KV cache holds",),
    ),
    Case("llama-405b-fp8-one-H100-node", "llama-3.1-405b", [H100_ONE_NODE], {**LEN_8K, "quantization": "fp8"}, tp=8),
    # DeepSeek-V3 (fp8 checkpoint, 627 GiB): one H200 node; two H100 nodes.
    Case("deepseek-v3-H200", "deepseek-v3", [H200], {"max_model_len": 32768}, tp=8),
    Case(
        "deepseek-v3-two-H100-nodes",
        "deepseek-v3",
        [H100],
        {"max_model_len": 32768},
        tp=8,
        pp=2,
        pods=2,
        gpus_per_pod=8,
    ),
    Case("qwen3-235b-bf16-H100", "qwen3-235b-a22b", [H100], {}, tp=8),
    Case("qwen3-235b-fp8-H100", "qwen3-235b-a22b", [H100], {"quantization": "fp8"}, tp=4),
    Case("mixtral-8x7b-A100-80", "mixtral-8x7b", [A100_80], {}, tp=2),
    Case("mixtral-8x7b-L40S", "mixtral-8x7b", [L40S_4], LEN_8K, tp=4, product="NVIDIA-L40S"),
    Case("mixtral-8x22b-H100", "mixtral-8x22b", [H100], {}, tp=8),
    Case("gemma-2-9b-L4", "gemma-2-9b", [L4_4], LEN_8K, tp=2),
    # Gemma 2 9B does not fit one L4 at all; 1-GPU nodes need a pipeline of two.
    Case("gemma-2-9b-L4-pipeline", "gemma-2-9b", [L4_1], LEN_8K, tp=1, pp=2, pods=2, gpus_per_pod=1),
    Case("gemma-2-27b-A100-80", "gemma-2-27b", [A100_80], LEN_8K, tp=1),
    # Phi-4 has 10 KV heads: tensor 4 is invalid in vLLM, so tensor 2 alone (below the target) cannot use
    # the 4-GPU L4 node; two pipeline stages of tensor 2 on the same node can.
    Case(
        "phi-4-L4-kv-heads-pipeline-within-node",
        "phi-4",
        [L4_4],
        {"max_model_len": 16384},
        tp=2,
        pp=2,
        pods=1,
        gpus_per_pod=4,
        message_has=("(one node): tensor 4 neither divides nor is a multiple of the 10 KV heads", "meeting the target"),
    ),
    Case(
        "phi-4-L4-explicit-pipeline-1-stops-at-tensor-2",
        "phi-4",
        [L4_4],
        {"max_model_len": 16384},
        pipeline=1,
        tp=2,
        meets_target=False,
        message_has=("Given pipeline 1; chose tensor 2", "below the target of 4: the node is used up"),
    ),
    Case("qwen2.5-7b-L4-32k", "qwen2.5-7b", [L4_1], {}, tp=1, meets_target=False),
    Case("qwen2.5-14b-L40S", "qwen2.5-14b", [L40S_4], {}, tp=2),
    # 61 GiB of weights leave one H100 room for ~27k tokens (256 KiB each): not one 32k sequence.
    Case("qwen2.5-32b-H100", "qwen2.5-32b", [H100], {}, tp=2),
    Case("qwen2.5-32b-H100-16k-target-1", "qwen2.5-32b", [H100], {"max_model_len": 16384}, target=1, tp=1),
    Case("qwen2.5-72b-H100", "qwen2.5-72b", [H100], {}, tp=4),
    Case("qwen3-8b-L40S", "qwen3-8b", [L40S_4], {}, tp=1),
    Case("qwen3-32b-H100", "qwen3-32b", [H100], {}, tp=2),
    Case("mistral-7b-L4", "mistral-7b", [L4_4], LEN_8K, tp=1, meets_target=True, target=2),
    Case("phi-3-medium-L40S", "phi-3-medium", [L40S_4], {}, tp=1),
    # Explicit values win.
    Case(
        "explicit-tensor-2",
        "llama-3.1-8b",
        [H100],
        LEN_8K,
        tensor=2,
        tp=2,
        message_has=("Given tensor 2; chose pipeline 1 on 2 x NVIDIA-H100-80GB-HBM3",),
    ),
    Case("explicit-gpu-count-4", "llama-3.1-8b", [H100], LEN_8K, gpu_count=4, tp=4),
    Case("explicit-pipeline-2", "llama-3.1-8b", [H100], LEN_8K, pipeline=2, tp=1, pp=2, gpus_per_pod=2),
    Case(
        "explicit-tensor-4-pipeline-2", "llama-3.1-8b", [H100], LEN_8K, tensor=4, pipeline=2, tp=4, pp=2, gpus_per_pod=8
    ),
    Case(
        "explicit-gpu-count-16-spans-nodes",
        "llama-3.1-8b",
        [H100],
        LEN_8K,
        gpu_count=16,
        tp=8,
        pp=2,
        pods=2,
        gpus_per_pod=8,
    ),
    Case("explicit-tensor-16-across-nodes", "llama-3.1-8b", [H100], LEN_8K, tensor=16, tp=16, pods=2, gpus_per_pod=8),
    Case("explicit-gpu-count-3-uses-pipeline", "llama-3.1-8b", [H100], LEN_8K, gpu_count=3, tp=1, pp=3, gpus_per_pod=3),
    # Impossible requests.
    Case(
        "tensor-3-32-heads",
        "llama-3.1-8b",
        [H100],
        tensor=3,
        error="InvalidParallelism",
        message_has=("32 attention heads", "1, 2, 4, 8"),
    ),
    Case(
        "tensor-7-qwen-kv-heads", "qwen2.5-7b", [H100], tensor=7, error="InvalidParallelism", message_has=("KV heads",)
    ),
    Case(
        "awq-groups-forbid-tensor-2",
        "qwen2.5-72b",
        [H100],
        {"quantization": "awq"},
        tensor=2,
        error="InvalidParallelism",
        message_has=("quantization groups",),
    ),
    Case(
        "pipeline-exceeds-layers",
        "llama-3.2-1b",
        [H100],
        pipeline=17,
        error="InvalidParallelism",
        message_has=("16 layers",),
    ),
    Case("count-not-divisible-by-tensor", "llama-3.1-8b", [H100], gpu_count=3, tensor=2, error="InvalidParallelism"),
    Case("tensor-wider-than-cluster", "llama-3.1-8b", [L4_4], tensor=16, error="InvalidParallelism"),
    Case(
        "405b-restricted-to-L4",
        "llama-3.1-405b",
        [H100, L4_4],
        LEN_8K,
        products=("NVIDIA-L4",),
        error="InsufficientGpuMemory",
        message_has=("NVIDIA-L4", "would fit", "NVIDIA-H100-80GB-HBM3"),
    ),
    Case(
        "405b-one-H100-node-suggests-fp8",
        "llama-3.1-405b",
        [H100_ONE_NODE],
        LEN_8K,
        error="InsufficientGpuMemory",
        message_has=("quantization fp8 on 8 x NVIDIA-H100-80GB-HBM3",),
    ),
    # fp8 (67.7 GiB) over four 1-GPU L4 nodes would be 16.9 GiB per GPU if split evenly, but the first
    # stage also holds the 2 GiB bf16 embeddings and the last the output head: neither stage fits, so
    # the hint is AWQ.
    Case(
        "70b-on-single-L4s-suggests-awq",
        "llama-3.1-70b",
        [L4_1],
        LEN_8K,
        error="InsufficientGpuMemory",
        message_has=("with quantization awq on 3 nodes x 1 NVIDIA-L4",),
    ),
    Case(
        "8b-128k-one-L4-suggests-shorter-len",
        "llama-3.1-8b",
        [GpuPool("NVIDIA-L4", 23034, 1, 1)],
        {},
        error="InsufficientGpuMemory",
        message_has=("maxModelLen 16,384",),
    ),
    Case(
        "explicit-tensor-2-70b-A100-40-too-small",
        "llama-3.1-70b",
        [A100_40],
        LEN_8K,
        tensor=2,
        pipeline=1,
        error="InsufficientGpuMemory",
        message_has=("requested tensor 2", "automatic parallelism (tensor 8"),
    ),
    Case(
        "no-matching-product",
        "llama-3.1-8b",
        [L4_4],
        products=("NVIDIA-B200",),
        error="NoMatchingGpus",
        message_has=("NVIDIA-B200", "NVIDIA-L4"),
    ),
    Case("no-gpu-nodes", "llama-3.1-8b", [], error="NoMatchingGpus"),
    # Mistral 7B v0.3 was trained for 32k tokens; vLLM refuses a longer max_model_len.
    Case(
        "max-model-len-beyond-the-trained-context",
        "mistral-7b",
        [H100],
        {"max_model_len": 65536},
        error="MaxModelLenTooLong",
        message_has=("32,768", "engine.maxModelLen"),
    ),
]


def _request(case: Case) -> PlanRequest:
    shipped = find_shipped(case.model)
    assert shipped is not None
    return PlanRequest(
        model=shipped.repos[0],
        facts=shipped.facts,
        settings=EngineSettings(**case.settings),  # type: ignore[arg-type]
        target_sequences=case.target,
        tensor=case.tensor,
        pipeline=case.pipeline,
        gpu_count=case.gpu_count,
        products=case.products,
    )


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert sum(1 for c in CASES if c.error) >= 10


@pytest.mark.parametrize("case", [c for c in CASES if c.error is None], ids=lambda c: c.id)
def test_placement(case: Case) -> None:
    placement = plan(_request(case), case.pools)
    assert (placement.tensor_parallel_size, placement.pipeline_parallel_size, placement.pods_per_replica) == (
        case.tp,
        case.pp,
        case.pods,
    )
    expected_per_pod = case.gpus_per_pod or (case.tp or 1) * case.pp
    assert placement.gpus_per_pod == expected_per_pod
    assert placement.gpus_per_pod * placement.pods_per_replica == placement.tensor_parallel_size * case.pp
    if case.product:
        assert placement.gpu_product == case.product
    # Every placement holds at least one full-length sequence (vLLM refuses to start otherwise).
    assert placement.max_concurrency >= 1.0
    assert placement.kv_cache_tokens >= placement.max_model_len
    if case.meets_target is not None:
        assert (placement.max_concurrency >= case.target) == case.meets_target
    for text in case.message_has:
        assert text in placement.reason
    assert placement.reason.endswith(".") and placement.reason.count(". ") == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.error is not None], ids=lambda c: c.id)
def test_impossible_request(case: Case) -> None:
    with pytest.raises(PlacementError) as caught:
        plan(_request(case), case.pools)
    assert caught.value.reason == case.error
    for text in case.message_has:
        assert text in caught.value.message
    assert caught.value.message.endswith(".")


def test_the_target_is_reported_when_no_node_reaches_it() -> None:
    case = _case("llama-8b-L4-single-gpu-nodes")
    placement = plan(_request(case), case.pools)
    assert placement.max_concurrency < 4
    assert "below the target of 4" in placement.reason


def test_to_status_has_exactly_the_nine_keys() -> None:
    case = _case("llama-8b-H100")
    placement = plan(_request(case), case.pools)
    status = placement.to_status()
    assert list(status) == [
        "tensorParallelSize",
        "pipelineParallelSize",
        "gpusPerPod",
        "podsPerReplica",
        "gpuProduct",
        "weightsGiB",
        "kvCacheTokens",
        "maxConcurrency",
        "reason",
    ]
    assert status["tensorParallelSize"] == 1 and status["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"
    assert isinstance(status["kvCacheTokens"], int) and status["kvCacheTokens"] > 0


@pytest.mark.parametrize(
    ("layers", "pipeline", "split"),
    [
        # vllm.distributed.utils.get_pp_indices: the remainder goes to the stages before the last.
        (126, 2, (63, 63)),
        (61, 2, (31, 30)),
        (22, 4, (5, 6, 6, 5)),
        (5, 3, (2, 2, 1)),
        (4, 3, (1, 2, 1)),
        (3, 2, (2, 1)),
        (61, 4, (15, 15, 16, 15)),
    ],
)
def test_layers_split_across_stages_as_vllm_splits_them(layers: int, pipeline: int, split: tuple[int, ...]) -> None:
    assert stage_layers(layers, pipeline) == split


def test_the_stage_with_the_most_layers_binds_the_kv_cache() -> None:
    facts = find_shipped("deepseek-v3").facts  # 61 layers: 31 on stage 0 (with the embeddings), 30 on stage 1
    settings = EngineSettings(max_model_len=32768)
    memory = estimate(facts, settings, product=H100.product, memory_mib=H100.memory_mib, tensor=8, pipeline=2)
    assert memory.stage_layers == (31, 30) and memory.binding_stage == 0
    # A partition that moves layers to stage 1 makes stage 1 bind, with a smaller cache than an even split.
    skewed = estimate(
        facts,
        replace(settings, pp_layer_partition=(21, 40)),
        product=H100.product,
        memory_mib=H100.memory_mib,
        tensor=8,
        pipeline=2,
    )
    assert skewed.binding_stage == 1 and skewed.kv_cache_tokens < memory.kv_cache_tokens
    placement = plan(PlanRequest("deepseek-v3", facts, settings, tensor=8, pipeline=2), [H100])
    assert placement.kv_cache_tokens == memory.kv_cache_tokens


def test_a_layer_partition_in_engine_env_is_checked_and_fixes_the_pipeline() -> None:
    facts = find_shipped("llama-3.1-8b").facts
    good = PlanRequest("llama-3.1-8b", facts, EngineSettings(max_model_len=8192, pp_layer_partition=(16, 16)))
    assert plan(good, [H100]).pipeline_parallel_size == 2
    bad = PlanRequest("llama-3.1-8b", facts, EngineSettings(max_model_len=8192, pp_layer_partition=(10, 10)))
    with pytest.raises(PlacementError, match="adding up to the 32 layers"):
        plan(bad, [H100])
