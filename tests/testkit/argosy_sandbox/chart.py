"""The Argosy chart in the sandbox: helm install, and the pods it makes as the pod runner runs them.

Shared by `make demo` and the end-to-end tests, so both install and inspect the release the same way.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import build
from .cluster import Sandbox
from .paths import REPO_ROOT

CHART = REPO_ROOT / "charts" / "argosy"
GATEWAY_PORT = 8000  # the chart's gateway.port


def helm(sandbox: Sandbox, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(build.helm_binary()), f"--kubeconfig={sandbox.kubeconfig}", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args[:2])} failed:\n{result.stdout}{result.stderr}")
    return result


def install(sandbox: Sandbox, release: str, namespace: str, *values: str, wait: str = "180s") -> str:
    """``helm upgrade --install`` of charts/argosy; with ``--wait``, done only when the chart's pods are Ready
    through their own probes (the pod runner runs them). Returns helm's output."""
    result = helm(
        sandbox, "upgrade", "--install", release, str(CHART), "--namespace", namespace, "--create-namespace",
        # The CRD may already exist from `kubectl apply -f manifests/crds` or another release.
        "--take-ownership", "--force-conflicts", "--wait", "--timeout", wait, *values,
    )
    return result.stdout


def pods(sandbox: Sandbox, namespace: str, selector: str) -> list[dict[str, Any]]:
    listing = sandbox.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    return list(json.loads(listing.stdout)["items"])


def component_pod(sandbox: Sandbox, namespace: str, release: str, component: str) -> dict[str, Any] | None:
    """The release's operator or gateway pod that is not being deleted."""
    found = pods(sandbox, namespace, f"app.kubernetes.io/instance={release},app.kubernetes.io/component={component}")
    live = [pod for pod in found if not pod["metadata"].get("deletionTimestamp")]
    return live[0] if live else None


def is_ready(pod: dict[str, Any] | None) -> bool:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_dir(sandbox: Sandbox, pod: dict[str, Any]) -> Path:
    """Where the pod runner keeps a pod's files: its ServiceAccount kubeconfig, container logs."""
    metadata = pod["metadata"]
    return sandbox.state / "pods" / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid']}"


def container_pid(pod: dict[str, Any], container: str | None = None) -> int | None:
    """The process the pod runner runs for a container (from its containerID, sandbox://<pid>)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if container in (None, status["name"]) and str(status.get("containerID", "")).startswith("sandbox://"):
            return int(status["containerID"].removeprefix("sandbox://"))
    return None


def http_status(url: str) -> int:
    """The status of a GET of `url`; 0 when nothing answers (a pod's server not listening)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def cmdline(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


CRD_NAME = "llmdeployments.argosy.dev"


def ensure_crd(sandbox: Sandbox) -> None:
    """The LLMDeployment CRD from the chart, for releases installed with crds.enabled=false."""
    if sandbox.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0:
        return
    crd = helm(sandbox, "template", "argosy", str(CHART), "--show-only", "templates/crds/llmdeployments.yaml")
    sandbox.kubectl("create", "-f", "-", input=crd.stdout)
    sandbox.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")


def program_args(argv: list[str], program: str) -> list[str] | None:
    """The arguments after ``program`` in a command line (a console script runs as ``python <script> ...``)."""
    for index, part in enumerate(argv[:2]):
        if Path(part).name == program:
            return argv[index + 1:]
    return None
