"""`argosy-operator plan` as a user runs it: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from argosy_operator.cli import build_parser, resolve_run_args

H100 = ["--gpu-memory-mib", "81559", "--gpus-per-node", "8", "--gpu-product", "NVIDIA-H100-80GB-HBM3"]
L4 = ["--gpu-memory-mib", "23034", "--gpus-per-node", "4", "--gpu-product", "NVIDIA-L4"]


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "argosy_operator.cli", "plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_human_summary_reads_like_vllm_startup_log() -> None:
    result = plan("--model", "llama-3.1-8b", *H100, "--max-model-len", "8192")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "meta-llama/Llama-3.1-8B-Instruct" in out
    assert "tensor 1 x pipeline 1" in out
    assert "GPU KV cache size: " in out and " tokens" in out
    assert "Maximum concurrency for 8,192 tokens per request: " in out
    assert "Reason:" in out


def test_json_output_has_exactly_the_nine_keys() -> None:
    result = plan("--model", "meta-llama/Llama-3.1-70B-Instruct", *H100, "--max-model-len", "8192", "--output", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {
        "tensorParallelSize",
        "pipelineParallelSize",
        "gpusPerPod",
        "podsPerReplica",
        "gpuProduct",
        "weightsGiB",
        "kvCacheTokens",
        "maxConcurrency",
        "reason",
    }
    assert body["tensorParallelSize"] == 4 and body["gpusPerPod"] == 4
    assert body["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"


def test_fixed_parallelism_only_estimates_capacity() -> None:
    args = ("--model", "llama-3.1-8b", *H100, "--max-model-len", "8192", "--output", "json")
    fixed = json.loads(plan(*args, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1").stdout)
    auto = json.loads(plan(*args).stdout)
    assert (fixed["tensorParallelSize"], auto["tensorParallelSize"]) == (2, 1)
    assert fixed["kvCacheTokens"] > auto["kvCacheTokens"]


@pytest.mark.parametrize(
    ("flags", "effect"),
    [
        (["--kv-cache-dtype", "fp8"], "more"),
        (["--enforce-eager"], "more"),
        (["--gpu-memory-utilization", "0.6"], "fewer"),
        (["--max-num-batched-tokens", "65536"], "fewer"),
        (["--quantization", "fp8"], "more"),
    ],
)
def test_engine_flags_change_the_kv_estimate(flags: list[str], effect: str) -> None:
    base = ["--model", "llama-3.1-8b", *H100, "--max-model-len", "8192", "--output", "json"]
    before = json.loads(plan(*base).stdout)["kvCacheTokens"]
    after = json.loads(plan(*base, *flags).stdout)["kvCacheTokens"]
    assert (after > before) if effect == "more" else (after < before)


def test_a_model_larger_than_a_node_spans_two_pods() -> None:
    result = plan("--model", "llama-3.1-405b", *H100, "--nodes", "2", "--max-model-len", "8192")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tensor 8 x pipeline 2 = 2 pods per replica, one per node, each 8 NVIDIA-H100-80GB-HBM3" in out
    # 126 layers split 63 + 63 as vLLM does; the stage with the output head binds.
    assert "Stages:       layers 63 + 63; stage 1 binds" in out
    assert "cannot hold one 8,192-token sequence" in out
    body = json.loads(plan("--model", "llama-3.1-405b", *H100, "--nodes", "2", "--max-model-len", "8192",
                           "--output", "json").stdout)
    assert (body["podsPerReplica"], body["gpusPerPod"], body["pipelineParallelSize"]) == (2, 8, 2)


def test_nothing_fits_exits_2_with_the_reason_on_stderr() -> None:
    result = plan("--model", "llama-3.1-405b", *L4, "--nodes", "1", "--max-model-len", "8192", "--output", "json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "InsufficientGpuMemory" in result.stderr and "would fit" in result.stderr


def test_invalid_fixed_tensor_exits_2() -> None:
    result = plan("--model", "llama-3.1-8b", *H100, "--tensor-parallel-size", "3")
    assert result.returncode == 2
    assert "32 attention heads" in result.stderr


def test_config_json_for_any_model(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 2048,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "intermediate_size": 8192,
                "vocab_size": 128256,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
                "torch_dtype": "bfloat16",
            }
        )
    )
    result = plan("--config", str(config), *L4, "--output", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["weightsGiB"] == pytest.approx(2.3, abs=0.1)


BAICHUAN_STYLE = {
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                 "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
    "vocab_size": 64000, "max_position_embeddings": 4096, "torch_dtype": "float16",
}


@pytest.mark.parametrize(("trusted", "said"), [(False, "warning"), (True, "note")])
def test_remote_code_is_named_and_the_sizing_reads_config_json_either_way(
    tmp_path: Path, trusted: bool, said: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BAICHUAN_STYLE))
    flags = ["--trust-remote-code"] if trusted else []
    result = plan("--config", str(config), *L4, "--output", "json", *flags)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["weightsGiB"] == pytest.approx(13.0, abs=0.5)  # 7B in float16, either way
    assert f"{said}: " in result.stderr
    assert "configuration_baichuan.BaichuanConfig, modeling_baichuan.BaichuanForCausalLM" in result.stderr
    assert ("--trust-remote-code" in result.stderr) is not trusted
    plain = {k: v for k, v in BAICHUAN_STYLE.items() if k != "auto_map"}
    config.write_text(json.dumps(plain))
    assert plan("--config", str(config), *L4, *flags).stderr == ""  # no remote code: nothing to say


def test_unknown_model_names_the_known_ones() -> None:
    result = plan("--model", "acme/nope", *H100)
    assert result.returncode == 2
    assert "llama-3.1-8b" in result.stderr and "--config" in result.stderr


def test_missing_gpu_description_is_a_usage_error() -> None:
    result = plan("--model", "llama-3.1-8b")
    assert result.returncode != 0 and "--gpu-memory-mib" in result.stderr


def test_list_models() -> None:
    result = plan("--list-models")
    assert result.returncode == 0
    assert "deepseek-ai/DeepSeek-V3" in result.stdout and len(result.stdout.splitlines()) >= 20


def test_run_flags_and_env_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARGOSY_OPERATOR_LOG_LEVEL", "debug")
    monkeypatch.setenv("ARGOSY_OPERATOR_METRICS_PORT", "9100")
    args = build_parser().parse_args(["run", "--namespace", "a", "--namespace", "b"])
    assert (args.namespaces, args.log_level, args.metrics_port, args.kubeconfig) == (["a", "b"], "DEBUG", 9100, None)
    monkeypatch.setenv("ARGOSY_OPERATOR_NAMESPACES", "team-a, team-b")
    flags = resolve_run_args(build_parser().parse_args(["run", "--metrics-port", "8081", "--kubeconfig", "/k"]))
    assert (flags.namespaces, flags.metrics_port, flags.kubeconfig) == (["team-a", "team-b"], 8081, "/k")
    monkeypatch.delenv("ARGOSY_OPERATOR_NAMESPACES")
    assert resolve_run_args(build_parser().parse_args(["run"])).namespaces == []  # cluster-wide
