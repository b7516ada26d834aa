"""The placement decision: how many GPUs of which product, and what tensor/pipeline parallelism.

Rules (docs/planner.md explains them with worked examples):

- A replica must hold at least one maxModelLen-token sequence in its KV cache (vLLM refuses to
  start otherwise).
- Within one node, grow tensor parallelism (only sizes vLLM accepts for this model) until the KV
  cache holds `target_sequences` full-length sequences, or the node is used up.
- Only when a whole node cannot hold even one sequence: tensor = GPUs per node, pipeline = nodes.
- Among the allowed GPU pools prefer one that reaches the target, with the smallest footprint
  (GPUs x GPU memory); a target that no pool reaches is reported, not hidden.
- Explicit tensor / pipeline / GPU counts win; impossible requests raise PlacementError.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from argosy_operator.api import EnvVar, LLMDeploymentSpec, ModelFacts
from argosy_operator.planner.errors import PlacementError
from argosy_operator.planner.facts import hf_repo_id, resolve_facts
from argosy_operator.planner.inventory import GpuPool
from argosy_operator.planner.memory import (
    GIB,
    GROUPED_FOUR_BIT,
    EngineSettings,
    MemoryEstimate,
    compute_dtype_name,
    effective_quantization,
    estimate,
    quant_group_size,
    weight_bits,
    weights_bytes,
)

# How many nodes the "what would fit" hint may imagine for one replica.
_HYPOTHETICAL_NODES = 16


@dataclass(frozen=True)
class Placement:
    """The planner's decision for one replica."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpus_per_pod: int
    pods_per_replica: int
    gpu_product: str | None
    weights_gib: float
    kv_cache_tokens: int
    max_concurrency: float
    reason: str
    max_model_len: int = 0
    memory: MemoryEstimate | None = None

    def to_status(self) -> dict[str, Any]:
        """The status.placement object (also `argosy-operator plan --output json`)."""
        return {
            "tensorParallelSize": self.tensor_parallel_size,
            "pipelineParallelSize": self.pipeline_parallel_size,
            "gpusPerPod": self.gpus_per_pod,
            "podsPerReplica": self.pods_per_replica,
            "gpuProduct": self.gpu_product,
            "weightsGiB": self.weights_gib,
            "kvCacheTokens": self.kv_cache_tokens,
            "maxConcurrency": self.max_concurrency,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class PlanRequest:
    """Everything the decision depends on besides the GPU inventory."""

    model: str
    facts: ModelFacts
    settings: EngineSettings = field(default_factory=EngineSettings)
    target_sequences: int = 4
    tensor: int | None = None
    pipeline: int | None = None
    gpu_count: int | None = None
    products: tuple[str, ...] = ()

    @property
    def max_model_len(self) -> int:
        return self.settings.max_model_len or self.facts.max_position_embeddings


@dataclass(frozen=True)
class _Option:
    pool: GpuPool
    tensor: int
    pipeline: int
    pods: int
    gpus_per_pod: int
    memory: MemoryEstimate

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline

    @property
    def fits(self) -> bool:
        return self.memory.holds_one_sequence

    def meets(self, target: int) -> bool:
        return self.memory.kv_cache_tokens >= target * self.memory.max_model_len


class _PoolFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def tensor_problem(facts: ModelFacts, settings: EngineSettings, tensor: int) -> str | None:
    """Why vLLM would refuse this tensor-parallel size for the model, or None."""
    heads = facts.num_attention_heads
    if heads % tensor:
        return f"tensor {tensor} does not divide the {heads} attention heads"
    kv = facts.kv_heads
    if not facts.uses_mla and (kv % tensor if tensor <= kv else tensor % kv):
        return f"tensor {tensor} neither divides nor is a multiple of the {kv} KV heads"
    if (not facts.is_moe or facts.first_k_dense_layers) and facts.intermediate_size % tensor:
        return f"tensor {tensor} does not divide the MLP width {facts.intermediate_size}"
    moe_width = facts.moe_intermediate_size or facts.intermediate_size
    if facts.is_moe and moe_width % tensor:
        return f"tensor {tensor} does not divide the expert MLP width {moe_width}"
    if effective_quantization(facts, settings) in GROUPED_FOUR_BIT:
        group = quant_group_size(facts, settings)
        width = moe_width if facts.is_moe else facts.intermediate_size
        if (width // tensor) % group:
            return (
                f"tensor {tensor} splits the MLP width {width} into shards that are not whole "
                f"{group}-weight quantization groups"
            )
    return None


def valid_tensor_sizes(facts: ModelFacts, settings: EngineSettings, upto: int) -> list[int]:
    return [t for t in range(1, upto + 1) if tensor_problem(facts, settings, t) is None]


def _layout(pool: GpuPool, tensor: int, pipeline: int) -> tuple[int, int] | None:
    """(pods per replica, GPUs per pod) for tensor x pipeline GPUs on this pool, or None."""
    gpn = pool.gpus_per_node
    gpus = tensor * pipeline
    if gpus <= gpn:
        return 1, gpus
    if tensor <= gpn:
        stages_per_node = gpn // tensor
        if pipeline % stages_per_node == 0:
            pods, per_pod = pipeline // stages_per_node, stages_per_node * tensor
        else:
            pods, per_pod = pipeline, tensor
    elif tensor % gpn == 0:
        pods, per_pod = (tensor // gpn) * pipeline, gpn
    else:
        return None
    return (pods, per_pod) if pods <= pool.nodes else None


def _evaluate(req: PlanRequest, pool: GpuPool, tensor: int, pipeline: int) -> _Option | None:
    layout = _layout(pool, tensor, pipeline)
    if layout is None:
        return None
    memory = estimate(
        req.facts,
        req.settings,
        product=pool.product,
        memory_mib=pool.memory_mib,
        tensor=tensor,
        pipeline=pipeline,
    )
    return _Option(pool, tensor, pipeline, layout[0], layout[1], memory)


def _pick_growing(options: list[_Option], target: int) -> _Option | None:
    """Fewest GPUs that reach the target; else the most KV among those holding one sequence."""
    fitting = [o for o in options if o.fits]
    for option in fitting:
        if option.meets(target):
            return option
    return max(fitting, key=lambda o: o.memory.kv_cache_tokens, default=None)


def _check_explicit(req: PlanRequest) -> None:
    """Problems with explicit values that no pool can fix."""
    layers = req.facts.num_hidden_layers
    context = req.facts.max_position_embeddings
    if req.settings.max_model_len and req.settings.max_model_len > context:
        # vLLM refuses to start when max_model_len exceeds the length the model was trained for.
        raise PlacementError(
            "MaxModelLenTooLong",
            f"maxModelLen {req.settings.max_model_len:,} exceeds the {context:,}-token context of {req.model} "
            f"(max_position_embeddings); set engine.maxModelLen to {context:,} or less.",
        )
    if req.tensor is not None:
        problem = tensor_problem(req.facts, req.settings, req.tensor)
        if problem:
            valid = ", ".join(map(str, valid_tensor_sizes(req.facts, req.settings, 64)[:12]))
            raise PlacementError("InvalidParallelism", f"{problem} of {req.model}; valid tensor sizes: {valid}.")
    partition = req.settings.pp_layer_partition
    if partition is not None and (sum(partition) != layers or (req.pipeline or len(partition)) != len(partition)):
        raise PlacementError(
            "InvalidParallelism",
            f"VLLM_PP_LAYER_PARTITION {','.join(map(str, partition))} must name one layer count per pipeline "
            f"stage ({req.pipeline or len(partition)}) adding up to the {layers} layers of {req.model}.",
        )
    if req.pipeline is not None and req.pipeline > layers:
        raise PlacementError(
            "InvalidParallelism",
            f"pipeline {req.pipeline} exceeds the {layers} layers of {req.model}.",
        )
    count = req.gpu_count
    if count is not None:
        for name, value in (("tensor", req.tensor), ("pipeline", req.pipeline)):
            if value is not None and count % value:
                raise PlacementError("InvalidParallelism", f"{name} {value} does not divide gpu.count {count}.")
        if req.tensor is not None and req.pipeline is not None and req.tensor * req.pipeline != count:
            raise PlacementError(
                "InvalidParallelism",
                f"tensor {req.tensor} x pipeline {req.pipeline} is not gpu.count {count}.",
            )


def _plan_pool(req: PlanRequest, pool: GpuPool) -> _Option:
    """The best option on one pool, or _PoolFailure."""
    facts, settings, target = req.facts, req.settings, req.target_sequences
    gpn = pool.gpus_per_node
    t, p, count = req.tensor, req.pipeline, req.gpu_count
    if t is None and p is not None and count is not None:
        t = count // p
    if p is None and t is not None and count is not None:
        p = count // t

    if t is not None and p is not None:
        option = _evaluate(req, pool, t, p)
        if option is None:
            raise _PoolFailure(
                "InvalidParallelism", f"{t * p} GPUs per replica cannot be laid out on {pool.describe()}"
            )
        if not option.fits:
            raise _PoolFailure("InsufficientGpuMemory", f"tensor {t} x pipeline {p} on {pool.product} is too small")
        return option

    if count is not None:
        # Tensor as wide as a node allows, pipeline across the rest.
        tensors = [
            x
            for x in valid_tensor_sizes(facts, settings, min(count, gpn))
            if count % x == 0 and (count <= gpn or gpn % x == 0) and count // x <= facts.num_hidden_layers
        ]
        candidates = [o for x in reversed(tensors) if (o := _evaluate(req, pool, x, count // x))]
        if not candidates:
            raise _PoolFailure("InvalidParallelism", f"gpu.count {count} cannot be laid out on {pool.describe()}")
        fitting = [o for o in candidates if o.fits]
        if not fitting:
            raise _PoolFailure("InsufficientGpuMemory", f"{count} x {pool.product} is too small")
        return fitting[0]

    if t is not None:
        candidates = [o for x in range(1, facts.num_hidden_layers + 1) if (o := _evaluate(req, pool, t, x))]
        if not candidates:
            raise _PoolFailure("InvalidParallelism", f"tensor {t} cannot be laid out on {pool.describe()}")
        fitting = [o for o in candidates if o.fits]
        if not fitting:
            raise _PoolFailure("InsufficientGpuMemory", f"tensor {t} on {pool.product} is too small")
        return fitting[0]

    stages = p or 1
    single = [o for x in valid_tensor_sizes(facts, settings, gpn // stages) if (o := _evaluate(req, pool, x, stages))]
    if p is None:
        single += _pipelined_within_node(req, pool)
    chosen = _pick_growing(single, target)
    if chosen is not None:
        return chosen
    # A whole node cannot hold one sequence: tensor across the node, pipeline across nodes.
    node_tensors = [x for x in valid_tensor_sizes(facts, settings, gpn) if gpn % x == 0]
    if not node_tensors:
        raise _PoolFailure("InvalidParallelism", f"no valid tensor size fits {gpn}-GPU nodes")
    node_tensor = node_tensors[-1]
    if p is not None:
        multi = [o for o in [_evaluate(req, pool, node_tensor, p)] if o]
    else:
        multi = [
            o
            for x in range(2, min(pool.nodes * (gpn // node_tensor), facts.num_hidden_layers) + 1)
            if (o := _evaluate(req, pool, node_tensor, x)) and o.pods > 1
        ]
    chosen = _pick_growing(multi, target)
    if chosen is None:
        raise _PoolFailure("InsufficientGpuMemory", f"{pool.describe()} cannot hold one sequence")
    return chosen


def _pipelined_within_node(req: PlanRequest, pool: GpuPool) -> list[_Option]:
    """Tensor x pipeline layouts on one node for GPU counts tensor parallelism alone cannot use.

    When the attention (or KV) heads do not divide the node's GPUs, the largest valid tensor size
    leaves GPUs idle; pipeline stages of that tensor size use them (GPU counts that divide the
    node, so the rest of the node stays usable for other pods).
    """
    gpn = pool.gpus_per_node
    tensors = valid_tensor_sizes(req.facts, req.settings, gpn)
    largest = tensors[-1] if tensors else 1
    options: list[_Option] = []
    for gpus in range(largest + 1, gpn + 1):
        if gpn % gpus:
            continue
        for tensor in reversed(tensors):
            stages = gpus // tensor
            if gpus % tensor == 0 and 1 < stages <= req.facts.num_hidden_layers:
                option = _evaluate(req, pool, tensor, stages)
                if option is not None:
                    options.append(option)
                break
    return options


def _rank(option: _Option, target: int) -> tuple[Any, ...]:
    meets = option.meets(target)
    footprint = option.gpus * option.pool.memory_mib
    return (
        option.pods > 1,
        not meets,
        footprint if meets else -option.memory.kv_cache_tokens,
        option.gpus,
        option.pool.product,
    )


def _allowed(req: PlanRequest, pools: list[GpuPool]) -> list[GpuPool]:
    usable = [p for p in pools if p.nodes > 0 and p.gpus_per_node > 0]
    if not req.products:
        return usable
    allowed = {name.lower() for name in req.products}
    return [p for p in usable if p.product.lower() in allowed]


def _search(req: PlanRequest, pools: list[GpuPool]) -> tuple[_Option | None, list[_PoolFailure]]:
    options: list[_Option] = []
    failures: list[_PoolFailure] = []
    for pool in pools:
        try:
            options.append(_plan_pool(req, pool))
        except _PoolFailure as failure:
            failures.append(failure)
    best = min(options, key=lambda o: _rank(o, req.target_sequences), default=None)
    return best, failures


def _gpus_phrase(option: _Option) -> str:
    if option.pods > 1:
        return f"{option.pods} nodes x {option.gpus_per_pod} {option.pool.product}"
    return f"{option.gpus} x {option.pool.product}"


def _given(req: PlanRequest) -> list[str]:
    return [
        f"{name} {value}"
        for name, value in (("gpu.count", req.gpu_count), ("tensor", req.tensor), ("pipeline", req.pipeline))
        if value is not None
    ]


def _chosen(req: PlanRequest, option: _Option) -> str:
    """The values the planner picked (those the spec left `auto`)."""
    picked = [
        f"{name} {value}"
        for name, value, given in (
            ("tensor", option.tensor, req.tensor),
            ("pipeline", option.pipeline, req.pipeline),
        )
        if given is None
    ]
    return " x ".join(picked)


def _capacity(req: PlanRequest, option: _Option, limit: str) -> str:
    """How much the layout holds against the target, and why no more when short of it."""
    length = f"{req.max_model_len:,}"
    conc = option.memory.max_concurrency
    target = req.target_sequences
    held = f"holds {conc:.1f} sequences of {length} tokens"
    if option.meets(target):
        return f"{held}, meeting the target of {target}"
    return f"{held}, below the target of {target}: {limit}"


def _reason(req: PlanRequest, option: _Option, considered: int) -> str:
    """One sentence: which values were given, which chosen, and why (target reached or GPUs used up)."""
    pool = option.pool
    shape = f"tensor {option.tensor} x pipeline {option.pipeline}"
    where = _gpus_phrase(option)
    if option.pods > 1:
        where += f", {option.pods} pods per replica"
    given = _given(req)
    chosen = _chosen(req, option)
    if given and not chosen:
        derived = "" if req.tensor is not None and req.pipeline is not None else f", so {shape}"
        capacity = _capacity(req, option, "the given values decide")
        return f"Given {' and '.join(given)}{derived} (spec) on {where}: it {capacity}."
    prefix = f"Given {' and '.join(given)}; chose {chosen}" if given else f"Chose {shape}"
    if option.pods > 1:
        if req.tensor is None and req.pipeline is None and req.gpu_count is None:
            nodes = "one stage per node" if option.pipeline == option.pods else (
                f"{option.pipeline // option.pods} stages per node"
            )
            why = (
                f"one node of {pool.gpus_per_node} x {pool.product} cannot hold one {req.max_model_len:,}-token "
                f"sequence, so tensor {option.tensor} spans the GPUs of a node and the pipeline crosses "
                f"{option.pods} nodes ({nodes})"
            )
        else:
            why = f"the given values need {option.pods} nodes"
        limit = f"no longer pipeline on the {pool.nodes} allowed nodes holds more"
        return f"{prefix} on {where}: {why}; it {_capacity(req, option, limit)}."
    gpus = f"{pool.gpus_per_node} GPU" + ("s" if pool.gpus_per_node > 1 else "")
    limit = f"the node is used up (no valid layout on one node of {gpus} holds more)"
    if option.pipeline > 1 and req.pipeline is None:
        problem = tensor_problem(req.facts, req.settings, option.gpus)
        why = (
            f"{problem}, so pipeline stages of tensor {option.tensor} use the node's GPUs"
            if problem
            else f"pipeline stages of tensor {option.tensor} use the node's GPUs"
        )
        return f"{prefix} on {where} (one node): {why}; it {_capacity(req, option, limit)}."
    if option.meets(req.target_sequences):
        what = f"the smallest footprint of {considered} allowed GPU pools" if considered > 1 else "the fewest GPUs"
        return (
            f"{prefix} on {where}: {what} whose KV cache holds the target of "
            f"{req.target_sequences} sequences of {req.max_model_len:,} tokens ({option.memory.max_concurrency:.1f})."
        )
    return f"{prefix} on {where}: it {_capacity(req, option, limit)}."


def _placement(req: PlanRequest, option: _Option, considered: int) -> Placement:
    return Placement(
        tensor_parallel_size=option.tensor,
        pipeline_parallel_size=option.pipeline,
        gpus_per_pod=option.gpus_per_pod,
        pods_per_replica=option.pods,
        gpu_product=option.pool.product,
        weights_gib=round(weights_bytes(req.facts, req.settings) / GIB, 2),
        kv_cache_tokens=option.memory.kv_cache_tokens,
        max_concurrency=round(option.memory.max_concurrency, 2),
        reason=_reason(req, option, considered),
        max_model_len=req.max_model_len,
        memory=option.memory,
    )


def _alternatives(req: PlanRequest, allowed: list[GpuPool], all_pools: list[GpuPool]) -> list[str]:
    """What would fit, as short phrases for the error message."""
    hints: list[str] = []
    if req.tensor is not None or req.pipeline is not None or req.gpu_count is not None:
        automatic = replace(req, tensor=None, pipeline=None, gpu_count=None)
        best, _ = _search(automatic, allowed)
        if best is not None:
            hints.append(
                f"with automatic parallelism (tensor {best.tensor} x pipeline {best.pipeline} on {_gpus_phrase(best)})"
            )
    bigger = [replace(p, nodes=max(p.nodes, _HYPOTHETICAL_NODES)) for p in allowed]
    best, _ = _search(req, bigger)
    if best is not None:
        hints.append(f"on {_gpus_phrase(best)}")
    others = [p for p in all_pools if p not in allowed]
    best, _ = _search(req, others)
    if best is not None:
        hints.append(f"on {_gpus_phrase(best)}")
    if effective_quantization(req.facts, req.settings) is None:
        for method in ("fp8", "awq"):
            quantized = replace(req, settings=replace(req.settings, quantization=method))
            best, _ = _search(quantized, allowed)
            if best is not None:
                hints.append(f"with quantization {method} on {_gpus_phrase(best)}")
                break
    if not req.settings.kv_cache_dtype.startswith("fp8"):
        fp8_kv = replace(req, settings=replace(req.settings, kv_cache_dtype="fp8"))
        best, _ = _search(fp8_kv, allowed)
        if best is not None:
            hints.append(f"with kvCacheDtype fp8 on {_gpus_phrase(best)}")
    # KV memory does not depend on maxModelLen, so the longest sequence that fits is what one
    # replica's KV cache holds at the widest allowed layout.
    longest = 0
    for pool in allowed:
        tensors = [req.tensor] if req.tensor else valid_tensor_sizes(req.facts, req.settings, pool.gpus_per_node)
        for tensor in tensors:
            option = _evaluate(req, pool, tensor, req.pipeline or 1)
            if option is not None:
                longest = max(longest, option.memory.kv_cache_tokens)
    if 256 <= longest < req.max_model_len:
        length = 1 << (longest.bit_length() - 1)
        hints.append(f"with maxModelLen {length:,}")
    return list(dict.fromkeys(hints))


def plan(req: PlanRequest, pools: list[GpuPool]) -> Placement:
    """Decide the placement of one replica on the cluster's GPU pools."""
    if req.target_sequences < 1:
        raise PlacementError("InvalidParallelism", "planning.targetSequences must be at least 1.")
    _check_explicit(req)
    if req.settings.pp_layer_partition is not None and req.pipeline is None:
        # A layer partition in engine.env fixes the number of stages.
        req = replace(req, pipeline=len(req.settings.pp_layer_partition))
    allowed = _allowed(req, pools)
    if not allowed:
        have = "; ".join(p.describe() for p in pools) or "no Ready, schedulable nodes with labelled GPUs"
        wanted = ", ".join(req.products)
        raise PlacementError(
            "NoMatchingGpus",
            f"No Ready GPU nodes match spec.gpu.products ({wanted}); the cluster has {have}."
            if req.products
            else f"The cluster has {have} (the planner needs nvidia.com/gpu and the nvidia.com/gpu.memory label).",
        )
    best, failures = _search(req, allowed)
    if best is not None:
        return _placement(req, best, len(allowed))
    if failures and all(f.reason == "InvalidParallelism" for f in failures):
        raise PlacementError("InvalidParallelism", f"For {req.model}: {failures[0].message}.")
    weights = weights_bytes(req.facts, req.settings) / GIB
    bits = weight_bits(req.facts, req.settings)
    kind = compute_dtype_name(req.facts, req.settings) if bits == 16 else f"{bits}-bit"
    where = "; ".join(p.describe() for p in allowed)
    if req.tensor is not None or req.pipeline is not None or req.gpu_count is not None:
        where += " with the requested " + ", ".join(
            f"{name} {value}"
            for name, value in (("tensor", req.tensor), ("pipeline", req.pipeline), ("gpu.count", req.gpu_count))
            if value is not None
        )
    hints = _alternatives(req, allowed, pools)
    fix = f"; it would fit {', or '.join(hints)}" if hints else "; nothing in this cluster would fit it"
    raise PlacementError(
        "InsufficientGpuMemory",
        f"{req.model} needs {weights:,.1f} GiB of {kind} weights plus KV cache for one "
        f"{req.max_model_len:,}-token sequence, more than {where} can hold{fix}.",
    )


def request_from_spec(spec: LLMDeploymentSpec, facts: ModelFacts) -> PlanRequest:
    engine = spec.engine
    settings = EngineSettings(
        dtype=engine.dtype,
        quantization=engine.quantization,
        kv_cache_dtype=engine.kv_cache_dtype,
        max_model_len=engine.max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=_int_flag(engine.args, "--max-num-seqs"),
        enforce_eager=engine.enforce_eager or "--enforce-eager" in engine.args,
        pp_layer_partition=_layer_partition(engine.env),
    )
    return PlanRequest(
        model=hf_repo_id(spec.model.uri) or spec.model.uri,
        facts=facts,
        settings=settings,
        target_sequences=spec.planning.target_sequences,
        tensor=_explicit(spec.parallelism.tensor),
        pipeline=_explicit(spec.parallelism.pipeline),
        gpu_count=_explicit(spec.gpu.count),
        products=tuple(spec.gpu.products),
    )


def plan_for_spec(spec: LLMDeploymentSpec, pools: list[GpuPool], facts: ModelFacts | None = None) -> Placement:
    """Plan an LLMDeployment spec. `facts` overrides the lookup (e.g. config.json read from the Hub).

    Facts come from spec.model.facts, else the shipped table; an unknown model raises
    PlacementError (ModelFactsUnavailable for hf:// models, UnknownModel otherwise).
    """
    resolved = facts if facts is not None and spec.model.facts is None else resolve_facts(spec.model)
    return plan(request_from_spec(spec, resolved), pools)


def _layer_partition(env: list[EnvVar]) -> tuple[int, ...] | None:
    """VLLM_PP_LAYER_PARTITION ("31,30") from engine.env; a value that is not a list of counts
    (or one read from a Secret) is left to vLLM to refuse."""
    for var in env:
        if var.name == "VLLM_PP_LAYER_PARTITION" and var.value:
            parts = [part.strip() for part in var.value.split(",")]
            if all(part.isdigit() and int(part) > 0 for part in parts):
                return tuple(int(part) for part in parts)
    return None


def _explicit(value: int | str) -> int | None:
    return value if isinstance(value, int) else None


def _int_flag(args: list[str], flag: str) -> int | None:
    """The integer value of `--flag N` or `--flag=N` in pass-through args."""
    for index, arg in enumerate(args):
        text = None
        if arg == flag and index + 1 < len(args):
            text = args[index + 1]
        elif arg.startswith(flag + "="):
            text = arg.split("=", 1)[1]
        if text is not None and text.isdigit():
            return int(text)
    return None
