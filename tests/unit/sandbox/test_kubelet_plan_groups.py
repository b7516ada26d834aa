"""The pod runner's pure decisions for group pods: the vLLM image's `/bin/sh -c` scripts, the pod names
cluster DNS would answer, and what the image's `vllm` runs (the CPU runtime or the simulator)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from argosy_operator import group_builders as gb
from argosy_operator.builders import ServerInputs
from argosy_sandbox import kubelet_plan as plan

LEADER_IP, WORKER_IP = "127.64.0.7", "127.64.0.8"
SERVER = ServerInputs(
    name="llama-405b", namespace="team-a", owner_uid="uid-1", model_uri="hf://meta-llama/Llama-3.1-405B-Instruct",
    served_model_names=("llama-405b",), replicas=1, image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=1, pipeline_parallel_size=2, max_model_len=4096, gpu_memory_utilization=0.9,
    pods_per_replica=2,
)
GROUP = gb.GroupInputs(server=SERVER, index=0)
LEADER_NAME = "llama-405b-g0-0.llama-405b-g0.team-a.svc"
RUNTIME = ("/cache/runtime/bin/python", "-P", "/testkit/vllm_launcher.py")


def _member(ordinal: int, ip: str | None, ready: bool = False, **meta: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {
        "metadata": {"name": f"llama-405b-g0-{ordinal}", "namespace": "team-a",
                     "labels": gb.group_selector("llama-405b", "llama-405b-g0"), **meta},
        "spec": {"hostname": f"llama-405b-g0-{ordinal}", "subdomain": "llama-405b-g0"},
        "status": status,
    }


HEADLESS = gb.build_group_service(GROUP)


def test_the_group_containers_command_is_a_shell_script() -> None:
    container = gb.build_group_statefulset(GROUP)["spec"]["template"]["spec"]["containers"][0]
    assert plan.is_shell_script(plan.container_argv(container, "vllm", {}))
    assert plan.is_shell_script(["bash", "-c", "true"])
    assert not plan.is_shell_script(["vllm", "serve", "m"])
    assert not plan.is_shell_script(["/bin/sh", "/script.sh"])


def test_pod_names_resolve_as_cluster_dns_answers_them() -> None:
    records = plan.pod_dns_records([_member(0, LEADER_IP), _member(1, WORKER_IP)], [HEADLESS])
    # Not Ready yet, but the group's Service publishes not-ready addresses: members meet before Ready.
    assert records == {
        LEADER_NAME: LEADER_IP, f"{LEADER_NAME}.cluster.local": LEADER_IP,
        "llama-405b-g0-1.llama-405b-g0.team-a.svc": WORKER_IP,
        "llama-405b-g0-1.llama-405b-g0.team-a.svc.cluster.local": WORKER_IP,
    }


@pytest.mark.parametrize(
    ("pod", "service_change", "why"),
    [
        (_member(0, None), {}, "no IP yet"),
        (_member(0, LEADER_IP, deletionTimestamp="2026-12-01T00:00:00Z"), {}, "being deleted"),
        (_member(0, LEADER_IP), {"publishNotReadyAddresses": False}, "not Ready, not published"),
        (_member(0, LEADER_IP), {"clusterIP": "10.0.0.1"}, "not a headless Service"),
        (_member(0, LEADER_IP), {"selector": {"argosy.dev/group": "other"}}, "not selected"),
    ],
)
def test_a_pod_has_no_name_unless_a_headless_service_publishes_it(
    pod: dict[str, Any], service_change: dict[str, Any], why: str
) -> None:
    service = json.loads(json.dumps(HEADLESS))
    service["spec"].update(service_change)
    assert plan.pod_dns_records([pod], [service]) == {}, why


def test_a_ready_pod_is_published_without_publish_not_ready_addresses() -> None:
    service = json.loads(json.dumps(HEADLESS))
    service["spec"]["publishNotReadyAddresses"] = False
    assert plan.pod_dns_records([_member(0, LEADER_IP, ready=True)], [service])[LEADER_NAME] == LEADER_IP


def test_cluster_names_are_replaced_wherever_they_appear() -> None:
    records = {LEADER_NAME: LEADER_IP, f"{LEADER_NAME}.cluster.local": LEADER_IP}
    assert plan.resolve_cluster_names(LEADER_NAME, records) == LEADER_IP
    assert plan.resolve_cluster_names(f"--address={LEADER_NAME}:6379", records) == f"--address={LEADER_IP}:6379"
    assert plan.resolve_cluster_names(f"http://{LEADER_NAME}.cluster.local:8000/x", records) == (
        f"http://{LEADER_IP}:8000/x")
    # Not cluster names: left alone.
    for text in ("meta-llama/Llama-3.1-405B", "files.svc.example.com", "a.svcx", "127.0.0.1"):
        assert plan.resolve_cluster_names(text, records) == text


def test_an_unresolved_cluster_name_fails_the_start_instead_of_reaching_a_resolver() -> None:
    with pytest.raises(plan.NameNotResolved, match=re.escape(LEADER_NAME)):
        plan.resolve_cluster_names(f"--master-addr={LEADER_NAME}", {})
    assert issubclass(plan.NameNotResolved, plan.ContainerConfigError)  # retried with backoff


def test_exec_probes_and_hooks_resolve_names_as_the_container_did() -> None:
    records = {LEADER_NAME: LEADER_IP}
    command = ["/bin/sh", "-c", f"exec python3 drain.py --host {LEADER_NAME}"]
    assert plan.resolve_command(command, records) == ["/bin/sh", "-c", f"exec python3 drain.py --host {LEADER_IP}"]
    assert plan.resolve_command(command, {}) is None  # fails, as the lookup would
    assert plan.resolve_command(["true"], {}) == ["true"]


def test_the_worker_script_runs_as_written_with_the_leaders_ip_and_the_loopback_interface() -> None:
    container = gb.build_group_statefulset(GROUP)["spec"]["template"]["spec"]["containers"][0]
    argv = plan.container_argv(container, "vllm", {})
    env = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "VLLM_HOST_IP": WORKER_IP}
    launch = plan.script_launch(argv, env, plan.pod_dns_records([_member(0, LEADER_IP)], [HEADLESS]))
    assert launch.argv[:3] == argv[:3]  # the shell and the operator's script, unchanged
    master = launch.argv.index("--master-addr")
    assert launch.argv[master + 1] == LEADER_IP
    assert [a for i, a in enumerate(launch.argv) if i != master + 1] == [
        a for i, a in enumerate(argv) if i != master + 1]
    assert launch.env == {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", "VLLM_HOST_IP": WORKER_IP}
    assert f"{LEADER_NAME} -> {LEADER_IP} (the sandbox has no cluster DNS)" in launch.notes
    assert any(n.startswith("NCCL_SOCKET_IFNAME eth0 -> lo") for n in launch.notes)
    assert launch.names[LEADER_NAME] == LEADER_IP


def _serve(rank: int) -> list[str]:
    """What the operator's mp script execs for `rank` (the `vllm` argv after the leader's name is resolved)."""
    args = [a if a != LEADER_NAME else LEADER_IP for a in gb.group_args(GROUP)]
    return ["serve", *args, "--node-rank", str(rank), *(["--headless"] if rank else [])]


def test_the_simulator_leader_waits_for_its_members_and_the_worker_joins_it() -> None:
    image = plan.ImageVllm("simulator", WORKER_IP, "/venv/bin/argosy-vllm-sim")
    worker = plan.image_vllm_exec(_serve(1), image)
    assert worker.args[0] == "/venv/bin/argosy-vllm-sim"
    assert worker.args[-3:] == ["--headless", "--leader", f"{LEADER_IP}:29500"]
    assert worker.args[1:3] == ["--host", WORKER_IP]
    leader = plan.image_vllm_exec(_serve(0), plan.ImageVllm("simulator", LEADER_IP, "/venv/bin/argosy-vllm-sim"))
    assert leader.args[1:] == ["--host", LEADER_IP, "--port", "8000", "--model", "llama-405b",
                               "--max-model-len", "4096", "--group-size", "2", "--group-port", "29500"]
    with pytest.raises(plan.ContainerConfigError, match="vllm serve"):
        plan.image_vllm_exec(["--version"], image)


def test_real_vllm_runs_the_members_own_arguments_keeping_the_groups_layout() -> None:
    image = plan.ImageVllm("real", WORKER_IP, "/sim", "/models/standin", RUNTIME)
    served = plan.image_vllm_exec(_serve(1), image)
    serve = _serve(1)
    assert served.args[:4] == [*RUNTIME, "serve"]
    assert served.args[4] == "/models/standin"
    # Everything after the model as the script passed it (pipeline 2 across the two members kept), and the
    # server bound to the pod IP.
    assert served.args[5:] == [*serve[2:], "--host", WORKER_IP]
    assert ("--pipeline-parallel-size", "2") in zip(served.args, served.args[1:], strict=False)
    assert served.args[-3:] == ["--headless", "--host", WORKER_IP]
    # Anything but `serve` is the runtime's own CLI.
    assert plan.image_vllm_exec(["--version"], image).args == [*RUNTIME, "--version"]


def test_a_single_pod_server_still_runs_with_one_process() -> None:
    args = ["m", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]
    assert plan.vllm_serve_args(args, LEADER_IP, "/standin").args[1:5] == [
        "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1"]
    assert plan.is_group_member(["m", "--nnodes", "2"]) and not plan.is_group_member(["m", "--nnodes", "1"])


def test_the_image_programs_and_their_settings() -> None:
    tools = plan.image_tools("/cache/runtime/bin/python", "/venv/bin/python")
    assert sorted(tools) == sorted(plan.IMAGE_TOOLS)
    assert tools["vllm"] == '#!/bin/sh\nexec /venv/bin/python -m argosy_sandbox.image_vllm "$@"\n'
    assert tools["python3"] == '#!/bin/sh\nexec /cache/runtime/bin/python "$@"\n'
    image = plan.ImageVllm("real", WORKER_IP, "/sim", "/models/standin", RUNTIME)
    assert plan.ImageVllm.from_env(image.env()) == image
    with pytest.raises(plan.ContainerConfigError, match="only inside a sandbox pod"):
        plan.ImageVllm.from_env({})
