"""What the operator renders for spec.engine.chatTemplate and generationDefaults, run by real vLLM.

The operator's own reconcile builds the Deployment and the ConfigMap for an inline template;
the ConfigMap's data is written where the pod would mount it, and `vllm serve` (the CPU build,
the stand-in model) starts with exactly the container's --chat-template and
--override-generation-config. What a client then sees: the prompt vLLM builds from chat
messages is the template's, and a request that sends no max_tokens gets the default.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from argosy_operator import builders
from argosy_operator.reconcile import decide
from argosy_sandbox.real_vllm import RealVllm, VllmServer

MARKER = "[argosy-template]"
TEMPLATE = (
    "{% for m in messages %}" + MARKER + " {{ m.role }} says: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}" + MARKER + " assistant says:{% endif %}"
)
DEFAULT_MAX_TOKENS = 3
L4 = {
    "metadata": {"name": "l4-0", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.memory": "23034"}},
    "spec": {"unschedulable": False},
    "status": {"allocatable": {"nvidia.com/gpu": "1"}, "conditions": [{"type": "Ready", "status": "True"}]},
}


def _rendered_by_the_operator() -> tuple[list[str], str]:
    """The vLLM container's args and the template ConfigMap's data, from one reconcile decision."""
    body = {
        "apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "templated", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": {"model": {"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"},
                 "engine": {"chatTemplate": {"inline": TEMPLATE},
                            "generationDefaults": {"maxTokens": DEFAULT_MAX_TOKENS, "temperature": 0}}},
    }
    from argosy_operator import chattemplate

    decision = decide(body, (L4,), chat_template=chattemplate.inline("templated", "team-a", "uid-1", TEMPLATE))
    kinds = {child["kind"]: child for child in decision.desired}
    args = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    return list(args), kinds["ConfigMap"]["data"][builders.CHAT_TEMPLATE_KEY]


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.fixture(scope="module")
def templated_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    args, template = _rendered_by_the_operator()
    assert _flag(args, "--chat-template") == f"{builders.CHAT_TEMPLATE_DIR}/{builders.CHAT_TEMPLATE_FILE}"
    mounted: Path = tmp_path_factory.mktemp("chat-template") / builders.CHAT_TEMPLATE_FILE
    mounted.write_text(template)  # the ConfigMap volume, as the pod would see it
    extra = ["--enforce-eager", "--chat-template", str(mounted),
             "--override-generation-config", _flag(args, "--override-generation-config")]
    with VllmServer(served_model_name="templated", extra_args=extra, report=lambda message: None) as server:
        yield server.info


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.loads(response.read()))


def test_the_template_from_the_config_map_builds_the_prompt_vllm_sees(templated_vllm: RealVllm) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    tokens = _post(f"{templated_vllm.base_url}/tokenize", {"model": "templated", "messages": messages})["tokens"]
    prompt = _post(f"{templated_vllm.base_url}/detokenize", {"model": "templated", "tokens": tokens})["prompt"]
    assert f"{MARKER} user says: hello there" in prompt
    assert prompt.rstrip().endswith(f"{MARKER} assistant says:")


def test_generation_defaults_apply_to_requests_that_send_none(templated_vllm: RealVllm) -> None:
    client = openai.OpenAI(base_url=templated_vllm.openai_base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="templated", messages=[{"role": "user", "content": "tell me a story"}],
        extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == DEFAULT_MAX_TOKENS
    assert reply.choices[0].finish_reason == "length"
    # vLLM 0.32 also caps requests at it: max_new_tokens in the override is a server-side limit
    # (chat_completion/serving.py override_max_tokens), so asking for more still gets 3.
    longer = client.chat.completions.create(
        model="templated", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=8,
        extra_body={"ignore_eos": True})
    assert longer.usage is not None and longer.usage.completion_tokens == DEFAULT_MAX_TOKENS
    shorter = client.chat.completions.create(
        model="templated", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=2,
        extra_body={"ignore_eos": True})
    assert shorter.usage is not None and shorter.usage.completion_tokens == 2
