"""The LLMDeployment API (group argosy.dev, version v1alpha1) as pydantic models.

These models are the one source of truth: the operator parses custom objects with them and
`argosy_operator.crd` turns their JSON schema into the CRD's structural OpenAPI schema.
Python names are snake_case; the wire format (and the CRD) is camelCase.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "argosy.dev"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("lld",)
CATEGORIES = ("argosy",)

# vLLM's OpenAI-compatible server image, pinned by tag (never `latest`).
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"

# A removed serving pod gets this long to finish its streams (spec.engine.terminationGracePeriodSeconds).
DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS = 300
MIN_TERMINATION_GRACE_PERIOD_SECONDS = 10

# spec.autoscaling defaults (documented in docs/autoscaling.md).
DEFAULT_TARGET_IN_FLIGHT_PER_REPLICA = 16
DEFAULT_SCALE_UP_WINDOW_SECONDS = 15
DEFAULT_SCALE_DOWN_WINDOW_SECONDS = 300
DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS = 600

MODEL_URI_SCHEMES = ("hf", "pvc", "s3")

DType = Literal["auto", "bfloat16", "float16", "half", "float32", "float"]
KvCacheDType = Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"]
CheckpointDType = Literal["bfloat16", "float16", "float32"]
# vLLM 0.32's `--tokenizer-mode` choices (vllm/config/model.py TokenizerMode).
TokenizerMode = Literal["auto", "hf", "mistral", "deepseek_v32", "deepseek_v4", "inkling", "kimi_k3", "cohere"]
# The longest inline chat template: a ConfigMap holds at most 1 MiB, and the object carrying it too.
MAX_INLINE_CHAT_TEMPLATE = 262_144
DistributedExecutor = Literal["mp", "ray"]
# The methods `vllm serve --quantization` takes (spec.engine.quantization); tests/contract checks
# this list against vLLM's own.
EngineQuantization = Literal[
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "fp8",
    "fbgemm_fp8",
    "modelopt",
    "modelopt_fp4",
    "mxfp4",
    "experts_int8",
    "compressed-tensors",
]
# Quantization methods the planner can size (a checkpoint's quant_method in model facts): also
# bitsandbytes, which vLLM 0.32 no longer lists among its methods.
Quantization = Literal[EngineQuantization, "bitsandbytes"]


def _auto_or_int_schema(what: str) -> dict[str, Any]:
    return {
        "x-kubernetes-int-or-string": True,
        "description": f"{what} Either the string `auto` (the planner decides) or a positive integer.",
        "default": "auto",
        "x-kubernetes-validations": [
            {
                "rule": "type(self) == string ? self == 'auto' : self >= 1",
                "message": "must be 'auto' or a positive integer",
            }
        ],
    }


AutoOrPositiveInt = Literal["auto"] | Annotated[int, Field(ge=1)]


class ApiModel(BaseModel):
    """Common configuration: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the Kubernetes API spells it (camelCase, no unset optional fields)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelFacts(ApiModel):
    """The numbers from a model's config.json that decide how much GPU memory it needs."""

    architecture: str | None = Field(
        default=None, max_length=128, description="Model class from config.json `architectures[0]`."
    )
    parameters: int | None = Field(
        default=None,
        ge=1,
        description="Total parameter count. Computed from the other fields when omitted.",
    )
    hidden_size: int = Field(ge=1, le=1_048_576, description="config.json `hidden_size`.")
    num_hidden_layers: int = Field(ge=1, le=4096, description="config.json `num_hidden_layers`.")
    num_attention_heads: int = Field(ge=1, le=4096, description="config.json `num_attention_heads`.")
    num_key_value_heads: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="config.json `num_key_value_heads` (grouped-query attention). Defaults to the attention heads.",
    )
    head_dim: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="config.json `head_dim`. Defaults to hiddenSize / numAttentionHeads.",
    )
    intermediate_size: int = Field(ge=1, le=4_194_304, description="config.json `intermediate_size` (dense MLP width).")
    vocab_size: int = Field(ge=1, le=16_777_216, description="config.json `vocab_size`.")
    max_position_embeddings: int = Field(
        ge=1,
        le=268_435_456,
        description="config.json `max_position_embeddings`: vLLM's default maxModelLen.",
    )
    tie_word_embeddings: bool = Field(
        default=False, description="config.json `tie_word_embeddings`: the output head shares the embedding."
    )
    torch_dtype: CheckpointDType = Field(
        default="bfloat16", description="config.json `torch_dtype`: the checkpoint's weight type."
    )
    num_experts: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Routed experts per mixture-of-experts layer (`num_local_experts`, `num_experts` or "
        "`n_routed_experts`).",
    )
    num_experts_per_token: int | None = Field(
        default=None, ge=1, le=65536, description="Experts each token is routed to (`num_experts_per_tok`)."
    )
    moe_intermediate_size: int | None = Field(
        default=None,
        ge=1,
        le=4_194_304,
        description="Width of one expert's MLP (`moe_intermediate_size`). Defaults to intermediateSize.",
    )
    num_shared_experts: int = Field(
        default=0, ge=0, le=65536, description="Always-active shared experts per MoE layer (`n_shared_experts`)."
    )
    first_k_dense_layers: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Leading layers that use a dense MLP instead of experts (`first_k_dense_replace`).",
    )
    kv_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Multi-head latent attention (DeepSeek-V2/V3): compressed KV width (`kv_lora_rank`).",
    )
    q_lora_rank: int | None = Field(
        default=None, ge=1, le=65536, description="Multi-head latent attention: compressed query width."
    )
    qk_rope_head_dim: int | None = Field(
        default=None, ge=1, le=65536, description="Multi-head latent attention: rotary part of each head."
    )
    qk_nope_head_dim: int | None = Field(
        default=None, ge=1, le=65536, description="Multi-head latent attention: non-rotary part of each head."
    )
    v_head_dim: int | None = Field(
        default=None, ge=1, le=65536, description="Multi-head latent attention: value head width."
    )
    quantization: Quantization | None = Field(
        default=None,
        description="Quantization the checkpoint ships with (config.json `quantization_config.quant_method`).",
    )
    weight_bits: Literal[4, 8, 16] | None = Field(
        default=None,
        description="Bits per quantized weight when the quantization method alone does not say "
        "(compressed-tensors checkpoints).",
    )
    quantization_group_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Group size of a 4-bit checkpoint (`quantization_config.group_size`); tensor parallelism "
        "must keep each shard a whole number of groups.",
    )

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None and self.num_experts > 1


class ModelSource(ApiModel):
    """Which model to serve."""

    uri: str = Field(
        min_length=6,
        max_length=1024,
        description="Where the weights are: hf://<org>/<repo> (Hugging Face Hub), pvc://<claim>/<path> "
        "(a PersistentVolumeClaim in this namespace) or s3://<bucket>/<path>.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.matches('^(hf|pvc|s3)://[^/\\\\s]+(/[^\\\\s]*)?$')",
                    "message": "model.uri must start with hf://, pvc:// or s3:// followed by a path",
                },
                {
                    "rule": "!self.startsWith('hf://') || self.matches('^hf://[^/\\\\s]+/[^/\\\\s]+$')",
                    "message": "a Hugging Face model.uri is hf://<org>/<repo>",
                },
            ]
        },
    )
    served_model_names: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=16,
        description="Names clients use in the request's `model` field. Default: the LLMDeployment's name.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        description="Hugging Face revision (branch, tag or commit) to load. Default: main.",
    )
    facts: ModelFacts | None = Field(
        default=None,
        description="config.json facts for sizing. Needed for models the operator does not know when the "
        "Hugging Face Hub cannot be reached, and for pvc:// and s3:// models.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let vLLM run the Python code shipped in the model repository (`--trust-remote-code`), "
        "for architectures vLLM does not implement itself. That code runs inside the serving pods with their "
        "permissions: enable it only for repositories you trust.",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Tokenizer to load instead of the model's own (`--tokenizer`): a Hugging Face repo id or a "
        "path inside the serving container.",
    )
    tokenizer_mode: TokenizerMode | None = Field(
        default=None,
        description="vLLM's tokenizer implementation (`--tokenizer-mode`). `hf` is the plain Hugging Face "
        "tokenizer, the slow one included. Default: vLLM's `auto`.",
    )
    tokenizer_revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Revision of the tokenizer to load (`--tokenizer-revision`). Default: the model's revision.",
    )


class GpuSpec(ApiModel):
    """How many and which GPUs a replica gets."""

    count: Annotated[
        AutoOrPositiveInt,
        WithJsonSchema(_auto_or_int_schema("GPUs per replica.")),
    ] = Field(default="auto", description="GPUs per replica: `auto` or an integer.")
    products: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=32,
        description="Allowed GPU products (values of the node label nvidia.com/gpu.product). Empty: any.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class ParallelismSpec(ApiModel):
    """vLLM's tensor and pipeline parallelism; explicit integers override the planner."""

    tensor: Annotated[
        AutoOrPositiveInt,
        WithJsonSchema(_auto_or_int_schema("Tensor-parallel size (GPUs that split each layer).")),
    ] = Field(default="auto", description="Tensor-parallel size: `auto` or an integer.")
    pipeline: Annotated[
        AutoOrPositiveInt,
        WithJsonSchema(_auto_or_int_schema("Pipeline-parallel size (stages of consecutive layers).")),
    ] = Field(default="auto", description="Pipeline-parallel size: `auto` or an integer.")


EnvVarSource = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...).",
        }
    ),
]


class EnvVar(ApiModel):
    """An environment variable for the vLLM container (the Kubernetes EnvVar shape)."""

    name: str = Field(min_length=1, max_length=256, description="Variable name.")
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(default=None, description="Where to read the value from.")


class ConfigMapKeyRef(ApiModel):
    """A key in a ConfigMap in the LLMDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253, description="ConfigMap name.")
    key: str = Field(min_length=1, max_length=253, description="Key within the ConfigMap.")


class ChatTemplate(ApiModel):
    """A Jinja chat template for vLLM's OpenAI server (`--chat-template`), inline or from a ConfigMap."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.inline) != has(self.configMapKeyRef)",
                    "message": "chatTemplate needs exactly one of inline or configMapKeyRef",
                }
            ]
        }
    )

    inline: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_INLINE_CHAT_TEMPLATE,
        description="The template text. The operator stores it in a ConfigMap it owns.",
    )
    config_map_key_ref: ConfigMapKeyRef | None = Field(
        default=None,
        description="A ConfigMap key holding the template. Editing it rolls the serving pods.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ChatTemplate:
        if (self.inline is None) == (self.config_map_key_ref is None):
            raise ValueError("chatTemplate needs exactly one of inline or configMapKeyRef")
        return self


class GenerationDefaults(ApiModel):
    """Sampling defaults for requests that do not set them (`--override-generation-config`).

    These are the keys vLLM 0.32 takes from a generation config; a request's own value always wins.
    Stop strings are not among them: vLLM has no server-side default for `stop`.
    """

    temperature: float | None = Field(default=None, ge=0, le=100, description="Sampling temperature.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="Top-k cut-off (-1: off).")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Minimum token probability, relative.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=268_435_456,
        description="Output tokens for requests that send no max_tokens. vLLM 0.32 also caps every request at "
        "this value (a request asking for more gets this many).")
    repetition_penalty: float | None = Field(default=None, gt=0, le=100, description="Repetition penalty.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="Frequency penalty.")

    def vllm_override(self) -> dict[str, float | int]:
        """The `--override-generation-config` object: vLLM's names (max_tokens is `max_new_tokens`)."""
        values = self.model_dump(exclude_none=True)
        if "max_tokens" in values:
            values["max_new_tokens"] = values.pop("max_tokens")
        return values


class EngineSpec(ApiModel):
    """vLLM engine settings."""

    image: str = Field(
        default=DEFAULT_VLLM_IMAGE,
        min_length=1,
        max_length=512,
        description="vLLM OpenAI-server container image, pinned by tag or digest.",
    )
    dtype: DType = Field(default="auto", description="Weight and activation type (`vllm serve --dtype`).")
    quantization: EngineQuantization | None = Field(
        default=None,
        description="Quantization method (`vllm serve --quantization`). Default: what the checkpoint ships with. "
        "fbgemm_fp8 is deprecated in vLLM; the operator adds `--allow-deprecated-quantization` for it.",
    )
    kv_cache_dtype: KvCacheDType = Field(
        default="auto", description="KV-cache element type (`--kv-cache-dtype`); fp8 halves KV memory."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=268_435_456,
        description="Longest sequence (prompt + output) in tokens (`--max-model-len`). Default: the model's "
        "maximum context.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of each GPU's memory vLLM may use (`--gpu-memory-utilization`).",
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Tokens per engine step (`--max-num-batched-tokens`). Default: vLLM's (8192 on H100-class "
        "GPUs, 2048 elsewhere).",
    )
    enforce_eager: bool = Field(
        default=False, description="Disable CUDA graphs (`--enforce-eager`): less memory, slower decoding."
    )
    distributed_executor: DistributedExecutor = Field(
        default="mp",
        description="How vLLM runs a replica that spans nodes (`--distributed-executor-backend`): `mp`, vLLM's "
        "multiprocessing executor across nodes (`--nnodes`, `--node-rank`, workers `--headless`), or `ray` (a Ray "
        "head in the leader pod, Ray workers in the others). Replicas on one node always use `mp`.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra arguments passed through to `vllm serve`.",
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment variables for the vLLM container."
    )
    chat_template: ChatTemplate | None = Field(
        default=None, description="Chat template to use instead of the tokenizer's (`--chat-template`)."
    )
    generation_defaults: GenerationDefaults | None = Field(
        default=None, description="Sampling defaults for requests that leave them out."
    )
    termination_grace_period_seconds: int = Field(
        default=DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS,
        ge=MIN_TERMINATION_GRACE_PERIOD_SECONDS,
        le=86400,
        description="How long a serving pod that is being removed (scale-down, rollout, group restart) may take "
        "to finish its in-flight requests before it is killed. The gateway stops sending it new requests at "
        "once; the pod's preStop hook waits until vLLM reports no running or waiting request, at most this long "
        "minus a few seconds for vLLM to exit. Set it above your longest generation.",
    )


class SecretKeyRef(ApiModel):
    """A key in a Secret in the LLMDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key within the Secret.")


class BackendKeySpec(ApiModel):
    """The key between the gateway and vLLM (vLLM's VLLM_API_KEY), kept by the operator in a Secret."""

    enabled: bool = Field(
        default=True,
        description="Start vLLM with a random key from the Secret `<name>-backend-key` (labelled "
        "argosy.dev/backend-key), which the gateway sends as the bearer token upstream, so a caller that "
        "reaches a pod directly gets 401 on /v1/*. False: vLLM starts without a key and the Secret is "
        "deleted once no pod uses it. Rotate with the annotation argosy.dev/rotate-backend-key (any new "
        "value); see docs/operator.md.",
    )


class Toleration(ApiModel):
    """A Kubernetes pod toleration."""

    key: str | None = Field(default=None, max_length=317, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )


class SchedulingSpec(ApiModel):
    """Where serving pods may run, on top of the chosen GPU product."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra node labels the serving pods require.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Extra tolerations (the nvidia.com/gpu toleration is always added).",
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the serving pods."
    )


# spec.rollout's percentages, as Kubernetes writes them (no leading zeros, so "0%" is the only zero).
_PERCENT = r"^(0|[1-9][0-9]{0,5})%$"
_PERCENT_TO_100 = r"^(100|[1-9]?[0-9])%$"


def _surge_or_unavailable_schema(default: int, percent_pattern: str) -> dict[str, Any]:
    return {
        "x-kubernetes-int-or-string": True,
        "default": default,
        # minimum and maximum apply to the integer form, pattern to the string form.
        "minimum": 0,
        "maximum": 10000,
        "pattern": percent_pattern,
    }


_Pods = Annotated[int, Field(ge=0, le=10000, strict=True)]
MaxSurge = Annotated[
    _Pods | Annotated[str, Field(pattern=_PERCENT)], WithJsonSchema(_surge_or_unavailable_schema(0, _PERCENT))
]
MaxUnavailable = Annotated[
    _Pods | Annotated[str, Field(pattern=_PERCENT_TO_100)],
    WithJsonSchema(_surge_or_unavailable_schema(1, _PERCENT_TO_100)),
]
_ROLLOUT_STUCK = "rollout.maxSurge and rollout.maxUnavailable cannot both be 0: no pod could ever be replaced"


def _is_zero(value: int | str) -> bool:
    return value in (0, "0%")


def _cel_is_zero(field: str) -> str:
    return f"(type(self.{field}) == int ? self.{field} == 0 : self.{field} == '0%')"


class RolloutSpec(ApiModel):
    """How the serving pods are replaced when their template changes (a new spec, image, chat template or
    backend key): the Deployment's RollingUpdate strategy, with Kubernetes' semantics."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!(has(self.maxSurge) && has(self.maxUnavailable) && {_cel_is_zero('maxSurge')}"
                    f" && {_cel_is_zero('maxUnavailable')})",
                    "message": _ROLLOUT_STUCK,
                }
            ]
        }
    )

    max_surge: MaxSurge = Field(
        default=0,
        description="Pods started above spec.replicas during a rollout: a number or a percentage of "
        "spec.replicas (rounded up), as in a Deployment's strategy.rollingUpdate.maxSurge. Each one needs a free "
        "set of GPUs, like a replica. 1 with maxUnavailable 0 replaces a single replica without an outage.",
    )
    max_unavailable: MaxUnavailable = Field(
        default=1,
        description="Replicas that may be unavailable during a rollout: a number or a percentage of "
        "spec.replicas (rounded down), as in a Deployment's strategy.rollingUpdate.maxUnavailable.",
    )

    @model_validator(mode="after")
    def _can_progress(self) -> RolloutSpec:
        if _is_zero(self.max_surge) and _is_zero(self.max_unavailable):
            raise ValueError(_ROLLOUT_STUCK)
        return self


class PlanningSpec(ApiModel):
    """Knobs of the GPU planner."""

    target_sequences: int = Field(
        default=4,
        ge=1,
        le=4096,
        description="How many maxModelLen-token sequences a replica's KV cache should hold at once; the "
        "planner adds GPUs (within a node) until it does.",
    )


class AutoscalingSpec(ApiModel):
    """Replicas that follow the load: in-flight requests per replica, from the serving pods' vLLM metrics."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
                },
            ]
        }
    )

    enabled: bool = Field(
        default=False,
        description="Let the operator set spec.replicas (through the scale subresource) from the load. Off: "
        "spec.replicas is yours (or an HPA's or KEDA's).",
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        le=10000,
        description="Fewest replicas. 0 allows scale to zero: the model sleeps after scaleToZeroAfterSeconds "
        "without traffic and the gateway wakes it on the next request, holding that request until a replica "
        "is ready.",
    )
    max_replicas: int = Field(ge=1, le=10000, description="Most replicas (the GPU budget of this model).")
    target_in_flight_per_replica: int = Field(
        default=DEFAULT_TARGET_IN_FLIGHT_PER_REPLICA,
        ge=1,
        le=100000,
        description="Requests one replica should carry: vLLM's vllm:num_requests_running + "
        "vllm:num_requests_waiting (leaders only for multi-node replicas), plus requests the gateway holds "
        "for this model. Desired replicas = ceil(total / target).",
    )
    scale_up_window_seconds: int = Field(
        default=DEFAULT_SCALE_UP_WINDOW_SECONDS,
        ge=0,
        le=3600,
        description="Stabilization window for scaling up: replicas rise to the lowest recommendation of this "
        "window, so a single spike does not buy GPUs (like an HPA's scaleUp.stabilizationWindowSeconds).",
    )
    scale_down_window_seconds: int = Field(
        default=DEFAULT_SCALE_DOWN_WINDOW_SECONDS,
        ge=0,
        le=86400,
        description="Stabilization window for scaling down: replicas fall to the highest recommendation of "
        "this window, so a lull does not drop a replica that takes minutes to load again (like an HPA's "
        "scaleDown.stabilizationWindowSeconds).",
    )
    scale_to_zero_after_seconds: int = Field(
        default=DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS,
        ge=0,
        le=604800,
        description="With minReplicas 0: go to zero replicas after this long without any request (none "
        "running, waiting, held in the gateway or finished since the last look), counted only while a "
        "replica is ready.",
    )

    @model_validator(mode="after")
    def _min_not_above_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        return self


_SPEC_RULES: list[JsonValue] = [
    {
        "rule": "!(has(self.gpu) && has(self.gpu.count) && type(self.gpu.count) == int"
        " && has(self.parallelism) && has(self.parallelism.tensor) && type(self.parallelism.tensor) == int"
        " && has(self.parallelism.pipeline) && type(self.parallelism.pipeline) == int)"
        " || self.parallelism.tensor * self.parallelism.pipeline == self.gpu.count",
        "message": "parallelism.tensor x parallelism.pipeline must equal gpu.count",
    },
    {
        "rule": "!(has(self.gpu) && has(self.gpu.count) && type(self.gpu.count) == int"
        " && has(self.parallelism) && has(self.parallelism.tensor) && type(self.parallelism.tensor) == int)"
        " || self.gpu.count % self.parallelism.tensor == 0",
        "message": "parallelism.tensor must divide gpu.count",
    },
    {
        "rule": "!(has(self.gpu) && has(self.gpu.count) && type(self.gpu.count) == int"
        " && has(self.parallelism) && has(self.parallelism.pipeline)"
        " && type(self.parallelism.pipeline) == int)"
        " || self.gpu.count % self.parallelism.pipeline == 0",
        "message": "parallelism.pipeline must divide gpu.count",
    },
    {
        "rule": "!(has(self.model.facts) && has(self.parallelism) && has(self.parallelism.tensor)"
        " && type(self.parallelism.tensor) == int)"
        " || self.model.facts.numAttentionHeads % self.parallelism.tensor == 0",
        "message": "parallelism.tensor must divide model.facts.numAttentionHeads",
    },
    {
        "rule": "!(has(self.model.facts) && has(self.parallelism) && has(self.parallelism.pipeline)"
        " && type(self.parallelism.pipeline) == int)"
        " || self.parallelism.pipeline <= self.model.facts.numHiddenLayers",
        "message": "parallelism.pipeline cannot exceed model.facts.numHiddenLayers",
    },
]


class LLMDeploymentSpec(ApiModel):
    """The desired state of an LLMDeployment: one model served by vLLM on GPUs the operator sizes."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ModelSource = Field(description="The model to serve.")
    replicas: int = Field(default=1, ge=0, le=10000, description="Number of serving replicas.")
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPU count and product allow-list.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Tensor and pipeline parallelism."
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    hf_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token, exported to vLLM as HF_TOKEN."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Extra scheduling constraints for serving pods."
    )
    planning: PlanningSpec = Field(default_factory=PlanningSpec, description="Planner settings.")
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="How serving pods are replaced when their template changes. Default: one replica at a "
        "time with no extra pod (maxSurge 0, maxUnavailable 1), since a surge pod needs spare GPUs. Replicas "
        "that span nodes (groups) ignore it: they are replaced one group at a time while the others are ready. "
        "Changing only these fields re-plans nothing and restarts no pod.",
    )
    backend_key: BackendKeySpec = Field(
        default_factory=BackendKeySpec,
        description="The key only the gateway holds, so serving pods refuse callers that go around it (on by default).",
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None,
        description="Replicas from the load, and scale to zero (off unless autoscaling.enabled is true).",
    )


class Condition(ApiModel):
    """A status condition in the Kubernetes API conventions' shape."""

    type: str = Field(max_length=316, description="Ready, Progressing, Degraded or PlacementFound.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime | None = Field(default=None, description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this condition was computed for."
    )


class PlacementBasis(ApiModel):
    """What a placement was planned for: the spec, and the GPU nodes it was sized against.

    The operator keeps the placement while these still hold (sticky placement), so a restarted
    operator, a cordoned pool or a new pool never moves a serving model.
    """

    generation: int = Field(ge=0, description="metadata.generation of the spec the placement was planned for.")
    spec_hash: str = Field(
        max_length=64,
        description="Hash of that spec without `replicas` (scaling never moves a model); another hash means "
        "the spec changed and the placement is planned again.",
    )
    replan_request: str | None = Field(
        default=None,
        max_length=256,
        description="Value of the annotation argosy.dev/replan when it was planned; a different value asks "
        "for one new plan.",
    )
    gpus_per_node: int = Field(ge=1, description="GPUs per node of the pool it was sized against.")
    gpu_memory_mi_b: int = Field(
        ge=1, alias="gpuMemoryMiB", description="Memory of one GPU of that pool in MiB (label nvidia.com/gpu.memory)."
    )
    planned_time: datetime | None = Field(default=None, description="When the placement was planned.")


class PlacementStatus(ApiModel):
    """The planner's decision (what `argosy-operator plan --output json` prints), and what it was planned for."""

    tensor_parallel_size: int = Field(ge=1, description="vLLM --tensor-parallel-size.")
    pipeline_parallel_size: int = Field(ge=1, description="vLLM --pipeline-parallel-size.")
    gpus_per_pod: int = Field(ge=1, description="nvidia.com/gpu requested by each serving pod.")
    pods_per_replica: int = Field(ge=1, description="Pods (nodes) one replica spans.")
    gpu_product: str | None = Field(default=None, description="GPU product the pods are placed on.")
    weights_gib: float = Field(ge=0, alias="weightsGiB", description="Model weights in GiB for the whole replica.")
    kv_cache_tokens: int = Field(ge=0, description="Estimated vLLM 'GPU KV cache size' of one replica, in tokens.")
    max_concurrency: float = Field(ge=0, description="Estimated maxModelLen-token sequences one replica holds at once.")
    reason: str = Field(default="", max_length=4096, description="Why the planner chose this placement.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="--max-model-len the KV cache was sized for (engine.maxModelLen or the "
        "model's context length)."
    )
    planned_for: PlacementBasis | None = Field(
        default=None, description="The spec and GPU pool the placement was planned for; absent in `plan` output."
    )


class AutoscalingStatus(ApiModel):
    """What the operator's autoscaler decided last, and the recommendations its windows still remember.

    Kept in status so a restarted operator continues where the previous one stopped.
    """

    desired_replicas: int | None = Field(default=None, ge=0, description="Replicas the autoscaler last wrote.")
    last_scale_time: datetime | None = Field(default=None, description="When the autoscaler last changed replicas.")
    last_active_time: datetime | None = Field(
        default=None, description="Last time the model had traffic, or was woken (the scale-to-zero clock)."
    )
    in_flight: int | None = Field(
        default=None, ge=0, description="Requests running, waiting and held in the gateway at the last decision."
    )
    message: str = Field(default="", max_length=4096, description="The numbers behind the last decision.")
    recommendations: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list,
        max_length=512,
        description="Recent recommendations as [unix seconds, replicas] pairs, one per change, each kept "
        "while a stabilization window still covers it.",
    )


class GroupRestartStatus(ApiModel):
    """The last time the operator restarted a multi-node group, and why."""

    reason: str = Field(max_length=128, description="MemberRestarted, MemberFailed, MemberLost, MemberReplaced or "
                        "SpecChanged.")
    message: str = Field(default="", max_length=4096, description="What happened.")
    time: str = Field(max_length=64, description="When (RFC 3339).")


class GroupStatus(ApiModel):
    """One replica that spans nodes: a StatefulSet of podsPerReplica pods (ordinal 0 the leader)."""

    name: str = Field(max_length=253, description="The group's StatefulSet and headless Service.")
    pods: int = Field(ge=0, description="Pods in the group.")
    ready_pods: int = Field(ge=0, description="Pods of the group that pass readiness.")
    ready: bool = Field(description="Every pod of the group is ready: the replica serves.")
    up_to_date: bool = Field(description="Every pod runs the current spec.")
    restarts: int = Field(default=0, ge=0, description="Times the operator restarted the whole group.")
    last_restart: GroupRestartStatus | None = Field(default=None, description="The latest group restart.")


class LLMDeploymentStatus(ApiModel):
    """The observed state of an LLMDeployment."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the operator last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, Progressing, Degraded and PlacementFound.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int = Field(default=0, ge=0, description="Serving pods that exist (all replicas).")
    ready_replicas: int = Field(default=0, ge=0, description="Serving pods that pass readiness.")
    selector: str | None = Field(
        default=None, max_length=4096, description="Label selector of the serving pods (for the scale subresource)."
    )
    placement: PlacementStatus | None = Field(default=None, description="The planner's decision.")
    served_model_names: list[str] = Field(
        default_factory=list, max_length=16, description="Names the gateway routes to this deployment."
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's last decision (set while spec.autoscaling.enabled)."
    )
    groups: list[GroupStatus] = Field(
        default_factory=list,
        max_length=10000,
        description="Replicas that span nodes, one entry per group (empty when a replica fits one node).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


def served_names(spec: LLMDeploymentSpec, name: str) -> list[str]:
    """The model names clients use: spec.model.servedModelNames, or the object's name."""
    return list(spec.model.served_model_names) or [name]
