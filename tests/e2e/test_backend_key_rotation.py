"""The backend key end to end on the sandbox: the operator's Secret, the pods' VLLM_API_KEY, the
gateway's bearer token, a restart that keeps the key, and a rotation during traffic.

The operator and the gateway run as their own processes; the sandbox's pod runner serves every
vLLM pod with the simulator, which enforces VLLM_API_KEY as vLLM does (tests/contract checks the
two agree; tests/e2e/test_real_vllm.py checks the 401, the gateway's key and a rotation of one real
replica with a surge pod). The rotations here are the cheap variants: two replicas with the default
rollout (one at a time, no surge), and one replica with a surge pod.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from argosy_sandbox.cluster import Sandbox
from argosy_sandbox.podrunner import wait_for
from test_gateway_k8s import FACTS, GatewayProcess
from test_operator import Cluster, Operator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420), pytest.mark.usefixtures("crd")]

NAME = "keyed"
SPEC = {
    "model": {"uri": "hf://example/keyed", "servedModelNames": [NAME], "facts": FACTS},
    # Two replicas: the roll replaces one at a time (maxUnavailable 1, no surge), so one always serves.
    "replicas": 2,
    "gpu": {"count": 1},
    "engine": {"maxModelLen": 4096},
}


def post(url: str, authorization: str | None = None) -> tuple[int, Any]:
    body = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(url + "/v1/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def secret(cluster: Cluster) -> dict[str, Any]:
    found = cluster.get("secret", f"{NAME}-backend-key")
    assert found is not None, "the operator made no backend-key Secret"
    return found


def key_ids(cluster: Cluster) -> set[str]:
    return {p["metadata"]["annotations"].get("argosy.dev/backend-key-id", "") for p in cluster.pods(NAME)}


def rotate_under_traffic(cluster: Cluster, gateway: GatewayProcess, old: str, replicas: int, tmp_path: Path,
                         ready_seen: list[int] | None = None) -> tuple[float, int, list[int]]:
    """Rotate the key while two clients keep calling through the gateway; wait until every pod runs the new
    key, the old entry is gone and `replicas` endpoints are ready again, and at least 100 requests were sent
    since the rotation. Returns (seconds to roll, requests sent during the roll, every request's status);
    `ready_seen` collects the gateway's ready endpoints as polled during the roll."""
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(post(gateway.url, "Bearer client-key")[0])
            time.sleep(0.05)

    def rolled() -> bool:
        ready = gateway.models().get(NAME, {}).get("readyEndpoints", 0)
        if ready_seen is not None:
            ready_seen.append(ready)
        current = secret(cluster)
        new = current["metadata"]["annotations"]["argosy.dev/backend-key-current"]
        return new != old and key_ids(cluster) == {new} and set(current["data"]) == {f"key-{new}"} and (
            ready == replicas)

    senders = [threading.Thread(target=traffic) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(1)
        started_with = len(results)
        rotated_at = time.monotonic()
        cluster.kubectl("annotate", "llmdeployment", NAME, "argosy.dev/rotate-backend-key=1", "--overwrite")
        assert wait_for(rolled, 240, interval=0.5), (tmp_path / "operator.log").read_text()[-3000:]
        rolled_in = time.monotonic() - rotated_at
        during = len(results) - started_with
        while len(results) - started_with < 100:  # at least 100 requests in all since the rotation
            time.sleep(0.1)
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    return rolled_in, during, results


def test_pods_demand_the_key_the_gateway_sends_it_and_a_rotation_under_traffic_fails_no_request(
    sandbox: Sandbox, operator: Operator, cluster: Cluster, gateway: GatewayProcess, tmp_path: Path
) -> None:
    cluster.apply(NAME, SPEC)
    cluster.wait_ready(NAME, 2)
    assert wait_for(lambda: gateway.models().get(NAME, {}).get("readyEndpoints") == 2, 30)

    # The Secret: owned by the LLMDeployment, labelled as its backend key, one key the pods name.
    first = secret(cluster)
    lld = cluster.get("llmdeployment", NAME)
    assert lld is not None
    assert [o["uid"] for o in first["metadata"]["ownerReferences"]] == [lld["metadata"]["uid"]]
    assert first["metadata"]["labels"]["argosy.dev/backend-key"] == NAME
    (old,) = key_ids(cluster)
    assert set(first["data"]) == {f"key-{old}"}
    key = base64.b64decode(first["data"][f"key-{old}"]).decode()

    # Straight to a pod: 401 without the key or with the gateway client's key; the probes' /health is open.
    pod_url = f"http://{cluster.pods(NAME)[0]['status']['podIP']}:8000"
    assert post(pod_url) == (401, {"error": "Unauthorized"})
    assert post(pod_url, "Bearer client-key") == (401, {"error": "Unauthorized"})
    assert post(pod_url, f"Bearer {key}")[0] == 200
    with urllib.request.urlopen(pod_url + "/health", timeout=5) as health:
        assert health.status == 200
    # Through the gateway, with whatever the client sends: the gateway sends the pod's key instead.
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0, timeout=10)
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices

    # A restarted operator keeps the key: same Secret data, no roll.
    pods_before = {p["metadata"]["uid"] for p in cluster.pods(NAME)}
    operator.stop()
    operator.start()
    time.sleep(3)  # a few passes' worth
    assert secret(cluster)["data"] == first["data"]
    assert {p["metadata"]["uid"] for p in cluster.pods(NAME)} == pods_before

    # Rotation while clients keep calling through the gateway: not one request fails.
    rolled_in, during, results = rotate_under_traffic(cluster, gateway, old, 2, tmp_path)
    failed = [status for status in results if status != 200]
    print(f"rotation: pods rolled and the old key dropped in {rolled_in:.1f} s; {during} requests during the roll, "
          f"{len(results)} in all, {len(failed)} failed")
    assert during >= 100, f"only {during} requests were sent during the roll"
    assert not failed, f"{len(failed)} of {len(results)} requests failed during the rotation: {sorted(set(failed))}"
    for pod in cluster.pods(NAME):  # the old key opens no new pod
        assert post(f"http://{pod['status']['podIP']}:8000", f"Bearer {key}") == (401, {"error": "Unauthorized"})


def test_one_replica_with_a_surge_pod_rotates_its_key_without_an_outage(
    sandbox: Sandbox, operator: Operator, cluster: Cluster, gateway: GatewayProcess, tmp_path: Path
) -> None:
    # The default (maxSurge 0) would stop the only pod before starting its successor.
    cluster.apply(NAME, {**SPEC, "replicas": 1, "rollout": {"maxSurge": 1, "maxUnavailable": 0}})
    cluster.wait_ready(NAME, 1)
    assert wait_for(lambda: gateway.models().get(NAME, {}).get("readyEndpoints") == 1, 30)
    deployment = cluster.get("deployment", NAME)
    assert deployment is not None
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (old,) = key_ids(cluster)
    old_pod = cluster.pods(NAME)[0]["metadata"]["uid"]

    ready_seen: list[int] = []
    rolled_in, during, results = rotate_under_traffic(cluster, gateway, old, 1, tmp_path, ready_seen)
    failed = [status for status in results if status != 200]
    print(f"one-replica rotation with a surge pod: rolled in {rolled_in:.1f} s, {during} requests during the roll, "
          f"{len(failed)} failed; ready endpoints seen {sorted(set(ready_seen))}")
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {sorted(set(failed))}"
    assert min(ready_seen) >= 1, "the gateway had no ready pod during the roll"
    [pod] = cluster.pods(NAME)
    assert pod["metadata"]["uid"] != old_pod


def test_a_rollout_that_could_never_replace_a_pod_is_refused_by_kubectl_apply(cluster: Cluster) -> None:
    result = cluster.apply(NAME, {**SPEC, "rollout": {"maxSurge": 0, "maxUnavailable": "0%"}}, check=False)
    assert result.returncode != 0
    assert "rollout.maxSurge and rollout.maxUnavailable cannot both be 0" in result.stderr
    assert "should match" not in result.stderr
    bad = cluster.apply(NAME, {**SPEC, "rollout": {"maxUnavailable": "150%"}}, check=False)
    assert bad.returncode != 0 and "maxUnavailable" in bad.stderr
    assert cluster.get("llmdeployment", NAME) is None
