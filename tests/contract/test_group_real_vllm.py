"""A two-pod group's generated `mp` commands run real vLLM (its CPU build) across two loopback "nodes".

What a kubelet would do, done here: each member runs its StatefulSet container's command and
args as built, with its environment resolved (VLLM_HOST_IP its own 127.0.x.y address, the rank
from the pod-index label), the leader's DNS name replaced by the leader's IP (no cluster DNS
here, as in the sandbox), the PVC mount path pointing at the stand-in model, and the server
bound to the pod's IP (what the sandbox's kubelet does: pods share this machine's ports). NCCL
and Gloo use the loopback interface through engine.env, the override docs/operator.md names.

The placement is tensor 2 across the two members (pipeline 1): vLLM 0.32's CPU build starts a
two-node pipeline but fails its first request in the second stage (an assertion in
sync_and_gather_intermediate_tensors), so pipeline parallelism across nodes is exercised on
GPUs only. One start takes about four minutes on the 2-core machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from argosy_operator import group_builders as gb
from argosy_operator.builders import MODEL_MOUNT_PATH, ServerInputs
from argosy_sandbox import real_vllm, vllm_runtime
from argosy_sandbox.cluster import free_port

pytestmark = pytest.mark.timeout(900)

SERVER = ServerInputs(
    name="tiny",
    namespace="team-a",
    owner_uid="uid-1",
    model_uri="pvc://models/standin",
    served_model_names=("tiny",),
    replicas=1,
    image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=2,
    pipeline_parallel_size=1,
    max_model_len=512,
    gpu_memory_utilization=0.9,
    enforce_eager=True,
    env=({"name": "NCCL_SOCKET_IFNAME", "value": "lo"}, {"name": "GLOO_SOCKET_IFNAME", "value": "lo"}),
    pods_per_replica=2,
)
STARTUP_TIMEOUT_S = 600


def _resolve_env(container: dict[str, Any], pod_ip: str, rank: int) -> dict[str, str]:
    fields = {"status.podIP": pod_ip, f"metadata.labels['{gb.POD_INDEX_LABEL}']": str(rank)}
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class Member:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[tuple[str, list[Member], dict[str, Any], dict[str, str]]]:
    vllm_runtime.ensure_runtime(lambda message: None)
    model = real_vllm.ensure_model(lambda message: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "vllm"  # the image's `vllm` CLI
    launcher.write_text("#!/bin/sh\nexec " + " ".join(vllm_runtime.vllm_command()) + ' "$@"\n')
    launcher.chmod(0o755)
    inputs = gb.GroupInputs(server=SERVER, index=0, executor="mp", master_port=free_port())
    container = gb.build_group_statefulset(inputs)["spec"]["template"]["spec"]["containers"][0]
    subnet = random.randint(100, 250)
    leader_ip, worker_ip = f"127.0.{subnet}.2", f"127.0.{subnet}.3"
    members = []
    worker_env: dict[str, str] = {}
    for rank, ip in ((0, leader_ip), (1, worker_ip)):
        argv = [part.replace(inputs.leader_address, leader_ip).replace(f"{MODEL_MOUNT_PATH}/standin", str(model))
                for part in (*container["command"], *container["args"])]
        argv += ["--host", ip]
        env = {**os.environ, **vllm_runtime.runtime_env(1), **_resolve_env(container, ip, rank),
               "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        if rank:
            worker_env = env
        members.append(Member(argv, env, tmp_path / f"member-{rank}.log"))
    try:
        yield leader_ip, members, container, worker_env
    finally:
        for member in members:
            member.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_a_tensor_parallel_group_of_two_members_serves_through_its_leader(
    group: tuple[str, list[Member], dict[str, Any], dict[str, str]],
) -> None:
    leader_ip, members, container, worker_env = group
    leader, worker = members
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(f"http://{leader_ip}:8000/health"):
        for member in members:
            assert member.process.poll() is None, f"{member.log.name} exited:\n{member.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no /health in {STARTUP_TIMEOUT_S} s:\n{leader.log.read_text()[-3000:]}"
        time.sleep(2)
    worker_log = worker.log.read_text(errors="replace")
    assert "--headless" in " ".join(worker.process.args)  # type: ignore[arg-type]
    assert "APIServer" not in worker_log  # a headless member runs no API server

    client = openai.OpenAI(base_url=f"http://{leader_ip}:8000/v1", api_key="unused", max_retries=0, timeout=120)
    with client:
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip(), "the group answered with nothing"

    # The worker's readiness probe, run as the kubelet would: it is connected to the leader.
    probe = container["readinessProbe"]["exec"]["command"]
    assert subprocess.run(probe, env=worker_env, capture_output=True, timeout=30).returncode == 0
