"""The backend key as vLLM itself enforces it, and the simulator the same way.

The serving pod's command line and environment (VLLM_API_KEY from the backend-key Secret)
go through vLLM's own `vllm serve` parser and its own API-key middleware, installed as its
OpenAI server installs it (runtime/check_auth.py). The simulator, started from the same
environment, must refuse and admit the same requests with the same 401 body, so tests that
run pods on the simulator see what real vLLM would do.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import aiohttp
import pytest
from argosy_operator import backendkey, builders
from argosy_operator.api import LLMDeploymentSpec, PlacementStatus
from argosy_operator.reconcile import server_inputs
from argosy_sandbox import vllm_runtime
from argosy_vllm_sim.__main__ import parse_args
from argosy_vllm_sim.server import SimServer

KEY = "k-" + "x" * 40
# (method, path, Authorization): what the gateway, its probes, the autoscaler and a stray caller send.
REQUESTS: list[tuple[str, str, str | None]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models", "Bearer wrong"),
    ("GET", "/v1/models", f"Bearer {KEY}"),
    ("GET", "/v1/models", f"bearer {KEY}"),  # the scheme is case-insensitive
    ("GET", "/v1/models", f"Basic {KEY}"),
    ("POST", "/v1/chat/completions", None),
    ("POST", "/v1/completions", "Bearer client-key"),
    ("GET", "/health", None),  # the kubelet's probes
    ("GET", "/metrics", None),  # the autoscaler's scrape and the preStop drain
    ("POST", "/tokenize", None),  # outside /v1: vLLM leaves it open (docs/operator.md says so)
]


def _pod(key_id: str) -> tuple[list[str], dict[str, str]]:
    """The serving container's argv (after `vllm`) and env, its secretKeyRef resolved as the kubelet would."""
    spec = LLMDeploymentSpec.model_validate({"model": {"uri": "hf://org/model"}})
    placement = PlacementStatus.model_validate({
        "tensorParallelSize": 1, "pipelineParallelSize": 1, "gpusPerPod": 1, "podsPerReplica": 1,
        "weightsGiB": 1.0, "kvCacheTokens": 100_000, "maxConcurrency": 4.0})
    (container,) = builders.build_deployment(server_inputs("chat", "ns", "u-1", spec, placement, None, key_id))[
        "spec"]["template"]["spec"]["containers"]
    plan = backendkey.plan_keys(True, None, None, frozenset(), make_id=lambda: key_id)
    secret = backendkey.build_secret("chat", "ns", "u-1", plan, make_key=lambda: KEY)
    env: dict[str, str] = {}
    for var in container.get("env") or ():
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == secret["metadata"]["name"], "the pod reads another Secret than the operator keeps"
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "value" in var:
            env[var["name"]] = var["value"]
    return [*container["command"][1:], *container["args"]], env


def _verdict(answer: dict[str, Any]) -> tuple[bool, Any]:
    """Refused (with its body) or let through: the stand-in app's 200 and the simulator's own answers differ."""
    return (answer["status"] == 401, answer["body"] if answer["status"] == 401 else None)


async def _ask_simulator(argv_extra: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    saved = os.environ.get("VLLM_API_KEY")
    os.environ.pop("VLLM_API_KEY", None)
    os.environ.update(env)
    try:
        _, config = parse_args(["--model", "m", "--port", "0", *argv_extra])
    finally:
        os.environ.pop("VLLM_API_KEY", None)
        if saved is not None:
            os.environ["VLLM_API_KEY"] = saved
    answers = []
    async with SimServer(config) as server, aiohttp.ClientSession() as http:
        for method, path, authorization in REQUESTS:
            headers = {"Authorization": authorization} if authorization else {}
            body = {"model": "m", "prompt": "a", "max_tokens": 1} if method == "POST" else None
            async with http.request(method, server.url + path, json=body, headers=headers) as response:
                text = await response.text()
                answers.append({"status": response.status,
                                "body": await response.json() if response.status == 401 else text})
    return answers


@pytest.fixture(scope="module")
def vllm_verdicts() -> list[Any]:
    argv, env = _pod("abcd1234")
    several = ["serve", "org/model", "--api-key", "other", KEY]
    return vllm_runtime.check_auth([
        {"argv": argv, "env": env, "requests": REQUESTS},
        {"argv": ["serve", "org/model"], "env": {}, "requests": REQUESTS},
        {"argv": several, "env": {"VLLM_API_KEY": "ignored"}, "requests": REQUESTS},
    ])


def test_vllm_refuses_callers_without_the_pods_key_and_leaves_probes_and_metrics_open(vllm_verdicts) -> None:
    keyed, open_, _ = vllm_verdicts
    assert not isinstance(keyed, dict), keyed  # the command line was accepted
    verdicts = [_verdict(a) for a in keyed]
    unauthorized = (True, {"error": "Unauthorized"})
    assert verdicts == [unauthorized, unauthorized, (False, None), (False, None), unauthorized, unauthorized,
                        unauthorized, (False, None), (False, None), (False, None)]
    assert all(not refused for refused, _ in map(_verdict, open_))  # spec.backendKey.enabled: false


def test_vllm_accepts_several_keys_on_its_command_line_but_one_from_the_environment(vllm_verdicts) -> None:
    # --api-key takes a list (and wins over VLLM_API_KEY), which is why a rotation could give vLLM
    # both keys; the operator gives each pod one key and the gateway the pod's own (docs/operator.md).
    several = [_verdict(a) for a in vllm_verdicts[2]]
    assert several[2] == (False, None) and several[1] == (True, {"error": "Unauthorized"})


async def test_the_simulator_enforces_the_key_exactly_like_vllm(vllm_verdicts) -> None:
    _, env = _pod("abcd1234")
    simulated = [_verdict(a) for a in await _ask_simulator([], env)]
    assert simulated == [_verdict(a) for a in vllm_verdicts[0]]
    unkeyed = [_verdict(a) for a in await _ask_simulator([], {})]
    assert unkeyed == [_verdict(a) for a in vllm_verdicts[1]]
    several = [_verdict(a) for a in await _ask_simulator(["--api-key", "other", KEY], {"VLLM_API_KEY": "ignored"})]
    assert several == [_verdict(a) for a in vllm_verdicts[2]]
