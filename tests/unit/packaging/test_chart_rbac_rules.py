"""The RBAC the chart grants, read from the rendered objects (the live checks with
`kubectl auth can-i` are in tests/e2e/test_chart_rbac.py)."""

from __future__ import annotations

from typing import Any

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def _rules(objects: list[dict[str, Any]], component: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}", rule)
        for o in objects
        if o["kind"] in {"ClusterRole", "Role"}
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        for rule in o["rules"]
    ]


OFF = {"backendKeys": {"enabled": False}}


def test_no_wildcards_and_no_secrets_without_backend_keys(render):
    for values in (OFF, {**OFF, "watchNamespaces": ["team-a"]}):
        objects = render(values)
        for component in ("operator", "gateway"):
            rules = _rules(objects, component)
            assert rules
            for where, rule in rules:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], where
                assert "*" not in rule["apiGroups"], where
                assert "secrets" not in rule["resources"], where
                if component == "gateway":
                    assert "configmaps" not in rule["resources"], where


def test_nodes_are_read_only_and_the_only_cluster_scope_when_namespaced(render):
    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["argosy-operator-nodes"]
    assert cluster_roles[0]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects if o["kind"] == "Role"}
    assert roles == {(ns, f"argosy-{c}") for ns in ("team-a", "team-b") for c in ("operator", "gateway")} | {
        ("argosy-system", "argosy-operator-gateway-pods"),  # the autoscaler finds the gateways' /metrics
        ("argosy-system", "argosy-operator-leader-election"),
    }
    gateway_pods = next(o for o in objects if o["metadata"]["name"] == "argosy-operator-gateway-pods"
                        and o["kind"] == "Role")
    assert gateway_pods["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "argosy-system"


def test_gateway_reads_and_its_one_write_is_waking_a_model(render):
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        writes = set()
        for _, rule in _rules(render(values), "gateway"):
            verbs = set(rule["verbs"])
            if verbs & WRITE_VERBS:
                writes |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in verbs}
            else:
                assert verbs <= {"get", "list", "watch"}
        # Scale from zero: patch (not update, not get) on the scale subresource only.
        assert writes == {("argosy.dev", "llmdeployments/scale", "patch")}
        resources = {r for _, rule in _rules(render(values), "gateway") for r in rule["resources"]}
        assert resources == {"llmdeployments", "llmdeployments/scale", "pods", "secrets"}
        # The backend keys: list/watch (with a label selector the gateway sends); never get by name.
        secret_verbs = {v for _, rule in _rules(render(values), "gateway") if "secrets" in rule["resources"]
                        for v in rule["verbs"]}
        assert secret_verbs == {"list", "watch"}
        resources = {r for _, rule in _rules(render({**values, **OFF}), "gateway") for r in rule["resources"]}
        assert resources == {"llmdeployments", "llmdeployments/scale", "pods"}


def test_operator_writes_only_its_children_status_and_events(render):
    written = {
        (group, resource)
        for _, rule in _rules(render(), "operator")
        if WRITE_VERBS & set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert written == {
        ("argosy.dev", "llmdeployments/status"),
        ("argosy.dev", "llmdeployments/scale"),
        ("apps", "deployments"),
        ("apps", "statefulsets"),  # replicas that span nodes
        ("", "services"),
        ("", "configmaps"),  # inline chat templates; a referenced one is only read
        ("", "events"),
        ("", "pods"),  # a group's leader label, and restarting a group whose member failed
        ("coordination.k8s.io", "leases"),
        ("", "secrets"),  # the backend keys it owns (backendKeys.enabled)
    }
    pod_verbs = {verb for _, rule in _rules(render(), "operator") if "pods" in rule["resources"]
                 for verb in rule["verbs"]}
    assert pod_verbs & WRITE_VERBS == {"patch", "delete"}  # never create: pods come from their controllers


def test_the_operator_renews_only_its_own_lease_in_the_release_namespace(render):
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        lease_rules = [(where, rule) for where, rule in _rules(render(values), "operator")
                       if "leases" in rule["resources"]]
        assert {where for where, _ in lease_rules} == {"Role/argosy-system/argosy-operator-leader-election"}
        by_verbs = {tuple(rule["verbs"]): rule.get("resourceNames") for _, rule in lease_rules}
        # create cannot name an object that does not exist yet; everything else is limited to one Lease.
        assert by_verbs == {("create",): None, ("get", "update"): ["argosy-operator"]}


def test_secrets_are_readable_by_the_operator_only_when_opted_in(render):
    def secret_rules(objects):
        return [rule for _, rule in _rules(objects, "operator") if "secrets" in rule["resources"]]

    assert not secret_rules(render(OFF))
    opted_in = secret_rules(render({**OFF, "operator": {"readHfTokenSecrets": True}, "watchNamespaces": ["team-a"]}))
    assert opted_in == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    for _, rule in _rules(render({**OFF, "operator": {"readHfTokenSecrets": True}}), "gateway"):
        assert "secrets" not in rule["resources"]
    # Backend keys (the default) need the operator to keep its Secrets.
    assert secret_rules(render()) == [{"apiGroups": [""], "resources": ["secrets"],
                                       "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]


def test_rbac_can_be_left_to_the_cluster_admin(render):
    objects = render({"operator": {"rbac": {"create": False}}, "gateway": {"rbac": {"create": False}}})
    assert not [o for o in objects if o["kind"] in {"ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"}]
