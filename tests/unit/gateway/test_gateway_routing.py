"""Routing policies end to end, the CLI, and robustness against arbitrary input."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest

from .conftest import GatewayFactory
from .harness import Simulator, free_port, write_routes


def client(base_url: str, **kwargs: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=20, **kwargs)


async def test_session_affinity_keeps_a_session_on_one_replica(
    gateway_factory: GatewayFactory, sims: dict[str, Simulator], tmp_path: Path
) -> None:
    write_routes(
        tmp_path / "routes.yaml", {"model-a": [sims["a1"].url, sims["a2"].url]}, {"model-a": "session-affinity"}
    )
    gateway = await gateway_factory()
    by_session: dict[str, set[str]] = {}
    async with client(gateway.url) as sdk:
        for index in range(48):
            session = f"chat-{index % 16}"
            raw = await sdk.chat.completions.with_raw_response.create(
                model="model-a",
                messages=[{"role": "user", "content": f"turn {index}"}],
                max_tokens=1,
                extra_headers={"X-Session-ID": session},
            )
            by_session.setdefault(session, set()).add(raw.headers["x-argosy-endpoint"])
        user_picks = set()
        for _ in range(4):  # the OpenAI `user` field is a session key too
            raw = await sdk.completions.with_raw_response.create(
                model="model-a", prompt="x", max_tokens=1, user="alice"
            )
            user_picks.add(raw.headers["x-argosy-endpoint"])
    assert all(len(endpoints) == 1 for endpoints in by_session.values())
    assert len(set().union(*by_session.values())) == 2  # 16 sessions: all on one replica has odds 2**-15
    assert len(user_picks) == 1


async def test_prefix_affinity_sends_a_shared_system_prompt_to_one_replica(
    gateway_factory: GatewayFactory, sims: dict[str, Simulator], tmp_path: Path
) -> None:
    write_routes(
        tmp_path / "routes.yaml", {"model-a": [sims["a1"].url, sims["a2"].url]}, {"model-a": "prefix-affinity"}
    )
    gateway = await gateway_factory()
    picks: dict[str, Counter[str]] = {}
    async with client(gateway.url) as sdk:
        for index in range(48):
            system = f"You are assistant number {index % 16}. " * 12  # longer than PREFIX_CHARS
            raw = await sdk.chat.completions.with_raw_response.create(
                model="model-a",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{index}"}],
                max_tokens=1,
            )
            picks.setdefault(system, Counter())[raw.headers["x-argosy-endpoint"]] += 1
    # Sequential requests never exceed the load bound, so each prefix stays on one replica.
    assert all(len(counter) == 1 for counter in picks.values())
    assert len({next(iter(c)) for c in picks.values()}) == 2  # 16 prefixes spread over both


async def test_least_outstanding_prefers_the_idle_replica(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    first = spawn_sim(["model-x"], itl_ms=100)
    second = spawn_sim(["model-x"], itl_ms=100)
    write_routes(tmp_path / "routes.yaml", {"model-x": [first.url, second.url]})
    gateway = await gateway_factory()
    body = {"model": "model-x", "prompt": "x", "max_tokens": 50, "stream": True}
    async with aiohttp.ClientSession() as http, client(gateway.url) as sdk:
        # Occupy whichever replica takes the long request...
        long = await http.post(gateway.url + "/v1/completions", json=body)
        await long.content.readline()
        busy = next(iter(gateway.runtime.outstanding))
        # ...then short requests all go to the other one.
        picks: Counter[str] = Counter()
        for _ in range(5):
            raw = await sdk.completions.with_raw_response.create(model="model-x", prompt="x", max_tokens=1)
            picks[raw.headers["x-argosy-endpoint"]] += 1
        long.close()
    assert busy.split("://")[1] not in picks and sum(picks.values()) == 5


async def test_prefix_affinity_steers_around_a_pod_whose_queue_others_filled(
    gateway_factory: GatewayFactory, spawn_sim, tmp_path: Path
) -> None:
    busy = spawn_sim(["model-p"], itl_ms=50, max_num_seqs=2)
    idle = spawn_sim(["model-p"], itl_ms=50, max_num_seqs=2)
    write_routes(tmp_path / "routes.yaml", {"model-p": [busy.url, idle.url]}, {"model-p": "prefix-affinity"})
    gateway = await gateway_factory(pod_metrics_seconds=0.1)

    async def direct(http: aiohttp.ClientSession) -> None:
        body = {"model": "model-p", "prompt": "x", "max_tokens": 200, "stream": True}
        async with http.post(busy.url + "/v1/completions", json=body) as response:
            await response.read()

    async with aiohttp.ClientSession() as http, client(gateway.url) as sdk:
        # Another client (a batch job, another gateway replica) fills one pod's batch and queue.
        others = [asyncio.create_task(direct(http)) for _ in range(5)]
        deadline = time.monotonic() + 10
        while (load := gateway.runtime.pod_loads.get(busy.url)) is None or load.waiting < 3:
            assert time.monotonic() < deadline, f"the busy pod's queue was not read: {gateway.runtime.pod_loads}"
            await asyncio.sleep(0.05)
        assert load.hidden == 5
        # New prompts, about half of which hash to the busy pod, all go to the other one.
        picks: Counter[str] = Counter()
        for index in range(12):
            raw = await sdk.completions.with_raw_response.create(
                model="model-p", prompt=f"a new system prompt {index} " * 12, max_tokens=1
            )
            picks[raw.headers["x-argosy-endpoint"]] += 1
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    assert picks == {idle.address: 12}
    assert gateway.runtime.pod_loads[idle.url].hidden == 0


async def test_no_input_makes_the_gateway_answer_500(gateway_factory: GatewayFactory, sims, tmp_path: Path) -> None:
    write_routes(tmp_path / "routes.yaml", {"model-a": [sims["a1"].url]})
    gateway = await gateway_factory()
    rng = random.Random(4)
    valid = json.dumps(
        {"model": "model-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": False}
    ).encode()
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as http:
        for _ in range(150):
            body = bytearray(valid)
            for _ in range(rng.randint(1, 6)):
                action = rng.random()
                position = rng.randrange(len(body))
                if action < 0.4:
                    body[position] = rng.randrange(256)
                elif action < 0.7:
                    del body[position : position + rng.randint(1, 8)]
                else:
                    body[position:position] = rng.choice([b"[", b"{", b'"', b"null", b"1e999", b"\\u0000", b"\xff"])
            path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
            async with http.post(gateway.url + path, data=bytes(body)) as response:
                statuses[response.status] += 1
                payload = await response.read()
                if response.status >= 400 and response.headers.get("x-argosy-endpoint") is None:
                    assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
    assert statuses[500] == 0, statuses
    assert statuses[400] > 50


@pytest.mark.timeout(120)
def test_cli_serves_with_two_workers_from_a_config_file_and_stops_on_sigterm(
    sims: dict[str, Simulator], tmp_path: Path
) -> None:
    write_routes(tmp_path / "routes.yaml", {"model-b": [sims["b"].url], "model-idle": []})
    (tmp_path / "gateway.yaml").write_text(f"static_config: {tmp_path / 'routes.yaml'}\nretry_after_seconds: 7\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGOSY_GATEWAY_")}
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("argosy-gateway")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--config",
            str(tmp_path / "gateway.yaml"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60  # two workers import the app at once; slow on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the gateway did not become ready"
            time.sleep(0.1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as sdk:
            for _ in range(4):
                assert sdk.completions.create(model="model-b", prompt="x", max_tokens=1).model == "model-b"
        # A setting from the config file, not only the routes: Retry-After on "no ready replica".
        idle = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "model-idle", "prompt": "x"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(idle, timeout=5)
        assert refused.value.code == 503
        assert refused.value.headers["Retry-After"] == "7"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    assert "no API keys configured" in output


def test_cli_refuses_invalid_settings(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("default_policy: fastest\n")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("argosy-gateway")), "--config", str(tmp_path / "gateway.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "unknown policy 'fastest'" in result.stderr
