"""Fuzzing the gateway over real sockets: nothing a client sends gets a 500 from the gateway's
own code or crashes it.

Hypothesis generates batches of raw HTTP/1.1 requests: malformed and truncated JSON, wrong
types, huge strings, deep nesting, invalid UTF-8, multipart bodies with odd boundaries, odd
headers, bodies cut short (the connection closes before Content-Length bytes arrived) and
slow senders (the body in pieces). The gateway runs in a thread with a simulator behind it,
so routable requests really travel to a model server.

A bounded, seeded run is part of ``make test`` (ARGOSY_FUZZ_REQUESTS, default 1000);
``make fuzz-gateway`` runs a longer one (FUZZ_REQUESTS=20000 by default, FUZZ_SEED to vary).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from argosy_gateway.app import create_app
from argosy_gateway.routes import PROXY_PATHS
from argosy_gateway.settings import GatewaySettings
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from .harness import Simulator, free_port, write_routes

REQUESTS = int(os.environ.get("ARGOSY_FUZZ_REQUESTS", "1000"))
SEED = int(os.environ.get("ARGOSY_FUZZ_SEED") or "11")
BATCH = 10
MAX_BODY = 256 * 1024
PATHS = [*sorted(PROXY_PATHS), "/v1/models", "/v1/models/model-a", "/v1/responses/resp_1", "/nope", "/v1/"]
MODELS = ["model-a", "model-down", "unknown", "", "model-a\x00", "\ud800"]
# The gateway's own answers above 499: no replica / starting (503), upstream failure (502, 504).
ALLOWED_OWN_5XX = {502, 503, 504}

pytestmark = pytest.mark.timeout(1800)


class ThreadedGateway:
    """The gateway app under uvicorn on uvloop in its own thread (the test talks plain sockets)."""

    def __init__(self, gateway_settings: GatewaySettings) -> None:
        self.port = free_port()
        self.app = create_app(gateway_settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, http="httptools", log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fuzzed-gateway", daemon=True)
        self.crashed: BaseException | None = None

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self.server.serve())
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.crashed = exc

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not (self.server.started and self.app.state.runtime.loaded):
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


class ErrorLog(logging.Handler):
    """Every ERROR the gateway (or uvicorn, for an exception escaping the app) logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    sim = Simulator(["model-a"])
    routes = tmp_path_factory.mktemp("fuzz") / "routes.yaml"
    write_routes(routes, {"model-a": [sim.url], "model-down": []})
    gateway = ThreadedGateway(
        GatewaySettings(static_config=Path(routes), max_body_bytes=MAX_BODY, first_byte_timeout_seconds=10)
    )
    errors = ErrorLog()
    for name in ("argosy_gateway", "uvicorn.error"):
        logging.getLogger(name).addHandler(errors)
    gateway.start()
    gateway.errors = errors  # type: ignore[attr-defined]
    try:
        yield gateway
    finally:
        gateway.stop()
        for name in ("argosy_gateway", "uvicorn.error"):
            logging.getLogger(name).removeHandler(errors)
        sim.kill()


# -- what is sent -----------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = scalars | st.lists(scalars, max_size=4) | st.dictionaries(st.sampled_from("abtxy"), scalars, max_size=3)
fields = st.dictionaries(
    st.sampled_from(["messages", "prompt", "input", "query", "documents", "max_tokens", "logprobs", "user", "x"]),
    json_values,
    max_size=4,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = draw(fields)
    if draw(st.integers(0, 9)):
        body["model"] = draw(st.sampled_from(["model-a"] * 6 + MODELS) | json_values)
    if draw(st.booleans()):
        body["stream"] = draw(st.sampled_from([True, False, None, "yes", 1]))
    if draw(st.integers(0, 3)) == 0:  # a request vLLM would serve, apart from what else was drawn
        body.update(model="model-a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = json.dumps(body)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        text = text[: draw(st.integers(0, len(text)))]  # malformed: cut anywhere
    elif kind == 1:
        text = draw(st.sampled_from(["[", "{", '{"a":'])) * draw(st.integers(1, 5000)) + text
    elif kind == 2:
        text = text[:-1] + ', "pad": "' + "x" * draw(st.integers(1000, MAX_BODY + 1000)) + '"}'
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    return raw


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=80))
    parts: list[bytes] = []
    for name in draw(st.lists(st.sampled_from(["model", "file", "stream", "language", "model"]), max_size=4)):
        if name == "file":
            value = draw(st.binary(max_size=300))
        else:
            value = draw(st.sampled_from(MODELS)).encode("utf-8", "replace")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode("utf-8", "replace")
            + value
            + b"\r\n"
        )
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    content_type = draw(
        st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data", "application/json"])
    )
    return body, content_type


header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
odd_headers = st.lists(
    st.tuples(
        st.sampled_from(
            ["authorization", "x-session-id", "x-request-id", "traceparent", "content-type", "x-odd", "accept"]
        ),
        header_values,
    ),
    max_size=4,
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(st.sampled_from(PATHS))
    method = draw(st.sampled_from(["POST"] * 16 + ["GET", "DELETE", "PUT"]))
    headers = draw(odd_headers)
    if path.startswith("/v1/audio"):
        body, content_type = draw(multipart_bodies())
        headers.append(("content-type", content_type))
    elif draw(st.integers(0, 19)) == 0:
        body = draw(st.binary(max_size=2000))
    else:
        body = draw(json_bodies())
    return {
        "method": method,
        "path": path,
        "headers": headers,
        "body": body,
        # cut: fewer bytes than Content-Length, then the client closes; slow: the body in pieces
        "mode": draw(st.sampled_from(["normal"] * 17 + ["cut", "slow", "chunked"])),
    }


# -- how it is sent ---------------------------------------------------------------------------


def send(port: int, request: dict[str, Any]) -> tuple[int | None, bytes]:
    """One request on its own connection; returns (status or None if no answer, the raw answer)."""
    body: bytes = request["body"]
    head = [f"{request['method']} {request['path']} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{name}: {value}" for name, value in request["headers"]]
    mode = request["mode"]
    if mode == "chunked":
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:100], body[100:]) if piece)
        payload += b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body) + (7 if mode == 'cut' else 0)}")
        payload = body
    raw = "\r\n".join(head).encode("latin-1", "replace") + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
        try:
            if mode == "slow":
                connection.sendall(raw + payload[:10])
                for start in range(10, max(len(payload), 10), max(1, len(payload) // 3)):
                    time.sleep(0.005)
                    connection.sendall(payload[start : start + max(1, len(payload) // 3)])
            else:
                connection.sendall(raw + payload)
            if mode == "cut":
                connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway may answer (413) and close before the whole body is sent
        answer = bytearray()
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except OSError:
            pass
    if not answer.startswith(b"HTTP/1.1 "):
        return None, bytes(answer)
    return int(answer[9:12]), bytes(answer)


STATS: Counter[str] = Counter()


@settings(
    max_examples=max(1, REQUESTS // BATCH),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)
@seed(SEED)
@given(batch=st.lists(requests(), min_size=BATCH, max_size=BATCH))
def test_fuzzed_requests_never_get_a_500_from_the_gateway_or_crash_it(
    fuzzed: ThreadedGateway, batch: list[dict[str, Any]]
) -> None:
    for request in batch:
        status, answer = send(fuzzed.port, request)
        STATS["requests"] += 1
        STATS[f"status {status}"] += 1
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        from_upstream = b"\r\nx-argosy-endpoint:" in head
        STATS["answered by the model server"] += from_upstream
        if status is not None and status >= 500 and not from_upstream:
            assert status in ALLOWED_OWN_5XX, (request, answer[:2000])
        if request["mode"] != "cut":
            assert status is not None, (request, answer[:500])  # a complete request is always answered
        assert fuzzed.thread.is_alive(), fuzzed.crashed
    errors: list[str] = fuzzed.errors.records  # type: ignore[attr-defined]
    assert errors == [], errors[:5]


def test_the_gateway_is_healthy_after_the_fuzzing(fuzzed: ThreadedGateway) -> None:
    status, _ = send(fuzzed.port, {"method": "GET", "path": "/healthz", "headers": [], "body": b"", "mode": "normal"})
    chat = json.dumps({"model": "model-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    served, _ = send(
        fuzzed.port, {"method": "POST", "path": "/v1/chat/completions", "headers": [], "body": chat, "mode": "normal"}
    )
    print(f"fuzzed requests by status: {dict(sorted(STATS.items()))}")
    assert (status, served) == (200, 200)
    assert STATS["requests"] >= REQUESTS - BATCH or STATS["requests"] == 0  # 0: this test ran alone
