"""Model facts: the shipped table, config.json parsing and parameter counting (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, cast, get_args

from argosy_operator.api import CheckpointDType, ModelFacts, ModelSource, Quantization
from argosy_operator.planner.errors import PlacementError

_QUANT_METHODS: frozenset[str] = frozenset(get_args(Quantization))


@dataclass(frozen=True)
class ShippedModel:
    """One entry of the shipped table (operator/argosy_operator/models/<name>.json)."""

    name: str
    repos: tuple[str, ...]
    published_parameters: int
    facts: ModelFacts


def remote_code_classes(config: object) -> tuple[str, ...]:
    """The repository code a config.json maps its classes to (`auto_map`), sorted; () for none.

    Such a model loads only with --trust-remote-code (spec.model.trustRemoteCode): vLLM then runs
    that code in the serving pods. The planner never runs it: it sizes from the config's numbers.
    """
    if not isinstance(config, dict):
        return ()
    mapping = config.get("auto_map")
    if not isinstance(mapping, dict):
        return ()
    found: set[str] = set()
    for value in mapping.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                found.add(item)
    return tuple(sorted(found))


def remote_code_note(config: object, trusted: bool) -> str | None:
    """What `plan` says about a config.json's remote code, or None when it maps none."""
    classes = remote_code_classes(config)
    if not classes:
        return None
    where = ", ".join(classes)
    if trusted:
        return (f"the model's repository code ({where}) will run in the serving pods; the planner sized it from "
                "config.json's numbers alone and never runs that code")
    return (f"config.json maps the model to repository code ({where}): vLLM refuses to load it without "
            "--trust-remote-code (spec.model.trustRemoteCode: true); the sizing above reads config.json's "
            "numbers only")


def facts_from_hf_config(config: dict[str, Any]) -> ModelFacts:
    """ModelFacts from a Hugging Face config.json (multimodal configs: their text_config)."""
    if not isinstance(config, dict):
        raise PlacementError("UnknownModel", "config.json must be a JSON object; give the facts in spec.model.facts.")
    text = config.get("text_config")
    cfg: dict[str, Any] = {**config, **text} if isinstance(text, dict) else dict(config)
    architectures = cfg.get("architectures") or []
    experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts")
    quant = cfg.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    method_name = str(quant.get("quant_method", "")).lower()
    method = cast(Quantization, method_name) if method_name in _QUANT_METHODS else None
    bits = quant.get("bits") or quant.get("w_bit")
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype")
    dtype = cast(CheckpointDType, dtype_name) if dtype_name in ("bfloat16", "float16", "float32") else "bfloat16"
    try:
        return ModelFacts(
            architecture=architectures[0] if architectures else None,
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 4096,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=dtype,
            num_experts=experts,
            num_experts_per_token=cfg.get("num_experts_per_tok"),
            moe_intermediate_size=cfg.get("moe_intermediate_size"),
            num_shared_experts=cfg.get("n_shared_experts") or 0,
            first_k_dense_layers=cfg.get("first_k_dense_replace") or 0,
            kv_lora_rank=cfg.get("kv_lora_rank"),
            q_lora_rank=cfg.get("q_lora_rank"),
            qk_rope_head_dim=cfg.get("qk_rope_head_dim"),
            qk_nope_head_dim=cfg.get("qk_nope_head_dim"),
            v_head_dim=cfg.get("v_head_dim"),
            quantization=method,
            weight_bits=bits if bits in (4, 8, 16) else None,
            quantization_group_size=quant.get("group_size") if isinstance(quant.get("group_size"), int) else None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise PlacementError(
            "UnknownModel",
            f"config.json lacks a field the planner needs ({exc}); give the facts in spec.model.facts.",
        ) from exc


@cache
def shipped_models() -> tuple[ShippedModel, ...]:
    """The model facts shipped with the operator, sorted by name."""
    models = []
    for entry in resources.files("argosy_operator").joinpath("models").iterdir():
        if not entry.name.endswith(".json"):
            continue
        doc = json.loads(entry.read_text(encoding="utf-8"))
        models.append(
            ShippedModel(
                name=doc["name"],
                repos=tuple(doc["repos"]),
                published_parameters=int(doc["publishedParameters"]),
                facts=facts_from_hf_config(doc["config"]),
            )
        )
    return tuple(sorted(models, key=lambda m: m.name))


def find_shipped(name_or_repo: str) -> ShippedModel | None:
    """Look a model up by short name (llama-3.1-8b), repo id or hf:// URI; case-insensitive."""
    key = name_or_repo.removeprefix("hf://").strip().lower()
    for model in shipped_models():
        if key == model.name or key in (repo.lower() for repo in model.repos):
            return model
    return None


def hf_repo_id(uri: str) -> str | None:
    """`org/repo` of an hf:// URI, else None."""
    return uri.removeprefix("hf://") if uri.startswith("hf://") else None


def resolve_facts(source: ModelSource) -> ModelFacts:
    """Facts for a model: inline spec.model.facts first, then the shipped table.

    Raises PlacementError when neither knows the model; fetching config.json from the Hub is
    the caller's (I/O) business, see `argosy_operator.hubfetch`.
    """
    if source.facts is not None:
        return source.facts
    repo = hf_repo_id(source.uri)
    if repo is None:
        raise PlacementError(
            "UnknownModel",
            f"{source.uri} is not a model the operator knows; add spec.model.facts (the config.json numbers: "
            "hiddenSize, numHiddenLayers, numAttentionHeads, numKeyValueHeads, intermediateSize, vocabSize, "
            "maxPositionEmbeddings).",
        )
    shipped = find_shipped(repo)
    if shipped is None:
        raise PlacementError(
            "ModelFactsUnavailable",
            f"{repo} is not in the operator's model table and its config.json could not be read from the "
            "Hugging Face Hub; add spec.model.facts (hiddenSize, numHiddenLayers, numAttentionHeads, "
            "numKeyValueHeads, intermediateSize, vocabSize, maxPositionEmbeddings).",
        )
    return shipped.facts


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters by kind, because quantization treats them differently."""

    embedding: int
    lm_head: int
    attention: int
    dense_mlp: int
    experts: int
    other: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.dense_mlp + self.experts + self.other

    @property
    def linear(self) -> int:
        """Weights of the projection layers (what weight quantization shrinks)."""
        return self.attention + self.dense_mlp + self.experts


def attention_params_per_layer(f: ModelFacts) -> int:
    h = f.hidden_size
    heads = f.num_attention_heads
    if f.uses_mla:
        rope = f.qk_rope_head_dim or 0
        nope = f.qk_nope_head_dim or 0
        v = f.v_head_dim or f.head_size
        kv_lora = f.kv_lora_rank or 0
        q_head = nope + rope
        q = h * f.q_lora_rank + f.q_lora_rank * heads * q_head if f.q_lora_rank else h * heads * q_head
        kv = h * (kv_lora + rope) + kv_lora * heads * (nope + v)
        return q + kv + heads * v * h
    hd = f.head_size
    return h * heads * hd + 2 * h * f.kv_heads * hd + heads * hd * h


def parameter_counts(f: ModelFacts) -> ParameterCounts:
    """Parameters computed from config.json fields (dense, mixture-of-experts and MLA)."""
    h = f.hidden_size
    layers = f.num_hidden_layers
    embedding = f.vocab_size * h
    lm_head = 0 if f.tie_word_embeddings else f.vocab_size * h
    attention = layers * attention_params_per_layer(f)
    dense_mlp_layer = 3 * h * f.intermediate_size  # gate, up and down projections
    if f.is_moe:
        experts_n = f.num_experts or 0
        moe_width = f.moe_intermediate_size or f.intermediate_size
        dense_layers = min(f.first_k_dense_layers, layers)
        moe_layers = layers - dense_layers
        dense_mlp = dense_layers * dense_mlp_layer + moe_layers * f.num_shared_experts * 3 * h * moe_width
        experts = moe_layers * experts_n * 3 * h * moe_width
        router = moe_layers * h * experts_n
    else:
        dense_mlp = layers * dense_mlp_layer
        experts = 0
        router = 0
    norms = layers * 2 * h + h
    return ParameterCounts(
        embedding=embedding,
        lm_head=lm_head,
        attention=attention,
        dense_mlp=dense_mlp,
        experts=experts,
        other=norms + router,
    )


def parameter_count(f: ModelFacts) -> int:
    """Total parameters: spec.model.facts.parameters when given, else computed."""
    return f.parameters or parameter_counts(f).total
