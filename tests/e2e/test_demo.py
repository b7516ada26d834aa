"""`make demo` works: the chart installs, two models are placed, and a chat completion comes back."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from argosy_sandbox.cluster import Sandbox

pytestmark = pytest.mark.e2e


def test_demo_answers_a_chat_completion_through_the_gateway(sandbox: Sandbox) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "argosy_sandbox.demo"], capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout
        for number in range(1, 8):
            assert f"[{number}/7]" in output
        answer = re.search(r"model 'llama-8b' answered from pod (llama-8b-\S+) \((127\.[\d.]+):8000\)", output)
        assert answer, output
        # The pod named in the answer is the one serving at that IP.
        pod_ip = sandbox.kubectl("get", "pod", answer.group(1), "-n", "argosy-demo",
                                 "-o", "jsonpath={.status.podIP}").stdout
        assert pod_ip == answer.group(2)
        assert "Simulated reply from llama-8b" in output
        assert "PP=1 on NVIDIA-" in output
    finally:
        subprocess.run([sys.executable, "-m", "argosy_sandbox.demo", "stop"], capture_output=True, check=False)
    assert not list(sandbox.run_dir.glob("demo-*.pid"))
