"""The pod runner's pure decisions: which image runs what, env and $(VAR) as the kubelet does them,
the vLLM substitutions, probes, backoff and the pod status it writes."""

from __future__ import annotations

import pytest
from argosy_operator.builders import ServerInputs, build_deployment
from argosy_sandbox import kubelet_plan as plan

POD_IP = "127.64.0.7"
FACTS = plan.PodFacts(
    name="llama-0", namespace="team-a", uid="u-1", pod_ip=POD_IP, node_name="h100-0",
    service_account="default", labels={"app": "llama"}, annotations={"note": "x"},
)


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        ("vllm/vllm-openai:v0.32.0", "vllm"),
        ("docker.io/vllm/vllm-openai:latest", "vllm"),
        ("vllm/vllm-openai@sha256:abc", "vllm"),
        ("ghcr.io/argosy-dev/argosy-operator:0.1.0", "argosy-operator"),
        ("ghcr.io/argosy-dev/argosy-gateway:0.1.0", "argosy-gateway"),
        ("example.invalid/vllm", None),
        ("vllm/vllm-openai-cpu:v1", None),
        ("ghcr.io/x/argosy-operator-extra:1", None),
        ("busybox", None),
    ],
)
def test_only_known_images_are_run(image: str, kind: str | None) -> None:
    assert plan.image_kind(image) == kind


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)-$(B)", "1-2"),
        ("$$(A)", "$(A)"),  # $$ escapes
        ("$(MISSING)", "$(MISSING)"),  # undefined references stay as written
        ("$(A", "$(A"),
        ("cost $5", "cost $5"),
        ("$", "$"),
    ],
)
def test_var_expansion_follows_kubernetes(text: str, expected: str) -> None:
    assert plan.expand(text, {"A": "1", "B": "2"}) == expected


def test_env_resolves_values_fieldrefs_secrets_and_configmaps_in_order() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "URL", "value": "http://$(IP):8000/$(NAME)"},
            {"name": "LATER", "value": "$(DEFINED_AFTER)"},
            {"name": "DEFINED_AFTER", "value": "x"},
            {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "none", "key": "k", "optional": True}}},
        ],
    }
    data = {("Secret", "hf"): {"token": "t0k"}, ("ConfigMap", "settings"): {"MODE": "fast"}}
    env = plan.container_env(container, FACTS, lambda kind, name: data.get((kind, name)))
    assert env == {
        "CFG_MODE": "fast", "IP": POD_IP, "NAME": "llama-0", "NS": "team-a", "APP": "llama",
        "TOKEN": "t0k", "URL": f"http://{POD_IP}:8000/llama-0", "LATER": "$(DEFINED_AFTER)", "DEFINED_AFTER": "x",
    }


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"secretKeyRef": {"name": "absent", "key": "k"}}, "Secret 'absent' not found"),
        ({"secretKeyRef": {"name": "hf", "key": "other"}}, "key 'other' in Secret 'hf' not found"),
        ({"fieldRef": {"fieldPath": "status.nonsense"}}, "not supported"),
    ],
)
def test_env_that_cannot_be_resolved_is_a_config_error(ref: dict, message: str) -> None:
    container = {"name": "c", "env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(plan.ContainerConfigError, match=message):
        plan.container_env(container, FACTS, lambda kind, name: {"token": "t"} if name == "hf" else None)


def test_argv_combines_command_and_args_with_the_image_entry_point() -> None:
    env = {"PORT": "9000"}
    assert plan.container_argv({"args": ["run", "--metrics-port=$(PORT)"]}, "argosy-operator", env) == [
        "argosy-operator", "run", "--metrics-port=9000"]
    assert plan.container_argv({}, "argosy-gateway", env) == ["argosy-gateway", "--host=0.0.0.0", "--port=8000"]
    assert plan.container_argv({"command": ["vllm", "serve"], "args": ["m"]}, "vllm", env) == ["vllm", "serve", "m"]
    assert plan.container_argv({"command": ["sh", "-c", "x"]}, "vllm", env) == ["sh", "-c", "x"]


def _operator_args(**overrides: object) -> list[str]:
    inputs = ServerInputs(**{
        "name": "llama", "namespace": "team-a", "owner_uid": "u", "model_uri": "hf://meta-llama/Llama-3.1-8B",
        "served_model_names": ("llama", "llama-8b"), "replicas": 1, "image": "vllm/vllm-openai:v0.32.0",
        "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_model_len": 4096,
        "gpu_memory_utilization": 0.9, **overrides,
    })
    container = build_deployment(inputs)["spec"]["template"]["spec"]["containers"][0]
    serve = plan.split_vllm_serve(plan.container_argv(container, "vllm", {}))
    assert serve is not None
    return serve


def test_vllm_keeps_the_operators_arguments_and_swaps_only_the_model() -> None:
    args = _operator_args(dtype="bfloat16", enforce_eager=True, extra_args=("--seed", "3"))
    result = plan.vllm_serve_args(args, POD_IP, "/cache/standin")
    assert result.args == ["/cache/standin", *args[1:], "--host", POD_IP]
    assert result.substitutions[0].startswith("model 'meta-llama/Llama-3.1-8B' -> the stand-in model")


def test_vllm_drops_what_only_the_real_weights_or_gpus_need() -> None:
    args = _operator_args(quantization="awq", revision="main", tensor_parallel_size=4)
    result = plan.vllm_serve_args(args, POD_IP, "/m")
    assert "--quantization" not in result.args and "--revision" not in result.args
    assert result.args[result.args.index("--tensor-parallel-size") + 1] == "1"
    assert result.args[result.args.index("--max-model-len") + 1] == "4096"
    assert len(result.substitutions) == 5  # model, quantization, revision, TP, host


def test_vllm_listens_on_the_pod_ip_even_when_told_every_address() -> None:
    result = plan.vllm_serve_args(["m", "--host=0.0.0.0", "--port", "8000"], POD_IP, "/m")
    assert result.args == ["/m", f"--host={POD_IP}", "--port", "8000"]
    with pytest.raises(plan.ContainerConfigError, match="model as its first argument"):
        plan.vllm_serve_args(["--port", "8000"], POD_IP, "/m")


def test_the_simulator_serves_the_pods_names_port_and_length() -> None:
    args = _operator_args()
    assert plan.simulator_args(args, POD_IP) == [
        "--host", POD_IP, "--port", "8000", "--model", "llama", "--model", "llama-8b", "--max-model-len", "4096"]


@pytest.mark.parametrize(
    ("pod", "owner", "namespace", "default", "expected"),
    [
        ({}, {}, {}, "simulator", "simulator"),
        ({}, {}, {}, "real", "real"),
        ({}, {}, {plan.BACKEND_KEY: "real"}, "simulator", "real"),
        ({}, {plan.BACKEND_KEY: "simulator"}, {plan.BACKEND_KEY: "real"}, "simulator", "simulator"),
        ({plan.BACKEND_KEY: "real"}, {plan.BACKEND_KEY: "simulator"}, {}, "simulator", "real"),
        ({}, {}, {plan.BACKEND_KEY: "none"}, "simulator", "none"),
    ],
)
def test_backend_choice_pod_then_llmdeployment_then_namespace(pod, owner, namespace, default, expected) -> None:
    assert plan.choose_backend(pod, owner, namespace, default) == expected


def test_a_misspelled_backend_is_refused() -> None:
    with pytest.raises(plan.ContainerConfigError, match="use one of real, simulator, none"):
        plan.choose_backend({}, {}, {plan.BACKEND_KEY: "reall"})


def test_wildcard_bind_becomes_the_pod_ip_and_argosy_gets_a_kubeconfig() -> None:
    assert plan.bind_to_pod_ip(["--host=0.0.0.0", "--port=8000", "--workers=1"], POD_IP) == [
        f"--host={POD_IP}", "--port=8000", "--workers=1"]
    assert plan.argosy_env("argosy-operator", POD_IP, "/k")["ARGOSY_OPERATOR_METRICS_HOST"] == POD_IP
    assert plan.argosy_env("argosy-gateway", POD_IP, "/k")["ARGOSY_GATEWAY_KUBECONFIG"] == "/k"


def test_probes_resolve_named_ports_and_defaults() -> None:
    container = {"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}
    probe = plan.parse_probe({"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}, container, POD_IP)
    assert probe == plan.Probe("httpGet", POD_IP, 8000, path="/health", period=5.0)
    tcp = plan.parse_probe({"tcpSocket": {"port": 9000}}, container, POD_IP)
    assert tcp is not None and (tcp.kind, tcp.port, tcp.timeout, tcp.failure_threshold) == ("tcpSocket", 9000, 1.0, 3)
    assert plan.parse_probe(None, container, POD_IP) is None
    with pytest.raises(plan.ContainerConfigError, match="not a named port"):
        plan.parse_probe({"httpGet": {"port": "metrics"}}, container, POD_IP)


def test_backoff_doubles_from_one_second_and_is_capped() -> None:
    assert [plan.restart_delay(n) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0]


def test_status_patch_is_ready_only_when_every_container_is() -> None:
    loading = plan.ContainerState("vllm", "vllm/vllm-openai:v0.32.0", started=True, running_since="t0", pid=42)
    sidecar = plan.ContainerState("side", "busybox", ready=True, started=True, running_since="t0")
    previous = [{"type": "Ready", "status": "False", "lastTransitionTime": "t0"}]
    patch = plan.pod_status_patch([loading, sidecar], "t1", previous)["status"]
    ready = {c["type"]: c for c in patch["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["lastTransitionTime"] == "t0"
    assert ready["message"] == "containers with unready status: [vllm]"
    [first, _] = patch["containerStatuses"]
    assert first["state"] == {"running": {"startedAt": "t0"}} and first["containerID"] == "sandbox://42"

    crashed = plan.ContainerState("vllm", "img", restart_count=2, waiting_reason="CrashLoopBackOff",
                                  last_exit_code=137, last_started="t0", last_finished="t2")
    entry = plan.container_status(crashed)
    assert entry["restartCount"] == 2 and entry["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert entry["lastState"]["terminated"]["exitCode"] == 137

    served = dataclass_ready(loading)
    patch = plan.pod_status_patch([served, sidecar], "t3", previous)["status"]
    ready = {c["type"]: c for c in patch["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["lastTransitionTime"] == "t3"


def dataclass_ready(state: plan.ContainerState) -> plan.ContainerState:
    import dataclasses

    return dataclasses.replace(state, ready=True)


def test_kwok_leaves_the_runners_pods_to_it() -> None:
    stock = {"metadata": {"name": "pod-ready"}, "spec": {"selector": {"matchExpressions": [
        {"key": ".status.phase", "operator": "In", "values": ["Pending"]}]}, "next": {}}}
    others, owned = plan.kwok_pod_stages(stock)
    assert others["spec"]["selector"]["matchExpressions"][-1]["operator"] == "NotIn"
    assert owned["spec"]["selector"]["matchExpressions"][-1]["operator"] == "In"
    assert len(stock["spec"]["selector"]["matchExpressions"]) == 1  # the stock stage is not modified
    assert "Ready" in owned["spec"]["next"]["statusTemplate"] and "phase: Running" in owned["spec"]["next"][
        "statusTemplate"]


def test_log_lines_are_in_the_cri_format() -> None:
    assert plan.cri_log_line("2026-01-01T00:00:00.000001Z", "stdout", b"hello\n") == (
        b"2026-01-01T00:00:00.000001Z stdout F hello\n")


def test_configmap_and_secret_volumes_are_materialised_and_paths_point_at_them() -> None:
    pod_spec = {"volumes": [
        {"name": "chat-template", "configMap": {"name": "tpl", "items": [{"key": "t.jinja", "path": "chat.jinja"}]}},
        {"name": "keys", "secret": {"secretName": "api-keys"}},
        {"name": "tmp", "emptyDir": {}},
    ]}
    container = {"name": "c", "volumeMounts": [
        {"name": "chat-template", "mountPath": "/etc/argosy/chat-template"},
        {"name": "keys", "mountPath": "/etc/keys"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]}
    data = {("ConfigMap", "tpl"): {"t.jinja": "{{ messages }}"}, ("Secret", "api-keys"): {"keys.txt": "k1"}}
    assert plan.volume_refs(pod_spec, container) == [("ConfigMap", "tpl"), ("Secret", "api-keys")]
    mounts = plan.mounted_files(pod_spec, container, lambda kind, name: data.get((kind, name)))
    assert mounts == {"/etc/argosy/chat-template": {"chat.jinja": "{{ messages }}"}, "/etc/keys": {"keys.txt": "k1"}}
    local = {"/etc/argosy/chat-template": "/pods/p/v/0", "/etc/keys": "/pods/p/v/1"}
    assert plan.rewrite_mount_paths("/etc/argosy/chat-template/chat.jinja", local) == "/pods/p/v/0/chat.jinja"
    assert plan.rewrite_mount_paths("--chat-template=/etc/argosy/chat-template/chat.jinja", local) == (
        "--chat-template=/pods/p/v/0/chat.jinja")
    assert plan.rewrite_mount_paths("/etc/keysmith", local) == "/etc/keysmith"  # not under the mount
    assert plan.rewrite_mount_paths("/tmp/x", local) == "/tmp/x"  # emptyDir: the machine's own path
    with pytest.raises(plan.ContainerConfigError, match="ConfigMap 'tpl' not found"):
        plan.mounted_files(pod_spec, container, lambda kind, name: None)


def test_the_operators_chat_template_mount_reaches_vllm() -> None:
    from argosy_operator.builders import ChatTemplateMount

    inputs = ServerInputs(
        name="m", namespace="ns", owner_uid="u", model_uri="hf://org/m", served_model_names=("m",), replicas=1,
        image="vllm/vllm-openai:v0.32.0", tensor_parallel_size=1, pipeline_parallel_size=1, max_model_len=512,
        gpu_memory_utilization=0.9, chat_template=ChatTemplateMount(config_map="tpl", key="t.jinja", content_hash="h"),
    )
    pod_spec = build_deployment(inputs)["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    mounts = plan.mounted_files(pod_spec, container, lambda kind, name: {"t.jinja": "T"} if name == "tpl" else None)
    [(mount_path, files)] = mounts.items()
    argv = plan.container_argv(container, "vllm", {})
    template_arg = argv[argv.index("--chat-template") + 1]
    rewritten = plan.rewrite_mount_paths(template_arg, {mount_path: "/local"})
    assert rewritten.startswith("/local/") and rewritten.removeprefix("/local/") in files


# -- termination --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("metadata", "spec", "grace"),
    [
        ({"deletionGracePeriodSeconds": 7}, {"terminationGracePeriodSeconds": 300}, 7),  # the delete call's own
        ({}, {"terminationGracePeriodSeconds": 300}, 300),
        ({"deletionGracePeriodSeconds": 0}, {"terminationGracePeriodSeconds": 300}, 0),  # --grace-period=0
        ({}, {}, 30),  # the API's default
    ],
)
def test_the_grace_period_is_the_delete_calls_then_the_pods(metadata: dict, spec: dict, grace: int) -> None:
    assert plan.termination_grace_seconds({"metadata": metadata, "spec": spec}) == grace


def test_pre_stop_exec_runs_in_the_pod_with_its_loopback_at_the_pod_ip() -> None:
    script = "urllib.request.urlopen('http://127.0.0.1:8000/metrics'); open('/tmp/localhost.log')"
    container = {"name": "vllm", "lifecycle": {"preStop": {"exec": {"command": ["python3", "-c", script]}}}}
    hook = plan.pre_stop_hook(container, POD_IP, 300)
    assert hook is not None and hook.action == "exec" and hook.probe is not None
    assert hook.probe.command == (
        "python3", "-c", f"urllib.request.urlopen('http://{POD_IP}:8000/metrics'); open('/tmp/localhost.log')")
    assert hook.probe.timeout == 300  # the hook may take the whole grace period
    assert plan.pod_loopback("curl localhost:8000 127.0.0.10 x.localhost", POD_IP) == (
        f"curl {POD_IP}:8000 127.0.0.10 x.localhost")


def test_pre_stop_http_get_sleep_and_tcp_socket() -> None:
    container = {"name": "c", "ports": [{"name": "http", "containerPort": 8000}]}
    get = plan.pre_stop_hook({**container, "lifecycle": {"preStop": {"httpGet": {"path": "/drain", "port": "http"}}}},
                             POD_IP, 60)
    assert get is not None and get.probe is not None
    assert (get.action, get.probe.host, get.probe.port, get.probe.path, get.probe.timeout) == (
        "httpGet", POD_IP, 8000, "/drain", 60)
    assert get.describe() == f"httpGet http://{POD_IP}:8000/drain"
    nap = plan.pre_stop_hook({**container, "lifecycle": {"preStop": {"sleep": {"seconds": 90}}}}, POD_IP, 60)
    assert nap == plan.PreStopHook("sleep", seconds=60)  # never past the grace period
    # tcpSocket is accepted by the API for compatibility and never run by the kubelet.
    assert plan.pre_stop_hook({**container, "lifecycle": {"preStop": {"tcpSocket": {"port": 1}}}}, POD_IP, 60) is None
    assert plan.pre_stop_hook(container, POD_IP, 60) is None
    with pytest.raises(plan.ContainerConfigError, match="no handler"):
        plan.pre_stop_hook({**container, "lifecycle": {"preStop": {"grpc": {"port": 1}}}}, POD_IP, 60)


@pytest.mark.parametrize(("grace", "hook", "stop"), [(300, 12.5, 287.5), (30, 29.0, 2.0), (30, 45.0, 2.0), (0, 0, 2.0)])
def test_sigterm_gets_what_the_hook_left_and_at_least_two_seconds(grace: int, hook: float, stop: float) -> None:
    assert plan.stop_grace_after_hook(grace, hook) == stop


def test_the_operators_serving_pod_drains_through_its_own_hook() -> None:
    inputs = ServerInputs(
        name="m", namespace="ns", owner_uid="u", model_uri="hf://o/m", served_model_names=("m",), replicas=1,
        image="vllm/vllm-openai:v0.32.0", tensor_parallel_size=1, pipeline_parallel_size=1, max_model_len=None,
        gpu_memory_utilization=0.9, termination_grace_period_seconds=120,
    )
    pod = {"metadata": {}, "spec": build_deployment(inputs)["spec"]["template"]["spec"]}
    grace = plan.termination_grace_seconds(pod)
    hook = plan.pre_stop_hook(pod["spec"]["containers"][0], POD_IP, grace)
    assert grace == 120 and hook is not None and hook.probe is not None
    assert hook.probe.command[0] == "python3" and f"http://{POD_IP}:8000/metrics" in hook.probe.command[2]


def test_kwok_deletes_only_the_pods_the_runner_does_not_run() -> None:
    stock = {"metadata": {"name": "pod-delete"}, "spec": {"selector": {"matchExpressions": [
        {"key": ".metadata.deletionTimestamp", "operator": "Exists"}]}, "next": {"delete": True}}}
    stage = plan.kwok_pod_delete_stage(stock)
    assert stage["spec"]["selector"]["matchExpressions"][-1] == {
        "key": plan.OWNED_EXPRESSION, "operator": "NotIn", "values": ["true"]}
    assert stage["spec"]["next"] == {"delete": True} and len(stock["spec"]["selector"]["matchExpressions"]) == 1


def test_the_simulator_shuts_down_as_the_pods_vllm_would() -> None:
    args = plan.simulator_args(["m", "--port", "8000", "--shutdown-timeout", "30"], POD_IP)
    assert args[-2:] == ["--shutdown-timeout", "30"]
    assert "--shutdown-timeout" not in plan.simulator_args(["m", "--port", "8000"], POD_IP)
