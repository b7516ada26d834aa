"""The sandbox's kubelet stand-in: it runs each pod's own containers as local processes.

kwok gives every pod on a simulated node an IP from 127.0.0.0/8 and marks it Running.
For pods with a container of an image the sandbox knows (vLLM, Argosy's operator and
gateway; see kubelet_plan.image_kind) kwok stops there (its stages leave them not
Ready) and this runner takes over, as a kubelet would:

- it runs each known container's command/args/env (``$(VAR)`` expanded, env from values,
  fieldRefs, Secrets and ConfigMaps read from the API) as a process bound to the pod IP;
- readiness, startup and liveness come from the containers' own probes;
- a container that exits, or fails its liveness probe, is restarted with a shortened
  CrashLoopBackOff and counted in ``restartCount``;
- stdout/stderr go to CRI-format files that kwok serves to ``kubectl logs``;
- the pod's status (Ready/ContainersReady, containerStatuses) is written by the runner;
- a pod that gets a deletionTimestamp is stopped as a kubelet stops it: each container's
  preStop hook, SIGTERM to its main process, SIGKILL when the grace period is over, and only
  then the runner deletes the pod object (grace 0; kwok's own delete stage leaves these pods
  alone).

It runs once per sandbox (``sandbox up`` starts it, ``down`` stops it), watching pods with
lightkube. What stands in for what is decided in kubelet_plan (pure) and listed in
docs/sandbox.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import yaml
from aiohttp import web

from . import kubelet_plan as plan
from .cluster import container_pids_of

log = logging.getLogger("argosy_sandbox.podrunner")

FIELD_MANAGER = "argosy-sandbox-pod-runner"
TOKEN_SECONDS = 24 * 3600
RESYNC_SECONDS = 30.0
STOP_GRACE_SECONDS = 5.0
STATE_ENV = plan.STATE_ENV
POD_UID_ENV = plan.POD_UID_ENV
BIN = Path(sys.executable).parent


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _exit_of(process: asyncio.subprocess.Process) -> int:
    """The exit code as soon as the container's main process exits.

    Process.wait() also waits for its pipes to close, which a child the process started (vLLM's
    engine core) keeps open: a kubelet sees the container exit when its main process does.
    """
    while process.returncode is None:  # noqa: ASYNC110 (no event fires before the pipes close)
        await asyncio.sleep(0.1)
    return process.returncode


async def kill_group(pid: int, grace: float) -> None:
    """SIGTERM the process group a container runs in, then SIGKILL what is left after ``grace`` seconds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            await asyncio.sleep(0.1)


async def stop_main_process(process: asyncio.subprocess.Process, grace: float) -> None:
    """What the container runtime does on StopContainer: SIGTERM to the container's main process
    only, up to ``grace`` seconds for it to exit, then SIGKILL to everything left in the container."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_exit_of(process), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one container's process is started."""

    argv: list[str]
    env: dict[str, str]
    notes: list[str]
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    """Cluster DNS names resolved for this start: exec probes (and hooks) use them too."""


class ContainerRunner:
    """One container of a pod: start, probe, restart with backoff, report."""

    def __init__(self, pod: PodWorker, spec: dict[str, Any]) -> None:
        self.pod = pod
        self.spec = spec
        self.name = str(spec["name"])
        self.kind = plan.image_kind(str(spec.get("image", "")))
        self.state = plan.ContainerState(name=self.name, image=str(spec.get("image", "")))
        self.process: asyncio.subprocess.Process | None = None
        self.log_dir = pod.directory / self.name
        self.env: dict[str, str] = {}
        self.names: dict[str, str] = {}
        if self.kind is None:
            # An image the sandbox cannot run: shown as running (kwok's behaviour), no process.
            self.state = dataclasses.replace(self.state, ready=True, started=True, running_since=now_rfc3339())

    def set(self, **changes: Any) -> None:
        self.state = dataclasses.replace(self.state, **changes)
        self.pod.status_changed()

    async def run(self) -> None:
        if self.kind is None:
            return
        crashes = 0
        restarts = self.state.restart_count
        while True:
            try:
                launch = await self.pod.launch(self)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a config error, or an API call that failed: retried with backoff
                if not isinstance(error, plan.ContainerConfigError):
                    log.exception("preparing %s/%s container %s failed", self.pod.facts.namespace,
                                  self.pod.facts.name, self.name)
                crashes += 1
                self.set(waiting_reason="CreateContainerConfigError", waiting_message=str(error), ready=False)
                self._write_log(f"sandbox: cannot start container {self.name}: {error}\n".encode(), "stderr")
                await asyncio.sleep(plan.restart_delay(crashes))
                continue
            if not launch.argv:  # nothing to run (backend "none"): Running and Ready, as kwok shows it
                self.set(ready=True, started=True, running_since=now_rfc3339(), waiting_reason=None)
                return
            started = time.monotonic()
            started_at = now_rfc3339()
            reason = await self._run_once(launch, restarts, started_at)
            if self.pod.terminating:  # a container of a pod being deleted is not restarted
                return
            if time.monotonic() - started >= plan.BACKOFF_RESET_AFTER_SECONDS:
                crashes = 0
            crashes += 1
            restarts += 1
            delay = plan.restart_delay(crashes)
            self.set(
                restart_count=restarts,
                waiting_reason="CrashLoopBackOff",
                waiting_message=f"back-off {delay:.0f}s restarting failed container={self.name} ({reason})",
            )
            await asyncio.sleep(delay)

    async def _run_once(self, launch: Launch, restarts: int, started_at: str) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{restarts}.log"
        await self.pod.publish_logs()
        for note in launch.notes:
            self._write_log(f"sandbox: {note}\n".encode(), "stderr")
        self.env = launch.env
        self.names = launch.names
        process = await asyncio.create_subprocess_exec(
            *launch.argv,
            env=launch.env,
            cwd=self.pod.directory,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,
        )
        self.process = process
        startup = self._probe("startupProbe")
        readiness = self._probe("readinessProbe")
        self.set(
            pid=process.pid, running_since=started_at, waiting_reason=None, waiting_message=None,
            started=startup is None, ready=startup is None and readiness is None,
        )
        log.info("started %s/%s container %s (pid %d): %s", self.pod.facts.namespace, self.pod.facts.name,
                 self.name, process.pid, " ".join(launch.argv))
        assert process.stdout is not None and process.stderr is not None
        pumps = [asyncio.create_task(self._pump(process.stdout, "stdout")),
                 asyncio.create_task(self._pump(process.stderr, "stderr"))]
        probes = asyncio.create_task(self._probe_until_failure())
        exited = asyncio.create_task(_exit_of(process))
        try:
            await asyncio.wait({probes, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probes.cancel()
        if exited.done():
            code = exited.result()
            reason = f"exited with code {code}"
            kind = "Completed" if code == 0 else "Error"
        else:
            reason = probes.result() if not probes.cancelled() and probes.done() else "probe failed"
            kind = "Error"
            self._write_log(f"sandbox: {reason}; killing the container\n".encode(), "stderr")
        # Not ready from this moment, as the kubelet reports a terminated container at once.
        self.set(ready=False, started=False)
        # Like the container's cgroup: whatever the process started goes with it.
        await kill_group(process.pid, STOP_GRACE_SECONDS)
        code = await exited
        await asyncio.wait(pumps, timeout=STOP_GRACE_SECONDS)
        log.info("%s/%s container %s %s", self.pod.facts.namespace, self.pod.facts.name, self.name, reason)
        self.process = None
        self.set(
            running_since=None, pid=None,
            last_exit_code=code if code >= 0 else 128 - code, last_reason=kind,
            last_started=started_at, last_finished=now_rfc3339(),
        )
        return reason

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await kill_group(self.process.pid, STOP_GRACE_SECONDS)

    async def terminate(self, grace: int) -> None:
        """The kubelet's killContainer: the preStop hook (bounded by the grace period), then SIGTERM,
        then SIGKILL once what the hook left of the grace period is over."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        began = time.monotonic()
        try:
            hook = plan.pre_stop_hook(self.spec, self.pod.facts.pod_ip, grace)
        except plan.ContainerConfigError as error:
            self._write_log(f"sandbox: preStop hook not run: {error}\n".encode(), "stderr")
            hook = None
        if hook is not None and grace > 0:
            self._write_log(f"sandbox: pod deleted; preStop hook {hook.describe()} (at most {grace}s)\n".encode(),
                            "stderr")
            outcome = await self._pre_stop(hook)
            self._write_log(f"sandbox: preStop hook {outcome} after {time.monotonic() - began:.1f}s\n".encode(),
                            "stderr")
        stop_grace = plan.stop_grace_after_hook(grace, time.monotonic() - began)
        if process.returncode is None:
            self._write_log(f"sandbox: SIGTERM; SIGKILL in {stop_grace:.0f}s if still running\n".encode(), "stderr")
            log.info("%s/%s container %s: SIGTERM (grace %.0fs)", self.pod.facts.namespace, self.pod.facts.name,
                     self.name, stop_grace)
            await stop_main_process(process, stop_grace)

    async def _pre_stop(self, hook: plan.PreStopHook) -> str:
        if hook.probe is None:
            await asyncio.sleep(hook.seconds)
            return "slept"
        return "succeeded" if await self._check(hook.probe) else "failed"

    # -- logs -----------------------------------------------------------------------------------

    def log_files(self) -> tuple[str, str] | None:
        if self.kind is None:
            return None
        restarts = self.state.restart_count
        # Before the first restart there is no previous container: kwok's log server says the file is missing.
        previous = f"{restarts - 1}.log" if restarts else "no-previous-container.log"
        return (str(self.log_dir / f"{restarts}.log"), str(self.log_dir / previous))

    def _write_log(self, line: bytes, stream: str) -> None:
        path = getattr(self, "log_path", None) or self.log_dir / f"{self.state.restart_count}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as file:
            file.write(plan.cri_log_line(_log_timestamp(), stream, line))

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        with self.log_path.open("ab") as file:
            while True:
                try:
                    line = await stream.readline()
                except ValueError:  # a line longer than the limit: take what is there
                    line = await stream.read(1 << 20)
                if not line:
                    return
                file.write(plan.cri_log_line(_log_timestamp(), name, line))
                file.flush()

    # -- probes ---------------------------------------------------------------------------------

    def _probe(self, field: str) -> plan.Probe | None:
        return plan.parse_probe(self.spec.get(field), self.spec, self.pod.facts.pod_ip)

    async def _probe_until_failure(self) -> str:
        """Run startup, then readiness and liveness probes; returns why the container must restart."""
        startup = self._probe("startupProbe")
        readiness = self._probe("readinessProbe")
        liveness = self._probe("livenessProbe")
        if startup is not None:
            if not await self._wait_for_success(startup):
                return f"startup probe failed {startup.failure_threshold} times"
            self.set(started=True, ready=readiness is None)
        tasks = []
        if readiness is not None:
            tasks.append(asyncio.create_task(self._readiness(readiness)))
        try:
            if liveness is None:
                await asyncio.Event().wait()
            await asyncio.sleep(liveness.initial_delay)  # type: ignore[union-attr]
            failures = 0
            while True:
                # The kubelet stops liveness probes of a pod being deleted (readiness goes on).
                ok = self.pod.terminating or await self._check(liveness)  # type: ignore[arg-type]
                failures = 0 if ok else failures + 1
                if failures >= liveness.failure_threshold:  # type: ignore[union-attr]
                    return f"liveness probe failed {failures} times"
                await asyncio.sleep(liveness.period)  # type: ignore[union-attr]
        finally:
            for task in tasks:
                task.cancel()

    async def _wait_for_success(self, probe: plan.Probe) -> bool:
        await asyncio.sleep(probe.initial_delay)
        failures = 0
        while True:
            if await self._check(probe):
                return True
            failures += 1
            if failures >= probe.failure_threshold:
                return False
            await asyncio.sleep(probe.period)

    async def _readiness(self, probe: plan.Probe) -> None:
        await asyncio.sleep(probe.initial_delay)
        successes = failures = 0
        while True:
            if await self._check(probe):
                successes, failures = successes + 1, 0
                if successes >= probe.success_threshold and not self.state.ready:
                    self.set(ready=True)
            else:
                successes, failures = 0, failures + 1
                if failures >= probe.failure_threshold and self.state.ready:
                    self.set(ready=False)
            await asyncio.sleep(probe.period)

    async def _check(self, probe: plan.Probe) -> bool:
        try:
            if probe.kind == "httpGet":
                url = f"{probe.scheme.lower()}://{probe.host}:{probe.port}{probe.path}"
                timeout = aiohttp.ClientTimeout(total=probe.timeout)
                async with self.pod.kubelet.http.get(url, headers=dict(probe.headers), timeout=timeout,
                                                     ssl=False) as response:
                    return 200 <= response.status < 400
            if probe.kind in ("tcpSocket", "grpc"):
                _, writer = await asyncio.wait_for(asyncio.open_connection(probe.host, probe.port), probe.timeout)
                writer.close()
                return True
            command = plan.resolve_command(probe.command, self.names)
            if command is None:
                return False
            process = await asyncio.create_subprocess_exec(
                *command, env=self.env, cwd=self.pod.directory, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
            try:
                return await asyncio.wait_for(process.wait(), probe.timeout) == 0
            except TimeoutError:
                await kill_group(process.pid, 0)
                return False
        except (OSError, TimeoutError, aiohttp.ClientError):
            return False


class PodWorker:
    """One pod the runner owns: its containers, its token, its status writes."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.facts = plan.PodFacts.of(pod)
        self.directory = kubelet.state / "pods" / f"{self.facts.namespace}_{self.facts.name}_{self.facts.uid}"
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        self.containers = []
        for spec in (pod.get("spec") or {}).get("containers") or []:
            runner = ContainerRunner(self, spec)
            # A restarted runner keeps counting where the pod's status left off.
            count = int((previous.get(runner.name) or {}).get("restartCount") or 0)
            runner.state = dataclasses.replace(runner.state, restart_count=count)
            self.containers.append(runner)
        self._dirty = asyncio.Event()
        self.terminating = False
        self._tasks: list[asyncio.Task[None]] = []
        self._kubeconfig: Path | None = None

    def start(self) -> None:
        self._tasks = [asyncio.create_task(c.run()) for c in self.containers]
        self._tasks.append(asyncio.create_task(self._write_status()))
        self.status_changed()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(c.stop() for c in self.containers), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def terminate(self) -> None:
        """The pod got its deletionTimestamp: stop its containers in parallel, each within the pod's
        grace period, then remove the pod object (grace 0, this incarnation only), as the kubelet does."""
        self.terminating = True
        grace = plan.termination_grace_seconds(self.pod)
        log.info("terminating pod %s/%s (grace %ds)", self.facts.namespace, self.facts.name, grace)
        await asyncio.gather(*(c.terminate(grace) for c in self.containers), return_exceptions=True)
        await self.stop()
        await self.kubelet.delete_now(self.facts)

    def status_changed(self) -> None:
        self._dirty.set()

    async def _write_status(self) -> None:
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import PatchType

        while True:
            await self._dirty.wait()
            self._dirty.clear()
            conditions = (self.pod.get("status") or {}).get("conditions") or []
            patch = plan.pod_status_patch([c.state for c in self.containers], now_rfc3339(), conditions)
            try:
                await self.kubelet.client.patch(
                    Pod.Status, self.facts.name, patch, namespace=self.facts.namespace,
                    patch_type=PatchType.STRATEGIC,
                )
            except ApiError as error:
                if error.status.code == 404:
                    return
                log.warning("status of %s/%s not written: %s", self.facts.namespace, self.facts.name, error)
                await asyncio.sleep(1)
                self._dirty.set()
            except (httpx2.TransportError, OSError) as error:
                # The API server is unreachable (restarting): this writer must outlive it, or the pod
                # would keep its last status (ContainerCreating, not Ready) for ever.
                log.warning("status of %s/%s not written (%r); retrying", self.facts.namespace, self.facts.name, error)
                await asyncio.sleep(1)
                self._dirty.set()
                continue
            # Conditions keep their transition times: remember what was written.
            self.pod.setdefault("status", {})["conditions"] = patch["status"]["conditions"]

    async def publish_logs(self) -> None:
        files = {c.name: f for c in self.containers if (f := c.log_files()) is not None}
        await self.kubelet.apply_logs(plan.logs_object(self.facts, files))

    # -- what runs ------------------------------------------------------------------------------

    async def launch(self, container: ContainerRunner) -> Launch:
        spec = container.spec
        pod_spec = self.pod.get("spec") or {}
        lookup = await self.kubelet.lookup_for(self.facts.namespace, spec, plan.volume_refs(pod_spec, spec))
        env = plan.container_env(spec, self.facts, lookup)
        assert container.kind is not None
        argv = plan.container_argv(spec, container.kind, env)
        local = self._materialise_volumes(plan.mounted_files(pod_spec, spec, lookup), container.name)
        argv = [plan.rewrite_mount_paths(arg, local) for arg in argv]
        env = {name: plan.rewrite_mount_paths(value, local) for name, value in env.items()}
        base = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.facts.name,
            STATE_ENV: str(self.kubelet.state),
            POD_UID_ENV: self.facts.uid,
        }
        for passthrough in ("ARGOSY_CACHE_DIR", "XDG_CACHE_HOME"):
            if passthrough in os.environ:
                base[passthrough] = os.environ[passthrough]
        if container.kind == "vllm":
            return await self._launch_vllm(container, argv, base, env)
        kubeconfig = await self._service_account_kubeconfig()
        program = argv[0] if "/" in argv[0] else str(BIN / argv[0])
        argv = [program, *plan.bind_to_pod_ip(argv[1:], self.facts.pod_ip)]
        extra = plan.argosy_env(container.kind, self.facts.pod_ip, str(kubeconfig))
        notes = [f"{container.kind} from this checkout's virtualenv, as ServiceAccount "
                 f"{self.facts.namespace}/{self.facts.service_account} (token in {kubeconfig})"]
        return Launch(argv=argv, env={**base, **env, **extra}, notes=notes)

    def _materialise_volumes(self, mounts: Mapping[str, Mapping[str, str]], container: str) -> dict[str, str]:
        """Write ConfigMap/Secret volume files under the pod's directory; mountPath -> local path."""
        local: dict[str, str] = {}
        for index, (mount_path, files) in enumerate(sorted(mounts.items())):
            directory = self.directory / "volumes" / container / str(index)
            directory.mkdir(parents=True, exist_ok=True)
            for relative, content in files.items():
                target = directory / (relative or Path(mount_path).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
            single = list(files) == [""]
            local[mount_path] = str(directory / Path(mount_path).name) if single else str(directory)
        return local

    async def _launch_vllm(
        self, container: ContainerRunner, argv: list[str], base: dict[str, str], env: dict[str, str]
    ) -> Launch:
        serve = plan.split_vllm_serve(argv)
        if serve is None and not plan.is_shell_script(argv):
            raise plan.ContainerConfigError(
                f"the vLLM image runs `vllm serve ...` or a `/bin/sh -c` script, not {argv[:2]}")
        owner = await self.kubelet.owner_annotations(self.facts)
        labels = await self.kubelet.namespace_labels(self.facts.namespace)
        backend = plan.choose_backend(self.facts.annotations, owner, labels, self.kubelet.default_backend)
        if backend == "none":
            return Launch(argv=[], env={}, notes=[])
        if serve is None:
            return await self._launch_vllm_script(container, argv, base, env, backend)
        if backend == "simulator":
            sim = [str(BIN / "argosy-vllm-sim"), *plan.simulator_args(serve, self.facts.pod_ip)]
            note = f"the vLLM simulator stands in for `vllm serve` ({plan.BACKEND_KEY}=simulator)"
            return Launch(argv=sim, env={**base, **env}, notes=[note])
        runtime, model_dir = await self._vllm_runtime(container)
        real = plan.vllm_serve_args(serve, self.facts.pod_ip, str(model_dir))
        vllm_env = {
            **base, **env, **runtime.runtime_env(),
            "VLLM_HOST_IP": self.facts.pod_ip,
            "HF_HUB_OFFLINE": "1",
            # The image's python3 (the one vLLM is installed in) for its hooks and exec probes.
            "PATH": env.get("PATH") or f"{runtime.runtime_python().parent}:{base['PATH']}",
        }
        notes = ["vLLM's CPU build runs this pod's `vllm serve`", *real.substitutions]
        return Launch(argv=[*runtime.vllm_command(), "serve", *real.args], env=vllm_env, notes=notes)

    async def _vllm_runtime(self, container: ContainerRunner) -> tuple[Any, Path]:
        if not await self.kubelet.vllm_ready():
            container.set(waiting_reason="ContainerCreating",
                          waiting_message="installing vLLM's CPU runtime and making the stand-in model (first use; "
                                          "progress in the sandbox's pod-runner.log)")
        return await self.kubelet.vllm_runtime()

    async def _launch_vllm_script(
        self, container: ContainerRunner, argv: list[str], base: dict[str, str], env: dict[str, str],
        backend: plan.Backend,
    ) -> Launch:
        """A group member's `/bin/sh -c` script, run as written: cluster DNS names resolved to pod IPs, and
        the image's `vllm` and `python3` on its PATH standing in with the CPU runtime or the simulator."""
        script = plan.script_launch(argv, env, await self.kubelet.dns_records(self.facts.namespace))
        simulator = str(BIN / "argosy-vllm-sim")
        extra: dict[str, str] = {}
        if backend == "real":
            runtime, model_dir = await self._vllm_runtime(container)
            image = plan.ImageVllm("real", self.facts.pod_ip, simulator, str(model_dir),
                                   tuple(runtime.vllm_command()))
            python3 = str(runtime.runtime_python())
            extra = {**runtime.runtime_env(), "HF_HUB_OFFLINE": "1"}
        else:
            image = plan.ImageVllm("simulator", self.facts.pod_ip, simulator)
            python3 = sys.executable
        tools = self.directory / "image-bin" / container.name
        tools.mkdir(parents=True, exist_ok=True)
        for name, text in plan.image_tools(python3, sys.executable).items():
            (tools / name).write_text(text)
            (tools / name).chmod(0o755)
        launch_env = {**base, **script.env, **extra, **image.env(), "PATH": f"{tools}:{base['PATH']}"}
        return Launch(argv=script.argv, env=launch_env, notes=script.notes, names=script.names)

    async def _service_account_kubeconfig(self) -> Path:
        if self._kubeconfig is not None:
            return self._kubeconfig
        token = await self.kubelet.service_account_token(self.facts)
        document = plan.token_kubeconfig(
            self.kubelet.server, self.kubelet.ca_data, token,
            f"system:serviceaccount:{self.facts.namespace}:{self.facts.service_account}",
        )
        path = self.directory / "kubeconfig"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        path.chmod(0o600)
        self._kubeconfig = path
        return path


class Kubelet:
    """Watches every pod; runs the containers of the pods it owns."""

    def __init__(self, state: Path, kubeconfig: Path, health_port: int, default_backend: str) -> None:
        self.state = state
        self.kubeconfig_path = kubeconfig
        self.health_port = health_port
        self.default_backend = default_backend
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = str(cluster["server"])
        self.ca_data = str(cluster["certificate-authority-data"])
        self.workers: dict[str, PodWorker] = {}
        self.terminations: dict[str, asyncio.Task[None]] = {}
        self.synced = False
        self._runtime_lock = asyncio.Lock()
        self._logs_resource: Any = None
        self._lld_resource: Any = None

    async def run(self, stop: asyncio.Event) -> None:
        from lightkube import AsyncClient, KubeConfig

        self.client = AsyncClient(KubeConfig.from_file(self.kubeconfig_path), field_manager=FIELD_MANAGER)
        self.http = aiohttp.ClientSession()
        site = await self._serve_health()
        for pid in container_pids_of(self.state):
            log.info("stopping container process %d left by an earlier pod runner", pid)
            with contextlib.suppress(ProcessLookupError):
                # Its group is the container's: the main process may be gone, a child it started not.
                await kill_group(os.getpgid(pid), STOP_GRACE_SECONDS)
        tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._resync())]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for termination in self.terminations.values():
                termination.cancel()
            await asyncio.gather(*self.terminations.values(), return_exceptions=True)
            await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
            await self.http.close()
            await site.cleanup()

    async def _serve_health(self) -> web.AppRunner:
        async def healthz(_: web.Request) -> web.Response:
            return web.Response(status=200 if self.synced else 503, text="ok" if self.synced else "syncing")

        async def pods(_: web.Request) -> web.Response:
            listing = {
                uid: {"namespace": w.facts.namespace, "name": w.facts.name,
                      "containers": {c.name: dataclasses.asdict(c.state) for c in w.containers}}
                for uid, w in self.workers.items()
            }
            return web.json_response(listing)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/pods", pods)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.health_port).start()
        return runner

    async def _watch(self) -> None:
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import OnErrorAction, OnErrorResult

        def retry(error: Exception, count: int) -> OnErrorResult:
            log.warning("pod watch failed (%s); retrying", error)
            return OnErrorResult(OnErrorAction.RETRY, sleep=min(5, count))

        while True:
            try:
                async for event, pod in self.client.watch(Pod, namespace="*", on_error=retry):
                    self.synced = True
                    await self.on_pod(event, pod.to_dict())
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch driver retries HTTP errors; anything else: start over
                log.exception("pod watch stopped; starting over")
                await asyncio.sleep(1)

    async def _resync(self) -> None:
        """A deletion missed while the watch reconnected still stops its processes."""
        from lightkube.resources.core_v1 import Pod

        while True:
            try:
                # Only workers that ran before the LIST began: one started while a long LIST was
                # read (thousands of pods) is missing from it without being gone.
                before = set(self.workers)
                seen = {pod.metadata.uid async for pod in self.client.list(Pod, namespace="*")}
                self.synced = True
                for uid in before - seen:
                    await self._drop(uid)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("pod resync failed: %s", error)
            await asyncio.sleep(RESYNC_SECONDS)

    async def on_pod(self, event: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        status = pod.get("status") or {}
        worker = self.workers.get(uid)
        if event != "DELETED" and pod["metadata"].get("deletionTimestamp") and plan.runs_containers(pod):
            self._terminate(uid, pod)
            return
        gone = event == "DELETED" or bool(pod["metadata"].get("deletionTimestamp")) or status.get("phase") in (
            "Succeeded", "Failed")
        if gone:
            if worker is not None:
                await self._drop(uid)
            return
        if worker is not None:
            worker.pod = pod
            return
        bound = bool((pod.get("spec") or {}).get("nodeName"))
        if bound and status.get("podIP") and status.get("phase") == "Running" and plan.runs_containers(pod):
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            log.info("running pod %s/%s on %s", worker.facts.namespace, worker.facts.name, worker.facts.pod_ip)
            worker.start()

    def _terminate(self, uid: str, pod: dict[str, Any]) -> None:
        """Stop a deleted pod's containers in the background (a drain takes up to its grace period)."""
        if uid in self.terminations:
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.pod = pod
            job = worker.terminate()
        else:  # nothing runs for it (not started yet, or a pod runner restarted): only the object is left
            job = self.delete_now(plan.PodFacts.of(pod))

        async def run() -> None:
            try:
                await job
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("terminating pod %s failed", uid)
            finally:
                self.workers.pop(uid, None)
                self.terminations.pop(uid, None)

        self.terminations[uid] = asyncio.create_task(run())

    async def delete_now(self, facts: plan.PodFacts) -> None:
        """Remove the pod object once its containers are gone: grace 0, with a UID precondition so a
        same-named successor (a StatefulSet's) is never touched."""
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Pod

        # lightkube's delete() sends no DeleteOptions body, where preconditions live: its generic client does.
        generic = self.client._client
        request = generic.prepare_request("delete", res=Pod, name=facts.name, namespace=facts.namespace)
        request.data = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                        "preconditions": {"uid": facts.uid}}
        try:
            response = await generic.send(generic.build_adapter_request(request))
            generic.handle_response("delete", response, request)
        except ApiError as error:
            if error.status.code not in (404, 409):
                raise
        log.info("deleted pod %s/%s", facts.namespace, facts.name)

    async def _drop(self, uid: str) -> None:
        worker = self.workers.pop(uid, None)
        if worker is not None:
            log.info("stopping pod %s/%s", worker.facts.namespace, worker.facts.name)
            await worker.stop()

    # -- API lookups for the workers ---------------------------------------------------------------

    async def lookup_for(
        self, namespace: str, container: Mapping[str, Any], volumes: list[tuple[str, str]]
    ) -> plan.Lookup:
        """Fetch the Secrets and ConfigMaps a container's env and volumes name, for the pure resolvers."""
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import ConfigMap, Secret

        wanted: set[tuple[str, str]] = set(volumes)
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                wanted.add(("Secret", str(source["secretRef"].get("name", ""))))
            if "configMapRef" in source:
                wanted.add(("ConfigMap", str(source["configMapRef"].get("name", ""))))
        for item in container.get("env") or []:
            value_from = item.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                wanted.add(("Secret", str(value_from["secretKeyRef"].get("name", ""))))
            if "configMapKeyRef" in value_from:
                wanted.add(("ConfigMap", str(value_from["configMapKeyRef"].get("name", ""))))
        found: dict[tuple[str, str], dict[str, str]] = {}
        for kind, name in wanted:
            try:
                if kind == "Secret":
                    secret = await self.client.get(Secret, name, namespace=namespace)
                    found[(kind, name)] = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
                else:
                    config_map = await self.client.get(ConfigMap, name, namespace=namespace)
                    found[(kind, name)] = dict(config_map.data or {})
            except ApiError as error:
                if error.status.code != 404:
                    raise plan.ContainerConfigError(f"reading {kind} {name!r}: {error}") from error

        def lookup(kind: str, name: str) -> Mapping[str, str] | None:
            return found.get((kind, name))

        return lookup

    async def service_account_token(self, facts: plan.PodFacts) -> str:
        """A TokenRequest for the pod's ServiceAccount, bound to the pod (as the kubelet projects it)."""
        from lightkube.core.exceptions import ApiError
        from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import ServiceAccountToken

        request = ServiceAccountToken(
            metadata=ObjectMeta(name=facts.service_account, namespace=facts.namespace),
            spec=TokenRequestSpec(
                audiences=[], expirationSeconds=TOKEN_SECONDS,
                boundObjectRef=BoundObjectReference(apiVersion="v1", kind="Pod", name=facts.name, uid=facts.uid),
            ),
        )
        try:
            answer = await self.client.create(request, facts.service_account, namespace=facts.namespace)
        except ApiError as error:
            raise plan.ContainerConfigError(
                f"no token for ServiceAccount {facts.namespace}/{facts.service_account}: {error.status.message}"
            ) from error
        return str(answer.status.token)

    async def owner_annotations(self, facts: plan.PodFacts) -> dict[str, str]:
        from lightkube.core.exceptions import ApiError
        from lightkube.generic_resource import create_namespaced_resource

        name = facts.labels.get(plan.VLLM_SERVED_NAME_LABEL)
        if not name:
            return {}
        if self._lld_resource is None:
            self._lld_resource = create_namespaced_resource(
                "argosy.dev", "v1alpha1", "LLMDeployment", "llmdeployments")
        try:
            owner = await self.client.get(self._lld_resource, name, namespace=facts.namespace)
        except ApiError:
            return {}
        return dict(owner.metadata.annotations or {})

    async def dns_records(self, namespace: str) -> dict[str, str]:
        """The pod names cluster DNS would answer in `namespace` (kubelet_plan.pod_dns_records)."""
        from lightkube.resources.core_v1 import Pod, Service

        pods = [pod.to_dict() async for pod in self.client.list(Pod, namespace=namespace)]
        services = [service.to_dict() async for service in self.client.list(Service, namespace=namespace)]
        return plan.pod_dns_records(pods, services)

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Namespace

        try:
            found = await self.client.get(Namespace, namespace)
        except ApiError:
            return {}
        return dict(found.metadata.labels or {})

    async def apply_logs(self, document: dict[str, Any]) -> None:
        from lightkube.core.exceptions import ApiError
        from lightkube.generic_resource import create_namespaced_resource

        if self._logs_resource is None:
            self._logs_resource = create_namespaced_resource("kwok.x-k8s.io", "v1alpha1", "Logs", "logs")
        try:
            await self.client.apply(self._logs_resource.from_dict(document), force=True)
        except ApiError as error:
            log.warning("kubectl logs will not find %s: %s", document["metadata"]["name"], error)

    async def vllm_ready(self) -> bool:
        from . import standin_model, vllm_runtime

        return vllm_runtime.is_installed() and standin_model.is_made()

    async def vllm_runtime(self) -> tuple[Any, Path]:
        """vLLM's CPU build and the stand-in model; installed on first use (with progress in the pod's log)."""
        from . import standin_model, vllm_runtime

        async with self._runtime_lock:
            try:
                await asyncio.to_thread(vllm_runtime.ensure_runtime, log.info)
                model_dir = await asyncio.to_thread(standin_model.ensure_model, log.info)
            except Exception as error:
                raise plan.ContainerConfigError(f"the vLLM CPU runtime could not be prepared: {error}") from error
        return vllm_runtime, Path(model_dir)


def main(state: Path, kubeconfig: Path, health_port: int, default_backend: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "aiohttp.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Kubelet(state, kubeconfig, health_port, default_backend).run(stop)

    asyncio.run(run())
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll until true or the deadline passes (for callers that wait on the sandbox)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def runner_pods(health_port: int) -> dict[str, Any]:
    """What the running pod runner reports about its pods (GET /pods on its health port)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/pods", timeout=5) as response:
        return dict(json.loads(response.read()))

