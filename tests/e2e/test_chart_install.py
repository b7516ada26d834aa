"""charts/argosy against the sandbox's kube-apiserver: server-side dry runs of every values
file, then install, upgrade and uninstall of a real release.

The sandbox is shared: releases get unique names (their ClusterRoles are cluster-scoped),
installs pass --take-ownership (with --force-conflicts: the ownership annotations may have been
written by another field manager) because the LLMDeployment CRD may already belong to another
release or a `kubectl apply`, and no test uninstalls with crds.keep=false (deleting the
CRD would delete every LLMDeployment in the cluster).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from argosy_sandbox.build import helm_binary as _helm_binary
from argosy_sandbox.cluster import Sandbox

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "argosy"
CRD_NAME = "llmdeployments.argosy.dev"
LLMDEPLOYMENT_API = "argosy.dev/v1alpha1/LLMDeployment"

# Minimal stand-ins for the Gateway API and Prometheus Operator CRDs, so the objects the chart
# renders for them can be checked by the API server. Their schemas list the upstream fields the
# chart uses and nothing more, so a misspelled field is refused by strict field validation.
_STANDIN_CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: httproutes.gateway.networking.k8s.io
  labels: {argosy.dev/test-standin: "true"}
  # *.k8s.io groups are protected; "unapproved" is the API server's accepted marker for tests.
  annotations: {api-approved.kubernetes.io: "unapproved, argosy test stand-in"}
spec:
  group: gateway.networking.k8s.io
  names: {kind: HTTPRoute, plural: httproutes, listKind: HTTPRouteList, singular: httproute}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                parentRefs:
                  type: array
                  items:
                    type: object
                    required: [name]
                    properties:
                      group: {type: string}
                      kind: {type: string}
                      namespace: {type: string}
                      name: {type: string}
                      sectionName: {type: string}
                      port: {type: integer}
                hostnames: {type: array, items: {type: string}}
                rules:
                  type: array
                  items:
                    type: object
                    properties:
                      matches:
                        type: array
                        items:
                          type: object
                          properties:
                            path:
                              type: object
                              properties:
                                type: {type: string, enum: [Exact, PathPrefix, RegularExpression]}
                                value: {type: string}
                      backendRefs:
                        type: array
                        items:
                          type: object
                          required: [name]
                          properties:
                            group: {type: string}
                            kind: {type: string}
                            name: {type: string}
                            namespace: {type: string}
                            port: {type: integer}
                            weight: {type: integer}
                      timeouts:
                        type: object
                        properties:
                          request: {type: string}
                          backendRequest: {type: string}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com, labels: {argosy.dev/test-standin: "true"}}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, plural: servicemonitors, listKind: ServiceMonitorList, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [selector]
              properties:
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                endpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      interval: {type: string}
                      scrapeTimeout: {type: string}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com, labels: {argosy.dev/test-standin: "true"}}
spec:
  group: monitoring.coreos.com
  names: {kind: PodMonitor, plural: podmonitors, listKind: PodMonitorList, singular: podmonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [selector]
              properties:
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                    matchExpressions:
                      type: array
                      items:
                        type: object
                        properties:
                          key: {type: string}
                          operator: {type: string}
                          values: {type: array, items: {type: string}}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                podMetricsEndpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      interval: {type: string}
                      relabelings:
                        type: array
                        items:
                          type: object
                          properties:
                            sourceLabels: {type: array, items: {type: string}}
                            targetLabel: {type: string}
"""




@pytest.fixture(scope="module")
def helm(sandbox: Sandbox):
    binary = _helm_binary()

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binary), f"--kubeconfig={sandbox.kubeconfig}", *args], capture_output=True, text=True, timeout=180
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def cluster_prerequisites(sandbox: Sandbox, helm) -> Iterator[None]:
    """The LLMDeployment CRD (as the chart renders it) and the stand-in monitoring/route CRDs."""
    created: list[str] = []
    if sandbox.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        crd = helm("template", "argosy", str(CHART), "--show-only", "templates/crds/llmdeployments.yaml").stdout
        sandbox.kubectl("create", "-f", "-", input=crd)
    for doc in yaml.safe_load_all(_STANDIN_CRDS):
        name = doc["metadata"]["name"]
        if sandbox.kubectl("get", "crd", name, check=False).returncode != 0:
            sandbox.kubectl("create", "-f", "-", input=json.dumps(doc))
            created.append(name)
    for name in [CRD_NAME, *created]:
        sandbox.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    yield
    for name in created:
        sandbox.kubectl("delete", "crd", name, "--wait=false", check=False)


@pytest.fixture
def extra_namespaces(sandbox: Sandbox) -> Iterator[list[str]]:
    """Namespaces a values file names (watchNamespaces), created for the test and removed after."""
    made: list[str] = []
    yield made
    for name in made:
        sandbox.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _ensure_namespace(sandbox: Sandbox, name: str, made: list[str]) -> None:
    if sandbox.kubectl("get", "namespace", name, check=False).returncode != 0:
        sandbox.kubectl("create", "namespace", name)
        made.append(name)


def _objects(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


VALUES_FILES = ["defaults", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_chart_is_accepted_by_the_api_server(
    values_file, sandbox, helm, namespace, cluster_prerequisites, extra_namespaces
):
    args = [
        "template",
        f"argosy-{secrets.token_hex(3)}",
        str(CHART),
        "--namespace",
        namespace,
        "--api-versions",
        LLMDEPLOYMENT_API,
    ]
    if values_file != "defaults":
        path = CHART / "ci" / values_file
        args += ["--values", str(path)]
        for watched in yaml.safe_load(path.read_text()).get("watchNamespaces", []):
            _ensure_namespace(sandbox, watched, extra_namespaces)
    manifest = helm(*args).stdout
    assert _objects(manifest)
    result = sandbox.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr


def test_install_manifest_is_accepted_by_the_api_server(sandbox, namespace, cluster_prerequisites):
    objects = _objects((REPO_ROOT / "manifests/install/argosy.yaml").read_text())
    assert objects[0]["kind"] == "Namespace"
    # Dry runs create nothing, so aim the namespaced objects at the test's namespace.
    for obj in objects[1:]:
        if obj["metadata"].get("namespace") == "argosy-system":
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
    result = sandbox.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input="\n---\n".join(json.dumps(o) for o in objects[1:]),
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _deployment(sandbox: Sandbox, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(sandbox.kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)


_OWNERSHIP = ("meta.helm.sh/release-name", "meta.helm.sh/release-namespace", "helm.sh/resource-policy")


def _crd_ownership(sandbox: Sandbox) -> tuple[dict[str, str], str | None]:
    metadata = json.loads(sandbox.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)["metadata"]
    annotations = metadata.get("annotations") or {}
    return (
        {k: annotations[k] for k in _OWNERSHIP if k in annotations},
        (metadata.get("labels") or {}).get("app.kubernetes.io/managed-by"),
    )


def _restore_crd_ownership(sandbox: Sandbox, before: tuple[dict[str, str], str | None]) -> None:
    """Give the shared CRD back to whichever release (or none) owned it before this test, so a
    later `helm install argosy` on the same sandbox (make demo) is not refused."""
    annotations, managed_by = before
    sandbox.kubectl(
        "annotate",
        "--overwrite",
        "crd",
        CRD_NAME,
        *[f"{k}={annotations[k]}" if k in annotations else f"{k}-" for k in _OWNERSHIP],
    )
    label = "app.kubernetes.io/managed-by"
    sandbox.kubectl("label", "--overwrite", "crd", CRD_NAME, f"{label}={managed_by}" if managed_by else f"{label}-")


def test_install_upgrade_uninstall(sandbox, helm, namespace, cluster_prerequisites, tmp_path):
    release = f"argosy-{secrets.token_hex(3)}"
    ownership_before = _crd_ownership(sandbox)
    try:
        install = helm(
            "install", release, str(CHART), "--namespace", namespace, "--take-ownership", "--force-conflicts", "--wait",
            "--timeout", "120s"
        )
        assert "STATUS: deployed" in install.stdout
        assert f"port-forward svc/{release}-gateway" in install.stdout  # NOTES name the real Service
        gateway = _deployment(sandbox, namespace, f"{release}-gateway")
        assert gateway["status"]["availableReplicas"] == 2
        assert _deployment(sandbox, namespace, f"{release}-operator")["status"]["availableReplicas"] == 1
        crd = json.loads(sandbox.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert sandbox.kubectl("get", "clusterrole", f"{release}-operator", check=False).returncode == 0

        # Upgrade with changed values: more gateway replicas, another policy, a model.
        values = tmp_path / "upgrade.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "gateway": {"replicas": 3, "routingPolicy": "prefix-affinity"},
                    "models": [
                        {
                            "name": "chart-llama-8b",
                            "spec": {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, "gpu": {"count": 1}},
                        }
                    ],
                }
            )
        )
        upgrade = helm(
            "upgrade",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--values",
            str(values),
            "--wait",
            "--timeout",
            "120s",
        )
        assert "REVISION: 2" in upgrade.stdout
        assert f"{namespace}/chart-llama-8b" in upgrade.stdout
        gateway = _deployment(sandbox, namespace, f"{release}-gateway")
        assert gateway["spec"]["replicas"] == 3 and gateway["status"]["availableReplicas"] == 3
        env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["ARGOSY_GATEWAY_DEFAULT_POLICY"] == "prefix-affinity"
        model = json.loads(sandbox.kubectl("get", "lld", "chart-llama-8b", "-n", namespace, "-o", "json").stdout)
        assert model["spec"]["model"]["uri"] == "hf://meta-llama/Llama-3.1-8B-Instruct"

        # Dropping the model from the values deletes it; the rest stays as configured.
        values.write_text(yaml.safe_dump({"gateway": {"replicas": 3, "routingPolicy": "prefix-affinity"}}))
        helm("upgrade", release, str(CHART), "--namespace", namespace, "--values", str(values))
        assert sandbox.kubectl("get", "lld", "chart-llama-8b", "-n", namespace, check=False).returncode != 0
        assert _deployment(sandbox, namespace, f"{release}-gateway")["spec"]["replicas"] == 3
    finally:
        uninstall = helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", check=False)
    assert uninstall.returncode == 0, uninstall.stderr
    assert CRD_NAME in uninstall.stdout  # Helm reports the resource it kept
    assert sandbox.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0, "the CRD was kept"
    _restore_crd_ownership(sandbox, ownership_before)
    assert sandbox.kubectl("get", "deployment", f"{release}-gateway", "-n", namespace, check=False).returncode != 0
    assert sandbox.kubectl("get", "clusterrole", f"{release}-operator", check=False).returncode != 0
    assert sandbox.kubectl("get", "clusterrolebinding", f"{release}-gateway", check=False).returncode != 0


def test_misspelled_value_is_refused_before_anything_is_created(sandbox, helm, namespace):
    release = f"argosy-{secrets.token_hex(3)}"
    result = helm("install", release, str(CHART), "--namespace", namespace, "--set", "gateway.replica=3", check=False)
    assert result.returncode != 0
    assert "at '/gateway': additional properties 'replica' not allowed" in result.stderr
    assert helm("status", release, "--namespace", namespace, check=False).returncode != 0, "no release was recorded"
    assert sandbox.kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout.strip() == ""
