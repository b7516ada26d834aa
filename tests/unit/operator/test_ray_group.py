"""The `ray` executor's generated commands, run with real Ray on this machine.

What a pod runner would do, done here by the test: each "pod" is the StatefulSet
container's command and args as built, run by /bin/sh with the pod's environment (its
rank from the pod-index label, VLLM_HOST_IP its own 127.0.0.x address) and the leader's
DNS name replaced by the leader's IP (there is no cluster DNS here, as in the sandbox).
Two things are not the real thing: the GPUs (declared with the command's own
`--num-gpus`) and `vllm` itself, because vLLM's CPU build refuses the Ray executor. In
its place a stand-in `vllm` asks Ray for what vLLM asks it for, one {GPU: 1} bundle per
rank in a placement group, and records whether that group became ready and where.

Each test has its own Ray temp dir (a short one: Ray's socket paths must fit 107
characters) and free ports, and stops only the processes it started: every process
carries a marker variable in its environment, and cleanup signals those PIDs alone
(never `ray stop`, which would stop every engineer's Ray on the machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argosy_operator import group_builders as gb
from argosy_operator.builders import ServerInputs
from argosy_sandbox.cluster import free_port

SERVER = ServerInputs(
    name="tiny",
    namespace="team-a",
    owner_uid="uid-1",
    model_uri="hf://org/tiny",
    served_model_names=("tiny",),
    replicas=1,
    image="vllm/vllm-openai:v0.32.0",
    tensor_parallel_size=2,
    pipeline_parallel_size=2,
    max_model_len=1024,
    gpu_memory_utilization=0.9,
    pods_per_replica=2,
)

STAND_IN_VLLM = """\
#!{python}
# Stand-in for `vllm serve ... --distributed-executor-backend ray`: ask Ray for vLLM's placement group.
import json, logging, os, sys
import ray
from ray.util.placement_group import placement_group, placement_group_table

args = sys.argv[1:]
ranks = int(args[args.index("--tensor-parallel-size") + 1]) * int(args[args.index("--pipeline-parallel-size") + 1])
ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address=os.environ["VLLM_HOST_IP"],
         logging_level=logging.ERROR, log_to_driver=False)
group = placement_group([{{"GPU": 1.0}}] * ranks, strategy="PACK")
ready = True
try:
    ray.get(group.ready(), timeout=120)
except Exception:
    ready = False
nodes = sorted(set(placement_group_table(group)["bundles_to_node_id"].values())) if ready else []
with open(os.environ["RECORD"], "w") as out:
    json.dump({{"argv": args, "bundles": ranks, "ready": ready, "nodes": len(nodes)}}, out)
ray.shutdown()
"""


@dataclasses.dataclass
class PodRunner:
    """Runs a group's members as local processes and cleans up only what it started."""

    root: Path
    marker: str
    bin_dir: Path
    record: Path
    processes: list[subprocess.Popen[str]] = dataclasses.field(default_factory=list)

    def start(self, container: dict[str, Any], inputs: gb.GroupInputs, rank: int, ip: str, leader_ip: str,
              agent_port: int) -> subprocess.Popen[str]:
        argv = [part.replace(inputs.leader_address, leader_ip) for part in (*container["command"],
                                                                             *container["args"])]
        env = {
            "PATH": f"{self.bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.root),
            "RAY_TMPDIR": str(self.root),
            "RAY_USAGE_STATS_ENABLED": "0",
            "ARGOSY_NODE_RANK": str(rank),
            "VLLM_HOST_IP": ip,
            "ARGOSY_RAY_AGENT_PORT": str(agent_port),
            "ARGOSY_TEST_MARKER": self.marker,
            "RECORD": str(self.record),
        }
        log = open(self.root / f"pod-{rank}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def log(self, rank: int) -> str:
        return (self.root / f"pod-{rank}.log").read_text(errors="replace")

    def own_pids(self) -> list[int]:
        """Every live process whose environment carries this runner's marker (Ray's daemons included)."""
        needle = f"ARGOSY_TEST_MARKER={self.marker}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.own_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.own_pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        leftover = self.own_pids()
        assert not leftover, f"processes left running: {leftover}"


@pytest.fixture
def runner() -> Iterator[PodRunner]:
    root = Path(tempfile.mkdtemp(prefix="ar-", dir="/tmp"))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(STAND_IN_VLLM.format(python=sys.executable))
    vllm.chmod(0o755)
    pod_runner = PodRunner(root=root, marker=uuid.uuid4().hex, bin_dir=bin_dir, record=root / "vllm.json")
    try:
        yield pod_runner
    finally:
        pod_runner.stop()
        shutil.rmtree(root, ignore_errors=True)


def _group(timeout: int) -> tuple[gb.GroupInputs, dict[str, Any]]:
    used: set[int] = set()

    def port() -> int:
        chosen = free_port(exclude=used)
        used.add(chosen)
        return chosen

    inputs = gb.GroupInputs(
        server=SERVER,
        index=0,
        executor="ray",
        ray_ports=gb.RayPorts(gcs=port(), dashboard_agent=port()),
        ray_wait_timeout_seconds=timeout,
    )
    container = gb.build_group_statefulset(inputs)["spec"]["template"]["spec"]["containers"][0]
    return inputs, container


def _addresses() -> tuple[str, str]:
    subnet = random.randint(100, 250)
    return f"127.0.{subnet}.2", f"127.0.{subnet}.3"


def test_the_leader_waits_for_every_gpu_and_vllms_placement_group_becomes_ready(runner: PodRunner) -> None:
    inputs, container = _group(timeout=240)
    leader_ip, worker_ip = _addresses()
    leader = runner.start(container, inputs, 0, leader_ip, leader_ip, free_port())
    worker = runner.start(container, inputs, 1, worker_ip, leader_ip, free_port())
    try:
        leader.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the leader did not finish in 420 s:\n{runner.log(0)}\n--- worker:\n{runner.log(1)}")
    assert leader.returncode == 0, f"leader:\n{runner.log(0)}\n--- worker:\n{runner.log(1)}"
    assert "argosy ray-wait: ready: 4 GPUs on 2 nodes" in runner.log(0)
    result = json.loads(runner.record.read_text())
    assert result["ready"] is True and result["bundles"] == 4
    assert result["nodes"] == 2  # 2 GPUs per node: the 4 ranks need both pods
    assert result["argv"][-2:] == ["--distributed-executor-backend", "ray"]
    assert worker.poll() is None, f"the worker left its Ray node:\n{runner.log(1)}"  # --block keeps it serving


def test_without_the_worker_the_wait_step_times_out_and_names_what_is_missing(runner: PodRunner) -> None:
    inputs, container = _group(timeout=20)
    leader_ip, _ = _addresses()
    leader = runner.start(container, inputs, 0, leader_ip, leader_ip, free_port())
    try:
        leader.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the leader did not give up in 300 s:\n{runner.log(0)}")
    log = runner.log(0)
    assert leader.returncode != 0
    assert (
        "argosy ray-wait: timed out after 20 s: the Ray cluster has 2 of 4 GPUs on 1 of 2 nodes; "
        "missing 1 node(s) and 2 GPU(s) (workers not joined: tiny-g0-1.tiny-g0.team-a.svc)"
    ) in log, log
    assert f"nodes present: {leader_ip} (2 GPUs)" in log
    assert not runner.record.exists(), "vllm must not start on an incomplete cluster"
