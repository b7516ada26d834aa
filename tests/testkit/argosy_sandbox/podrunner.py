"""The pod runner: one local process per Running pod, bound to the pod's IP.

kwok marks pods Running without running anything. The runner closes the gap for
tests and the demo: for every Running pod that matches a label selector it starts
a command (for example the vLLM simulator) listening on the pod's IP, which the
sandbox allocates from 127.0.0.0/8, and it stops that process when the pod stops
running or goes away. The watch is the kubernetes client's own; on any error the
runner re-lists from scratch, which also reconciles processes that died.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

log = logging.getLogger("argosy_sandbox.podrunner")

CommandFor = Callable[[dict[str, Any]], list[str]]
SERVED_NAMES_ANNOTATION = "argosy.dev/served-model-names"
SERVING_PODS_SELECTOR = "app.kubernetes.io/managed-by=argosy-operator,argosy.dev/role in (server,leader)"


def template_command(template: Sequence[str]) -> CommandFor:
    """A command from a template: each argument is formatted with the pod's fields.

    Fields: ``{pod_ip}``, ``{pod_name}``, ``{namespace}``, ``{annotations[KEY]}``, ``{labels[KEY]}``.
    """

    def command(pod: dict[str, Any]) -> list[str]:
        metadata = pod["metadata"]
        fields = {
            "pod_ip": pod["status"]["podIP"],
            "pod_name": metadata["name"],
            "namespace": metadata["namespace"],
            "annotations": metadata.get("annotations") or {},
            "labels": metadata.get("labels") or {},
        }
        return [argument.format(**fields) for argument in template]

    return command


def vllm_simulator_command(port: int = 8000, extra: Sequence[str] = ()) -> CommandFor:
    """The vLLM simulator on the pod's IP, serving the names in the operator's served-model-names annotation."""

    def command(pod: dict[str, Any]) -> list[str]:
        annotations = pod["metadata"].get("annotations") or {}
        try:
            names = json.loads(annotations.get(SERVED_NAMES_ANNOTATION, "[]"))
        except ValueError:
            names = []
        if not names:
            names = [pod["metadata"]["labels"].get("argosy.dev/deployment", pod["metadata"]["name"])]
        argv = [
            str(Path(sys.executable).parent / "argosy-vllm-sim"),
            "--host",
            pod["status"]["podIP"],
            "--port",
            str(port),
        ]
        for name in names:
            argv += ["--model", str(name)]
        return argv + list(extra)

    return command


@dataclass
class RunningProcess:
    namespace: str
    pod_name: str
    pod_ip: str
    process: subprocess.Popen[bytes]


def _is_running(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running" and bool(status.get("podIP")) and not pod["metadata"].get("deletionTimestamp")
    )


class PodRunner:
    def __init__(
        self,
        kubeconfig: Path,
        label_selector: str,
        command: CommandFor,
        namespace: str | None = None,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label_selector = label_selector
        self.namespace = namespace
        self.command = command
        self.log_dir = log_dir
        self.env = env
        self._api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self._processes: dict[str, RunningProcess] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pod-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for uid in list(self._processes):
                self._stop_process(uid)

    def running(self) -> dict[str, RunningProcess]:
        """Live processes by pod uid."""
        with self._lock:
            return {uid: entry for uid, entry in self._processes.items() if entry.process.poll() is None}

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        if self.namespace:
            response = self._api.list_namespaced_pod(self.namespace, label_selector=self.label_selector)
        else:
            response = self._api.list_pod_for_all_namespaces(label_selector=self.label_selector)
        pods = [self._api.api_client.sanitize_for_serialization(pod) for pod in response.items]
        return pods, response.metadata.resource_version

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pods, version = self._list()
                self._reconcile_all(pods)
                self._watch = watch.Watch()
                lister = self._api.list_namespaced_pod if self.namespace else self._api.list_pod_for_all_namespaces
                args = (self.namespace,) if self.namespace else ()
                for event in self._watch.stream(
                    lister,
                    *args,
                    label_selector=self.label_selector,
                    resource_version=version,
                    timeout_seconds=30,
                ):
                    if self._stop.is_set():
                        break
                    pod = self._api.api_client.sanitize_for_serialization(event["object"])
                    self._reconcile_one(pod, deleted=event["type"] == "DELETED")
            except Exception as error:
                if not self._stop.is_set():
                    log.warning("pod runner watch failed, re-listing: %s", error)
                    self._stop.wait(1)

    def _reconcile_all(self, pods: list[dict[str, Any]]) -> None:
        seen = set()
        for pod in pods:
            seen.add(pod["metadata"]["uid"])
            self._reconcile_one(pod, deleted=False)
        with self._lock:
            for uid in set(self._processes) - seen:
                self._stop_process(uid)

    def _reconcile_one(self, pod: dict[str, Any], deleted: bool) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            current = self._processes.get(uid)
            if deleted or not _is_running(pod):
                if current is not None:
                    self._stop_process(uid)
                return
            if current is not None and current.process.poll() is None:
                return
            if current is not None:
                log.warning(
                    "process for pod %s exited with %s; restarting", current.pod_name, current.process.returncode
                )
            self._start_process(uid, pod)

    def _start_process(self, uid: str, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        argv = self.command(pod)
        output: int | Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{metadata['namespace']}_{metadata['name']}.log").open("ab")
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )
        if output is not subprocess.DEVNULL:
            output.close()
        self._processes[uid] = RunningProcess(metadata["namespace"], metadata["name"], pod["status"]["podIP"], process)
        log.info(
            "started %s for pod %s/%s on %s", argv[0], metadata["namespace"], metadata["name"], pod["status"]["podIP"]
        )

    def _stop_process(self, uid: str) -> None:
        entry = self._processes.pop(uid)
        process = entry.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("stopped process for pod %s/%s", entry.namespace, entry.pod_name)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll until true or the deadline passes (for callers that need the runner to settle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
