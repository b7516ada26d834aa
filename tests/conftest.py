"""Shared fixtures: the Kubernetes sandbox for end-to-end tests, one real vLLM server.

The sandbox is brought up once per session, or reused when it already runs (a
warm start takes seconds), and left running afterwards so the next run is fast;
`make sandbox-down` stops it (CI does so at the end of .ci/run). Each test gets a
fresh namespace, deleted when it ends.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.real_vllm import RealVllm, VllmServer, attach


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    instance = Sandbox(report=lambda message: None)
    if not instance.is_up():
        instance.up()
    return instance


@pytest.fixture(scope="session")
def kubeconfig(sandbox: Sandbox) -> Path:
    return sandbox.kubeconfig


@pytest.fixture(scope="session")
def crd(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The LLMDeployment CRD, installed once per session for tests that create LLMDeployments."""
    # Rendered from the models under test, which is what manifests/crds/ holds when it is
    # current (a unit test fails when the committed copy is stale).
    from argosy_operator import crd as crdgen

    path = tmp_path_factory.mktemp("crd") / "argosy.dev_llmdeployments.yaml"
    path.write_text(crdgen.render_manifest())
    sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    sandbox.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.argosy.dev", "--timeout=60s")


@pytest.fixture
def namespace(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    sandbox.kubectl("create", "namespace", name)
    # Wait for the service account controller, so pods can be created straight away.
    for _ in range(100):
        if sandbox.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0:
            break
        time.sleep(0.1)
    yield name
    sandbox.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def real_vllm() -> Iterator[RealVllm]:
    """One real vLLM (its CPU build serving the stand-in model) for the whole session, on 127.0.0.N.

    `.base_url`, `.openai_base_url`, `.model` (the served name), `.max_model_len`. Startup takes
    a minute or more, so tests share this one. ARGOSY_REAL_VLLM_URL=http://host:port uses a server
    that is already running instead (while working on these tests).
    """
    running = os.environ.get("ARGOSY_REAL_VLLM_URL")
    if running:
        yield attach(running)
        return
    with VllmServer(report=lambda message: None) as server:
        yield server.info
