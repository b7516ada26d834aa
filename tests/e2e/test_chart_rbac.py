"""Least privilege, asked of the API server itself: `kubectl auth can-i --as=<service account>`
for the operator and the gateway, installed cluster-wide and restricted to two namespaces."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from argosy_sandbox.build import helm_binary as _helm_binary
from argosy_sandbox.cluster import Sandbox

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "argosy"
LLD = "llmdeployments.argosy.dev"




def _install(sandbox: Sandbox, namespace: str, *values: str) -> Iterator[str]:
    binary = _helm_binary()
    release = f"argosy-{secrets.token_hex(3)}"
    helm = [str(binary), f"--kubeconfig={sandbox.kubeconfig}"]
    # The CRD is not what these tests are about, and leaving it out keeps them independent
    # of whichever release owns it in the shared sandbox.
    install = subprocess.run(
        [*helm, "install", release, str(CHART), "--namespace", namespace, "--set", "crds.enabled=false", *values],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stderr
    try:
        yield release
    finally:
        subprocess.run(
            [*helm, "uninstall", release, "--namespace", namespace], capture_output=True, text=True, timeout=180
        )


@pytest.fixture
def cluster_wide(sandbox: Sandbox, namespace: str) -> Iterator[str]:
    yield from _install(sandbox, namespace)


@pytest.fixture
def scoped(sandbox: Sandbox, namespace: str) -> Iterator[tuple[str, list[str], str]]:
    """A release watching two fresh namespaces, and a third namespace outside its scope."""
    suffix = secrets.token_hex(3)
    watched = [f"rbac-a-{suffix}", f"rbac-b-{suffix}"]
    outside = f"rbac-out-{suffix}"
    for name in (*watched, outside):
        sandbox.kubectl("create", "namespace", name)
    try:
        for release in _install(sandbox, namespace, "--set", f"watchNamespaces={{{','.join(watched)}}}"):
            yield release, watched, outside
    finally:
        for name in (*watched, outside):
            sandbox.kubectl("delete", "namespace", name, "--wait=false", check=False)


def can(
    sandbox: Sandbox,
    account: str,
    verb: str,
    resource: str,
    namespace: str | None = None,
    subresource: str | None = None,
) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={account}"]
    args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = sandbox.kubectl(*args, check=False)
    answer = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert answer in {"yes", "no"}, result.stderr
    return answer == "yes"


def _accounts(namespace: str, release: str) -> tuple[str, str]:
    prefix = f"system:serviceaccount:{namespace}"
    return f"{prefix}:{release}-operator", f"{prefix}:{release}-gateway"


def test_cluster_wide_operator_and_gateway_can_do_their_jobs_and_no_more(sandbox, namespace, cluster_wide):
    operator, gateway = _accounts(namespace, cluster_wide)
    elsewhere = "default"

    # The operator: GPU inventory, its custom resources, the serving workloads, events.
    for verb, resource, sub in [
        ("list", "nodes", None),
        ("watch", "nodes", None),
        ("get", LLD, None),
        ("watch", LLD, None),
        ("patch", LLD, "status"),
        ("patch", LLD, "scale"),  # the autoscaler (spec.autoscaling)
        ("create", "deployments.apps", None),
        ("patch", "deployments.apps", None),
        ("delete", "deployments.apps", None),
        ("patch", "services", None),
        ("watch", "pods", None),
        ("delete", "pods", None),  # restarts a multi-node group whose member failed
        ("get", "configmaps", None),  # a chatTemplate's configMapKeyRef
        ("patch", "configmaps", None),  # the ConfigMap holding an inline chatTemplate
        ("create", "events", None),
        # The backend keys it owns; RBAC cannot narrow this to their label (docs/operations.md).
        ("watch", "secrets", None),
        ("create", "secrets", None),
        ("patch", "secrets", None),
    ]:
        assert can(sandbox, operator, verb, resource, elsewhere, sub), f"operator cannot {verb} {resource}"
    # Leader election: its own Lease in the release namespace, no other Lease anywhere.
    assert can(sandbox, operator, "get", f"leases.coordination.k8s.io/{cluster_wide}-operator", namespace)
    assert can(sandbox, operator, "update", f"leases.coordination.k8s.io/{cluster_wide}-operator", namespace)
    assert can(sandbox, operator, "create", "leases.coordination.k8s.io", namespace)
    assert not can(sandbox, operator, "update", "leases.coordination.k8s.io/kube-scheduler", namespace)
    assert not can(sandbox, operator, "update", "leases.coordination.k8s.io/kube-scheduler", "kube-system")
    assert not can(sandbox, operator, "create", "leases.coordination.k8s.io", elsewhere)
    for verb, resource, ns in [
        ("update", "secrets", elsewhere),  # only merge patches of its own keys
        ("patch", "nodes", None),
        ("delete", "nodes", None),
        ("update", "nodes", None),
        ("create", "pods", elsewhere),
        ("delete", LLD, elsewhere),
        ("create", LLD, elsewhere),
        ("patch", LLD, elsewhere),  # the spec is the user's: the operator writes only status
        ("update", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("create", "clusterroles.rbac.authorization.k8s.io", None),
        ("create", "rolebindings.rbac.authorization.k8s.io", elsewhere),
        ("impersonate", "serviceaccounts", elsewhere),
    ]:
        assert not can(sandbox, operator, verb, resource, ns), f"operator can {verb} {resource}"
    for verb, resource, sub in [
        ("create", "pods", "exec"),
        ("create", "serviceaccounts", "token"),
        ("patch", "nodes", "status"),
    ]:
        assert not can(sandbox, operator, verb, resource, elsewhere, sub), f"operator can {verb} {resource}/{sub}"

    # The gateway reads LLMDeployments and Pods; its one write wakes a model (scale from zero).
    for verb, resource in [("get", LLD), ("list", LLD), ("watch", LLD), ("list", "pods"), ("watch", "pods"),
                           ("list", "secrets"), ("watch", "secrets")]:  # the backend keys, by label selector
        assert can(sandbox, gateway, verb, resource, elsewhere), f"gateway cannot {verb} {resource}"
    assert can(sandbox, gateway, "patch", LLD, elsewhere, "scale"), "gateway cannot wake a model"
    for verb, resource, ns in [
        ("get", "secrets", namespace),  # list/watch with a selector, never a Secret by name
        ("create", "secrets", elsewhere),
        ("patch", LLD, elsewhere),
        ("create", "pods", elsewhere),
        ("delete", "pods", elsewhere),
        ("list", "nodes", None),
        ("create", "deployments.apps", elsewhere),
        ("create", "events", elsewhere),
    ]:
        assert not can(sandbox, gateway, verb, resource, ns), f"gateway can {verb} {resource}"
    for verb, resource, sub in [("get", "pods", "log"), ("create", "pods", "exec"), ("patch", LLD, "status"),
                                ("update", LLD, "scale"), ("get", LLD, "scale")]:
        assert not can(sandbox, gateway, verb, resource, elsewhere, sub), f"gateway can {verb} {resource}/{sub}"


def test_scoped_install_acts_only_in_watched_namespaces(sandbox, namespace, scoped):
    release, watched, outside = scoped
    operator, gateway = _accounts(namespace, release)

    for ns in watched:
        assert can(sandbox, operator, "watch", LLD, ns)
        assert can(sandbox, operator, "patch", LLD, ns, "status")
        assert can(sandbox, operator, "create", "deployments.apps", ns)
        assert can(sandbox, operator, "delete", "services", ns)
        assert can(sandbox, gateway, "watch", LLD, ns)
        assert can(sandbox, gateway, "list", "pods", ns)
        assert can(sandbox, gateway, "patch", LLD, ns, "scale")
        assert can(sandbox, operator, "patch", LLD, ns, "scale")
        assert can(sandbox, operator, "create", "secrets", ns)  # its backend keys
        assert can(sandbox, gateway, "watch", "secrets", ns)
        assert not can(sandbox, gateway, "get", "secrets", ns)
    # The GPU inventory is cluster-scoped and read-only.
    assert can(sandbox, operator, "list", "nodes")
    assert not can(sandbox, operator, "patch", "nodes")
    # Outside the watched namespaces, nothing.
    for ns in (outside, namespace, None):
        assert not can(sandbox, operator, "list", LLD, ns)
        assert not can(sandbox, operator, "create", "deployments.apps", ns)
        assert not can(sandbox, operator, "create", "events", ns)
        assert not can(sandbox, gateway, "list", LLD, ns)
        assert not can(sandbox, gateway, "list", "pods", ns)
        assert not can(sandbox, gateway, "list", "secrets", ns)
        assert not can(sandbox, operator, "list", "secrets", ns)
        assert not can(sandbox, gateway, "patch", LLD, ns, "scale")
