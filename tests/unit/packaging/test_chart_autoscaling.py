"""The chart wires autoscaling: the operator finds the gateways' /metrics, the gateway gets its
scale-from-zero bounds, NetworkPolicies let the operator read the metrics it scales on."""

from __future__ import annotations

from typing import Any


def _env(objects: list[dict[str, Any]], component: str) -> dict[str, str]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"
                     and o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container.get("env", ())}


def _pod_labels(objects: list[dict[str, Any]], component: str) -> dict[str, str]:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"
                     and o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_operator_reads_the_gateways_it_was_installed_with(render) -> None:
    objects = render({"operator": {"autoscaler": {"intervalSeconds": 5}}, "gateway": {"port": 8123}})
    env = _env(objects, "operator")
    assert env["ARGOSY_OPERATOR_AUTOSCALER_INTERVAL_SECONDS"] == "5"
    selector = dict(term.split("=", 1) for term in env["ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_SELECTOR"].split(","))
    assert selector.items() <= _pod_labels(objects, "gateway").items()
    assert env["ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_NAMESPACE"] == "argosy-system"
    assert env["ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_PORT"] == "8123"
    off = _env(render({"operator": {"autoscaler": {"readGatewayMetrics": False}}}), "operator")
    assert "ARGOSY_OPERATOR_AUTOSCALER_GATEWAY_SELECTOR" not in off


def test_the_gateway_gets_its_scale_from_zero_bounds(render) -> None:
    env = _env(render({"gateway": {"scaleFromZero": {"timeoutSeconds": 900, "queueLength": 32}}}), "gateway")
    assert env["ARGOSY_GATEWAY_WAKE_TIMEOUT_SECONDS"] == "900"
    assert env["ARGOSY_GATEWAY_WAKE_QUEUE_LENGTH"] == "32"


def test_network_policies_let_the_operator_read_serving_pods_and_gateways(render) -> None:
    objects = render({
        "watchNamespaces": ["team-a"],
        "networkPolicy": {"enabled": True, "gatewayFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
    })
    operator_labels = _pod_labels(objects, "operator")
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}

    def admits_operator(policy: dict[str, Any]) -> bool:
        peers = [p for rule in policy["spec"]["ingress"] for p in rule.get("from", ())]
        return any(p.get("podSelector", {}).get("matchLabels", {}).items() <= operator_labels.items()
                   and "podSelector" in p for p in peers)

    assert admits_operator(policies["argosy-serving"])
    assert admits_operator(policies["argosy-gateway"])
