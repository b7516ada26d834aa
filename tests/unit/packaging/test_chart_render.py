"""What `helm install` of charts/argosy would create, checked on `helm template` output."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # sha256("test")


def _pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_lint_strict_passes(run_helm, chart_dir):
    result = run_helm("lint", "--strict", str(chart_dir))
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_values_files_lint_and_render(run_helm, chart_dir):
    files = sorted((chart_dir / "ci").glob("*-values.yaml"))
    assert len(files) >= 3
    for values in files:
        result = run_helm("lint", "--strict", str(chart_dir), "--values", str(values))
        assert result.returncode == 0, f"{values.name}: {result.stdout}{result.stderr}"


def test_defaults_install_crd_operator_and_gateway_only(render, select):
    objects = render()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        {
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",  # the operator's leader-election Lease
            "RoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        }
    )
    assert {d["metadata"]["name"] for d in select(objects, "Deployment")} == {"argosy-operator", "argosy-gateway"}
    assert not select(objects, "LLMDeployment")


def test_every_container_is_locked_down_and_has_no_default_resources(render):
    values = {"gateway": {"apiKeys": {"enabled": True, "keys": [{"name": "a", "sha256": HASH}]}}}
    for objects in (render(), render(values)):
        for pod in _pod_specs(objects):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                assert "resources" not in container, "resources must be unset unless the user sets them"


def test_images_are_pinned_to_the_app_version(render, chart_dir):
    app_version = yaml.safe_load((chart_dir / "Chart.yaml").read_text())["appVersion"]
    images = {c["image"] for pod in _pod_specs(render()) for c in pod["containers"]}
    assert images == {
        f"ghcr.io/argosy-dev/argosy-operator:{app_version}",
        f"ghcr.io/argosy-dev/argosy-gateway:{app_version}",
    }
    digest = "sha256:" + "a" * 64
    pinned = render({"gateway": {"image": {"digest": digest}}})
    gateway = next(d for d in pinned if d["metadata"]["name"] == "argosy-gateway" and d["kind"] == "Deployment")
    assert (
        gateway["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/argosy-dev/argosy-gateway@{digest}"
    )


def test_selectors_carry_no_chart_version(render):
    for obj in render({"gateway": {"podDisruptionBudget": {"enabled": True}}}):
        selector = obj.get("spec", {}).get("selector")
        if isinstance(selector, dict):
            labels = selector.get("matchLabels", selector)
            assert "helm.sh/chart" not in labels, obj["metadata"]["name"]
            assert "app.kubernetes.io/version" not in labels, obj["metadata"]["name"]


def test_crd_is_kept_on_uninstall_only_when_asked(render, select):
    kept = select(render(), "CustomResourceDefinition")[0]
    assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    not_kept = select(render({"crds": {"keep": False}}), "CustomResourceDefinition")[0]
    assert "helm.sh/resource-policy" not in (not_kept["metadata"].get("annotations") or {})
    assert not select(render({"crds": {"enabled": False}}), "CustomResourceDefinition")


def test_operator_arguments_follow_values(render, select):
    objects = render({"watchNamespaces": ["team-a", "team-b"], "operator": {"logLevel": "debug", "metricsPort": 9090}})
    operator = select(objects, "Deployment", "argosy-operator")[0]
    assert operator["spec"]["replicas"] == 1
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "run",
        "--namespace=team-a",
        "--namespace=team-b",
        "--log-level=debug",
        "--metrics-port=9090",
        "--leader-elect",
        "--lease-name=argosy-operator",
    ]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    downward = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert downward == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}


def test_two_operator_replicas_elect_a_leader_and_roll_without_a_gap(render, select):
    operator = select(render({"operator": {"replicas": 2}}), "Deployment", "argosy-operator")[0]
    assert operator["spec"]["replicas"] == 2
    # Safe with a Lease: a new pod stands by until the old one releases it.
    assert operator["spec"]["strategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "--leader-elect" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def test_gateway_settings_reach_the_gateway_environment(render, select):
    objects = render(
        {"watchNamespaces": ["team-a"], "gateway": {"routingPolicy": "prefix-affinity", "port": 8100, "workers": 2}}
    )
    container = select(objects, "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]["containers"][0]
    env = _env(container)
    assert env["ARGOSY_GATEWAY_DISCOVERY"] == "kubernetes"
    assert json.loads(env["ARGOSY_GATEWAY_NAMESPACES"]) == ["team-a"]
    assert env["ARGOSY_GATEWAY_DEFAULT_POLICY"] == "prefix-affinity"
    assert "--port=8100" in container["args"] and "--workers=2" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert (
        json.loads(
            _env(select(render(), "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]["containers"][0])[
                "ARGOSY_GATEWAY_NAMESPACES"
            ]
        )
        == []
    )


def test_gateway_settings_names_exist_in_the_gateway(render, select):
    """Every ARGOSY_GATEWAY_* variable the chart sets is a real gateway setting."""
    import argosy_gateway.settings as settings
    fields = set(settings.GatewaySettings.model_fields)
    values = {"gateway": {"apiKeys": {"enabled": True, "keys": [{"name": "a", "sha256": HASH}]}}}
    container = select(render(values), "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]["containers"][0]
    names = [n for n in _env(container) if n.startswith(settings.ENV_PREFIX)]
    assert names
    for name in names:
        assert name.removeprefix(settings.ENV_PREFIX).lower() in fields, name
    env = _env(container)
    # The values the chart writes are ones the gateway's settings accept.
    parsed = settings.GatewaySettings(
        discovery=env["ARGOSY_GATEWAY_DISCOVERY"],
        namespaces=json.loads(env["ARGOSY_GATEWAY_NAMESPACES"]),
        default_policy=env["ARGOSY_GATEWAY_DEFAULT_POLICY"],
        api_keys_file=env["ARGOSY_GATEWAY_API_KEYS_FILE"],
    )
    assert parsed.discovery == "kubernetes"


def test_api_keys_are_mounted_from_a_secret_of_hashes(render, select):
    values = {
        "gateway": {
            "apiKeys": {
                "enabled": True,
                "keys": [{"name": "team-a", "sha256": HASH, "models": ["llama-8b"], "requestsPerMinute": 600}],
            }
        }
    }
    objects = render(values)
    secret = select(objects, "Secret", "argosy-gateway-api-keys")[0]
    keys_file = secret["stringData"]["keys.yaml"]
    import argosy_gateway.auth as auth
    store = auth.parse_keys_file(keys_file)
    assert store.lookup("test") is not None and store.lookup("test").allows("llama-8b")
    assert store.lookup("wrong") is None
    pod = select(objects, "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "argosy-gateway-api-keys"
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] is True
    assert _env(container)["ARGOSY_GATEWAY_API_KEYS_FILE"] == f"{mount['mountPath']}/keys.yaml"
    # An existing Secret is referenced, not created.
    existing = render({"gateway": {"apiKeys": {"enabled": True, "existingSecret": "my-keys"}}})
    assert not select(existing, "Secret")
    pod = select(existing, "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "my-keys"


def test_optional_gateway_exposure_objects(render, select):
    values = {
        "gateway": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
            },
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "public", "namespace": "gateways"}],
                "hostnames": ["llm.example.com"],
                "requestTimeout": "600s",
            },
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
        },
    }
    objects = render(values)
    ingress = select(objects, "Ingress", "argosy-gateway")[0]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "argosy-gateway", "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    route = select(objects, "HTTPRoute", "argosy-gateway")[0]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    rule = route["spec"]["rules"][0]
    assert rule["backendRefs"] == [{"name": "argosy-gateway", "port": 80}]
    assert rule["timeouts"] == {"request": "600s"}
    hpa = select(objects, "HorizontalPodAutoscaler", "argosy-gateway")[0]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "argosy-gateway"
    # With an HPA the Deployment leaves replicas to it (helm upgrade must not reset them).
    assert "replicas" not in select(objects, "Deployment", "argosy-gateway")[0]["spec"]


def test_monitoring_objects_scrape_the_right_ports(render, select):
    objects = render(
        {
            "watchNamespaces": ["team-a"],
            "monitoring": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True},
            },
        }
    )
    monitors = {m["metadata"]["name"]: m for m in select(objects, "ServiceMonitor")}
    assert set(monitors) == {"argosy-gateway", "argosy-operator"}
    services = {s["metadata"]["name"]: s for s in select(objects, "Service")}
    for name, monitor in monitors.items():
        port = monitor["spec"]["endpoints"][0]["port"]
        target = next(
            s
            for s in services.values()
            if s["spec"]["selector"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
        )
        assert port in {p["name"] for p in target["spec"]["ports"]}, name
        assert monitor["metadata"]["labels"]["release"] == "prom"
    pod_monitor = select(objects, "PodMonitor")[0]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "argosy-operator"}
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    # The serving pods' port name is the one the operator gives vLLM's container.
    import argosy_operator.builders as builders
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == builders.PORT_NAME


def test_network_policies_admit_the_gateway_to_serving_pods(render, select):
    objects = render({"watchNamespaces": ["team-a"], "networkPolicy": {"enabled": True}})
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in select(objects, "NetworkPolicy")}
    assert set(policies) == {
        ("argosy-system", "argosy-gateway"),
        ("argosy-system", "argosy-operator"),
        ("team-a", "argosy-serving"),
    }
    serving = policies[("team-a", "argosy-serving")]["spec"]
    peers = serving["ingress"][0]["from"]
    gateway_pod_labels = select(objects, "Deployment", "argosy-gateway")[0]["spec"]["template"]["metadata"]["labels"]
    gateway_peer = next(p for p in peers if "namespaceSelector" in p)
    assert gateway_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "argosy-system"}
    assert gateway_pod_labels.items() >= gateway_peer["podSelector"]["matchLabels"].items()
    # Nothing may reach the operator unless metrics scrapers are named.
    assert policies[("argosy-system", "argosy-operator")]["spec"]["ingress"] == []


MODELS = {
    "models": [
        {
            "name": "llama-8b",
            "namespace": "team-a",
            "annotations": {"argosy.dev/routing-policy": "prefix-affinity"},
            "spec": {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, "replicas": 2},
        },
        {"name": "qwen-7b", "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"}}},
    ]
}


def test_models_value_creates_llmdeployments_once_the_api_exists(render, select):
    objects = render(MODELS, extra=("--api-versions", "argosy.dev/v1alpha1/LLMDeployment"))
    models = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in select(objects, "LLMDeployment")}
    assert set(models) == {("team-a", "llama-8b"), ("argosy-system", "qwen-7b")}
    llama = models[("team-a", "llama-8b")]
    assert llama["apiVersion"] == "argosy.dev/v1alpha1"
    assert llama["spec"] == {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, "replicas": 2}
    assert llama["metadata"]["annotations"] == {"argosy.dev/routing-policy": "prefix-affinity"}
    # A release that does not manage the CRD trusts it to exist.
    assert len(select(render({**MODELS, "crds": {"enabled": False}}), "LLMDeployment")) == 2


def test_first_install_skips_models_and_says_to_upgrade(run_helm, chart_dir, tmp_path):
    """Helm cannot create the CRD and its objects in one release: say so instead of failing."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(MODELS))
    result = run_helm(
        "install", "argosy", str(chart_dir), "--dry-run=client", "--namespace", "argosy-system", "--values", str(path)
    )
    assert result.returncode == 0, result.stderr
    manifest, notes = result.stdout.split("NOTES:", 1)
    kinds = [doc["kind"] for doc in yaml.safe_load_all(manifest.split("MANIFEST:", 1)[1]) if doc]
    assert "CustomResourceDefinition" in kinds and "LLMDeployment" not in kinds
    assert "the 2 model(s) in `models:` were NOT created yet" in notes
    assert "helm upgrade argosy" in notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replica": 3}}, "additional properties 'replica' not allowed"),
        ({"operatr": {"enabled": True}}, "additional properties 'operatr' not allowed"),
        ({"gateway": {"routingPolicy": "random"}}, "routingPolicy"),
        ({"operator": {"replicas": -1}}, "replicas"),
        ({"gateway": {"apiKeys": {"enabled": True, "keys": [{"name": "a", "sha256": "plaintext-key"}]}}}, "sha256"),
        ({"models": [{"name": "Llama_8B", "spec": {"model": {"uri": "hf://a/b"}}}]}, "name"),
    ],
)
def test_schema_refuses_bad_values_with_a_clear_message(run_helm, chart_dir, tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = run_helm("template", "argosy", str(chart_dir), "--values", str(path))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gateway": {"apiKeys": {"enabled": True}}},
            "neither gateway.apiKeys.existingSecret nor gateway.apiKeys.keys",
        ),
        ({"gateway": {"httpRoute": {"enabled": True}}}, "parentRefs is empty"),
        ({"gateway": {"autoscaling": {"enabled": True}}}, "needs gateway.resources.requests.cpu"),
        (
            {
                "models": [
                    {"name": "a", "spec": {"model": {"uri": "hf://a/b"}}},
                    {"name": "a", "spec": {"model": {"uri": "hf://a/c"}}},
                ]
            },
            "listed twice",
        ),
    ],
)
def test_contradictory_values_fail_with_a_clear_message(run_helm, chart_dir, tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = run_helm("template", "argosy", str(chart_dir), "--values", str(path))
    assert result.returncode != 0
    assert message in result.stderr


def test_notes_tell_the_user_what_to_do_next(run_helm, chart_dir):
    result = run_helm("install", "argosy", str(chart_dir), "--dry-run=client", "--namespace", "argosy-system")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply" in notes and "manifests/examples/" in notes
    assert "port-forward svc/argosy-gateway" in notes
    assert "/v1/chat/completions" in notes


def test_container_arguments_are_accepted_by_the_real_command_lines(render, select):
    """The args the chart gives each container parse with the programs' own parsers."""
    import argosy_gateway.cli as gateway_cli
    import argosy_operator.cli as cli
    objects = render(
        {
            "watchNamespaces": ["team-a", "team-b"],
            "operator": {"logLevel": "warning"},
            "gateway": {"workers": 3, "logLevel": "debug"},
        }
    )
    operator_args = select(objects, "Deployment", "argosy-operator")[0]["spec"]["template"]["spec"]["containers"][0]
    import argosy_operator.settings as settings
    parsed = settings.settings_from_args(
        cli.resolve_run_args(cli.build_parser().parse_args(operator_args["args"])), env={}
    )
    assert parsed.namespaces == ("team-a", "team-b")
    assert (parsed.log_level, parsed.metrics_port) == ("WARNING", 8080)
    gateway = select(objects, "Deployment", "argosy-gateway")[0]["spec"]["template"]["spec"]["containers"][0]
    parsed = gateway_cli.parse_args(gateway["args"])
    assert (parsed.host, parsed.port, parsed.workers) == ("0.0.0.0", 8000, 3)
