"""The builders render what a model owner sees in `kubectl get deploy,svc -o yaml`.

Golden files pin the whole objects; regenerate them after an intended change with
    ARGOSY_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/operator/test_builders.py
and review the diff. The other tests state the rules one by one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_operator import builders
from argosy_operator.builders import SecretKeyRef, ServerInputs

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ARGOSY_UPDATE_GOLDEN") == "1"

BASE = ServerInputs(
    name="llama-8b",
    namespace="team-a",
    owner_uid="0b5c1f0e-1111-4222-8333-444455556666",
    model_uri="hf://meta-llama/Llama-3.1-8B-Instruct",
    served_model_names=("llama-8b",),
    replicas=1,
    image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    max_model_len=8192,
    gpu_memory_utilization=0.9,
    gpu_product="NVIDIA-L4",
)

CASES: dict[str, ServerInputs] = {
    "small-hf-l4": BASE,
    "tp4-h100-everything": dataclasses.replace(
        BASE,
        name="llama-70b",
        model_uri="hf://meta-llama/Llama-3.3-70B-Instruct",
        served_model_names=("llama-70b", "llama-3.3"),
        replicas=2,
        tensor_parallel_size=4,
        gpu_product="NVIDIA-H100-80GB-HBM3",
        revision="v1.0",
        dtype="bfloat16",
        quantization="fp8",
        kv_cache_dtype="fp8",
        max_num_batched_tokens=8192,
        enforce_eager=True,
        gpu_memory_utilization=0.95,
        extra_args=("--enable-prefix-caching", "--max-num-seqs=128"),
        env=({"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},),
        hf_token_secret=SecretKeyRef("hf-token", "token"),
        node_selector={"topology.kubernetes.io/zone": "zone-a"},
        tolerations=({"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},),
        priority_class_name="llm-serving",
    ),
    "pvc-tp2-a100": dataclasses.replace(
        BASE,
        name="qwen-32b",
        model_uri="pvc://models/qwen/Qwen2.5-32B-Instruct",
        served_model_names=("qwen-32b",),
        tensor_parallel_size=2,
        gpu_product="NVIDIA-A100-SXM4-40GB",
        max_model_len=None,
    ),
    "s3-pipeline": dataclasses.replace(
        BASE,
        name="mistral",
        model_uri="s3://weights/mistral-7b",
        served_model_names=("mistral",),
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        gpu_product=None,
    ),
    "remote-code-chat-template": dataclasses.replace(
        BASE,
        name="baichuan-7b",
        model_uri="hf://baichuan-inc/Baichuan-7B",
        served_model_names=("baichuan-7b",),
        trust_remote_code=True,
        tokenizer_mode="hf",
        tokenizer="baichuan-inc/Baichuan-7B",
        tokenizer_revision="main",
        chat_template=builders.ChatTemplateMount("baichuan-7b-chat-template", "chat-template.jinja", "0123abcd"),
        generation_override=(("temperature", 0.3), ("max_new_tokens", 512), ("repetition_penalty", 1.1)),
    ),
}


def render(inputs: ServerInputs) -> list[dict[str, Any]]:
    return [builders.build_deployment(inputs),
            builders.build_service(inputs.name, inputs.namespace, inputs.owner_uid)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    rendered = yaml.safe_dump_all(render(CASES[case]), sort_keys=True)
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"{path.name} is missing; run with ARGOSY_UPDATE_GOLDEN=1 to create it")
        path.write_text(rendered)
    assert rendered == path.read_text(), f"{path.name} changed; regenerate with ARGOSY_UPDATE_GOLDEN=1 if intended"


def _container(d: dict[str, Any]) -> dict[str, Any]:
    (container,) = d["spec"]["template"]["spec"]["containers"]
    return container


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2)])
def test_pod_requests_tensor_times_pipeline_gpus_and_flags_agree(tensor: int, pipeline: int) -> None:
    d = builders.build_deployment(dataclasses.replace(
        BASE, tensor_parallel_size=tensor, pipeline_parallel_size=pipeline))
    c = _container(d)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tensor * pipeline)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(tensor * pipeline)
    assert _flag(c["args"], "--tensor-parallel-size") == str(tensor)
    assert _flag(c["args"], "--pipeline-parallel-size") == str(pipeline)


@pytest.mark.parametrize(("tensor", "has_shm"), [(1, False), (2, True), (8, True)])
def test_shared_memory_volume_only_with_several_gpus(tensor: int, has_shm: bool) -> None:
    d = builders.build_deployment(dataclasses.replace(BASE, tensor_parallel_size=tensor))
    mounts = _container(d).get("volumeMounts", [])
    volumes = d["spec"]["template"]["spec"].get("volumes", [])
    assert ({"name": "dshm", "mountPath": "/dev/shm"} in mounts) is has_shm
    assert ({"name": "dshm", "emptyDir": {"medium": "Memory"}} in volumes) is has_shm


@pytest.mark.parametrize(("uri", "model_arg", "extra"), [
    ("hf://org/repo", "org/repo", []),
    ("pvc://claim/sub/dir", "/mnt/models/sub/dir", []),
    ("pvc://claim", "/mnt/models", []),
    ("s3://bucket/path/model", "s3://bucket/path/model", ["--load-format", "runai_streamer"]),
])
def test_model_uri_becomes_the_vllm_model_argument(uri: str, model_arg: str, extra: list[str]) -> None:
    c = _container(builders.build_deployment(dataclasses.replace(BASE, model_uri=uri, revision="r1")))
    assert c["command"] == ["vllm", "serve"]
    assert c["args"][0] == model_arg
    if extra:
        assert c["args"][-2:] == extra
    assert ("--revision" in c["args"]) is uri.startswith("hf://")


def test_pvc_is_mounted_read_only() -> None:
    d = builders.build_deployment(dataclasses.replace(BASE, model_uri="pvc://weights/llama"))
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in (
        d["spec"]["template"]["spec"]["volumes"])
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in _container(d)["volumeMounts"]


def test_user_load_format_wins_for_s3() -> None:
    c = _container(builders.build_deployment(dataclasses.replace(
        BASE, model_uri="s3://b/m", extra_args=("--load-format=safetensors",))))
    assert "runai_streamer" not in c["args"]
    assert c["args"][-1] == "--load-format=safetensors"


@pytest.mark.parametrize("uri", ["gs://bucket/model", "hf://", "meta-llama/Llama-3.1-8B", "http://x/y"])
def test_unknown_model_uri_is_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="URI"):
        builders.build_deployment(dataclasses.replace(BASE, model_uri=uri))


def test_optional_engine_flags_only_when_set() -> None:
    args = _container(builders.build_deployment(dataclasses.replace(
        BASE, dtype="auto", kv_cache_dtype="auto", max_model_len=None)))["args"]
    for flag in ("--dtype", "--kv-cache-dtype", "--quantization", "--max-num-batched-tokens",
                 "--enforce-eager", "--max-model-len", "--revision"):
        assert flag not in args
    assert args[-2:] == ["--port", "8000"]


@pytest.mark.parametrize(("quantization", "extra", "allowed"), [
    ("fbgemm_fp8", (), True),  # deprecated: vLLM refuses to start without the flag
    ("fbgemm_fp8", ("--allow-deprecated-quantization",), True),  # the user's own flag, not a second one
    ("fp8", (), False),
])
def test_deprecated_quantization_is_allowed_explicitly(
    quantization: str, extra: tuple[str, ...], allowed: bool
) -> None:
    args = _container(builders.build_deployment(dataclasses.replace(
        BASE, quantization=quantization, extra_args=extra)))["args"]
    assert args.count("--allow-deprecated-quantization") == (1 if allowed else 0)


def test_served_model_names_in_flag_and_pod_annotation() -> None:
    d = builders.build_deployment(dataclasses.replace(BASE, served_model_names=("a", "b/c")))
    args = _container(d)["args"]
    i = args.index("--served-model-name")
    assert args[i + 1:i + 3] == ["a", "b/c"]
    annotation = d["spec"]["template"]["metadata"]["annotations"]["argosy.dev/served-model-names"]
    assert json.loads(annotation) == ["a", "b/c"]


def test_labels_owner_reference_and_selectors() -> None:
    d = builders.build_deployment(BASE)
    s = builders.build_service(BASE.name, BASE.namespace, BASE.owner_uid)
    expected = {
        "app.kubernetes.io/managed-by": "argosy-operator",
        "argosy.dev/deployment": "llama-8b",
        "argosy.dev/role": "server",
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "llama-8b",
    }
    for labels in (d["metadata"]["labels"], d["spec"]["template"]["metadata"]["labels"], s["metadata"]["labels"]):
        assert labels == expected
    for obj in (d, s):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "argosy.dev/v1alpha1", "kind": "LLMDeployment", "name": "llama-8b",
                       "uid": BASE.owner_uid, "controller": True, "blockOwnerDeletion": True}
    selector = {"argosy.dev/deployment": "llama-8b", "argosy.dev/role": "server"}
    assert d["spec"]["selector"]["matchLabels"] == selector
    assert s["spec"]["selector"] == selector
    assert builders.label_selector("llama-8b") == "argosy.dev/deployment=llama-8b,argosy.dev/role=server"
    assert s["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_probes_health_and_a_long_startup_budget() -> None:
    c = _container(builders.build_deployment(BASE))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_scheduling_gpu_product_wins_and_toleration_not_duplicated() -> None:
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    d = builders.build_deployment(dataclasses.replace(
        BASE,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "serving"},
        tolerations=(gpu_toleration, {"key": "spot", "operator": "Exists"}),
    ))
    pod = d["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4", "pool": "serving"}
    assert pod["tolerations"] == [gpu_toleration, {"key": "spot", "operator": "Exists"}]
    assert "priorityClassName" not in pod
    assert pod["enableServiceLinks"] is False


def test_hf_token_from_secret_and_user_cannot_shadow_it() -> None:
    c = _container(builders.build_deployment(dataclasses.replace(
        BASE,
        hf_token_secret=SecretKeyRef("hf", "tok"),
        env=({"name": "HF_TOKEN", "value": "leaked"}, {"name": "X", "value": "1"}),
    )))
    assert c["env"] == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}},
        {"name": "X", "value": "1"},
    ]


def test_rollout_replaces_one_pod_at_a_time_without_surge() -> None:
    d = builders.build_deployment(dataclasses.replace(BASE, replicas=3))
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["strategy"] == {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}


def _no_empty(value: Any, path: str = "") -> None:
    if isinstance(value, dict):
        assert value, f"empty map at {path}"
        for k, v in value.items():
            _no_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        assert value, f"empty list at {path}"
        for i, v in enumerate(value):
            _no_empty(v, f"{path}[{i}]")
    else:
        assert value is not None, f"None at {path}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_empty_or_null_fields_that_the_api_server_would_drop(case: str) -> None:
    # The drift check compares these with live objects; the API server omits empty
    # fields, so an empty one here would look like drift on every pass.
    for obj in render(CASES[case]):
        _no_empty(obj)


@pytest.mark.parametrize(("name", "expected"), [
    ("llama-8b", "llama-8b"),
    ("a" * 63, "a" * 63),
])
def test_service_keeps_a_valid_name(name: str, expected: str) -> None:
    assert builders.build_service(name, "ns", "uid")["metadata"]["name"] == expected


@pytest.mark.parametrize("name", ["llama-3.1-8b", "8b-model", "x" * 64, "qwen2.5-72b.awq"])
def test_service_name_is_a_dns_label_even_when_the_llmdeployment_name_is_not(name: str) -> None:
    service = builders.service_name(name)
    assert len(service) <= 63
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service)
    if "." in name:  # "a.b" and "a-b" are different LLMDeployments: different Services
        assert builders.service_name(name.replace(".", "-")) != service


def test_remote_code_and_tokenizer_flags_only_when_set() -> None:
    plain = builders.vllm_args(BASE, builders.model_source(BASE.model_uri))
    for flag in ("--trust-remote-code", "--tokenizer", "--tokenizer-mode", "--tokenizer-revision",
                 "--chat-template", "--override-generation-config"):
        assert flag not in plain
    inputs = dataclasses.replace(BASE, trust_remote_code=True, tokenizer="org/tok", tokenizer_mode="hf",
                                 tokenizer_revision="v2")
    args = builders.vllm_args(inputs, builders.model_source(inputs.model_uri))
    assert "--trust-remote-code" in args
    assert args[args.index("--tokenizer") + 1] == "org/tok"
    assert args[args.index("--tokenizer-mode") + 1] == "hf"
    assert args[args.index("--tokenizer-revision") + 1] == "v2"
    # vLLM's own default is left out, like dtype auto.
    auto = dataclasses.replace(BASE, tokenizer_mode="auto")
    assert "--tokenizer-mode" not in builders.vllm_args(auto, builders.model_source(auto.model_uri))


def test_chat_template_mounted_read_only_and_its_hash_rolls_the_pods() -> None:
    mount = builders.ChatTemplateMount("tpl", "my.jinja", builders.content_hash("{{ messages }}"))
    deployment = builders.build_deployment(dataclasses.replace(BASE, chat_template=mount))
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    path = container["args"][container["args"].index("--chat-template") + 1]
    (volume_mount,) = [m for m in container["volumeMounts"] if m["name"] == "chat-template"]
    assert volume_mount["readOnly"] is True and path.startswith(volume_mount["mountPath"] + "/")
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "chat-template"]
    assert volume["configMap"] == {"name": "tpl", "items": [{"key": "my.jinja", "path": path.rsplit("/", 1)[1]}]}
    edited = dataclasses.replace(mount, content_hash=builders.content_hash("{{ messages | tojson }}"))
    rolled = builders.build_deployment(dataclasses.replace(BASE, chat_template=edited))
    before = pod["metadata"]["annotations"][builders.ANNOTATION_CHAT_TEMPLATE_HASH]
    after = rolled["spec"]["template"]["metadata"]["annotations"][builders.ANNOTATION_CHAT_TEMPLATE_HASH]
    assert before != after


def test_generation_defaults_become_one_json_override() -> None:
    inputs = dataclasses.replace(BASE, generation_override=(("top_p", 0.9), ("max_new_tokens", 256)))
    args = builders.vllm_args(inputs, builders.model_source(inputs.model_uri))
    assert json.loads(args[args.index("--override-generation-config") + 1]) == {"top_p": 0.9, "max_new_tokens": 256}


def test_inline_chat_template_config_map_is_owned_and_labelled() -> None:
    config_map = builders.build_chat_template_config_map("llama-8b", "team-a", "uid-1", "{{ bos_token }}")
    assert config_map["metadata"]["name"] == builders.chat_template_config_map_name("llama-8b")
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert config_map["metadata"]["labels"][builders.LABEL_MANAGED_BY] == "argosy-operator"
    assert config_map["data"] == {builders.CHAT_TEMPLATE_KEY: "{{ bos_token }}"}
