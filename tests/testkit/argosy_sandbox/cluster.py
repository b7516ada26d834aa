"""Start, check and stop the sandbox's control plane: etcd, kube-apiserver, controller-manager, scheduler, kwok.

Every component runs as its own process group with a pid file under ``<state>/run``
and a log under ``<state>/logs``. ``up`` is idempotent: healthy components are
kept, stale pid files are dropped, unhealthy or half-started components are
restarted. ``down`` stops everything that runs out of this state directory, also
processes whose pid file was lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from . import build, pki
from .kubelet_plan import DEFAULT_BACKEND, LOGS_CRD, POD_UID_ENV, STATE_ENV, kwok_pod_delete_stage, kwok_pod_stages
from .paths import cache_dir, kubectl_path, state_dir
from .pools import DEFAULT_POOLS, POOL_LABEL, NodePool, node_manifests

# Pods get addresses from a loopback /16, so a process bound to a pod's IP is reachable
# from this machine and test traffic never leaves 127.0.0.0/8. Every sandbox on the machine
# (one per checkout, plus the tests' own) gets a /16 of its own: the pod runner binds real
# processes to pod IPs, and two sandboxes handing out the same IP would route into each other.
# 127.64.0.0/16 was once every sandbox's range, so it is left out for sandboxes that still use it.
POD_CIDR_OCTETS = range(65, 255)
POD_CIDR_REGISTRY = "pod-cidrs.json"
NODE_IP = "127.0.0.1"

Reporter = Callable[[str], None]


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SandboxError(RuntimeError):
    """The sandbox could not be brought up; the message says which component and where its log is."""


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int
    pod_runner: int = 0


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # running | unhealthy | stopped
    pid: int | None
    port: int | None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on the port (connections in TIME_WAIT don't count, as for the Go servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


PORT_RELEASE_GRACE = 15.0
"""Seconds a component's recorded port may stay taken before it is given up for another.

A component killed a moment ago can hold its listener a while longer (see `_has_exited`),
and moving a port breaks every client that already read the kubeconfig (a running operator
keeps connecting to the old one), so a port is only moved when it stays taken.
"""


def _port_released(port: int, grace: float) -> bool:
    """Wait up to `grace` seconds for nothing to listen on `port`; True when it is free."""
    deadline = time.monotonic() + grace
    while not port_is_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port below the kernel's ephemeral range.

    Ports the kernel hands out for outgoing connections would be unsafe: after a component
    stops, any client connection on the machine may take its port as a source port, and the
    component could not listen there again.
    """
    low, _ = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(10000, 20000)
    for _ in range(1000):
        port = random.choice(candidates)
        if port not in exclude and port_is_free(port):
            return port
    raise SandboxError("no free port found on 127.0.0.1")


class Sandbox:
    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "pod-runner")

    def __init__(
        self,
        state: Path | None = None,
        pools: tuple[NodePool, ...] = DEFAULT_POOLS,
        report: Reporter = _print,
        control_plane_qps: int | None = None,
        disabled_controllers: tuple[str, ...] = (),
    ) -> None:
        self.state = (state or state_dir()).resolve()
        self.pools = pools
        self.report = report
        # Client QPS of the controller manager and the scheduler (their defaults, 20 and 50, are
        # what a real cluster starts with; a benchmark of a thousand objects raises them).
        self.control_plane_qps = control_plane_qps
        # kube-controller-manager controllers left out (their names as in its --controllers flag).
        self.disabled_controllers = disabled_controllers

    # -- paths -------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def pid_path(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    # -- ports -------------------------------------------------------------------------------

    def _ports_path(self) -> Path:
        return self.state / "ports.json"

    def load_ports(self) -> Ports | None:
        try:
            return Ports(**json.loads(self._ports_path().read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save_ports(self, ports: Ports) -> None:
        self._ports_path().write_text(json.dumps(asdict(ports), indent=2) + "\n")

    def _port_of(self, component: str, ports: Ports) -> int:
        return {
            "etcd": ports.etcd_client,
            "kube-apiserver": ports.apiserver,
            "kube-controller-manager": ports.controller_manager,
            "kube-scheduler": ports.scheduler,
            "kwok": ports.kwok,
            "pod-runner": ports.pod_runner,
        }[component]

    def _choose_ports(self, running: set[str]) -> tuple[Ports, set[str]]:
        """Keep the recorded ports where possible; report and replace any taken by a foreign process.

        Returns the ports and the components whose port changed.
        """
        recorded = self.load_ports()
        fields = list(Ports.__dataclass_fields__)
        owner = {
            "etcd_client": "etcd",
            "etcd_peer": "etcd",
            "apiserver": "kube-apiserver",
            "controller_manager": "kube-controller-manager",
            "scheduler": "kube-scheduler",
            "kwok": "kwok",
            "pod_runner": "pod-runner",
        }
        values: dict[str, int] = {}
        changed: set[str] = set()
        for field_name in fields:
            current = getattr(recorded, field_name) if recorded else None
            current = current or None  # 0: not chosen yet (a state dir from before the pod runner)
            component = owner[field_name]
            if current is not None and (component in running or _port_released(current, PORT_RELEASE_GRACE)):
                values[field_name] = current
                continue
            new = free_port(set(values.values()))
            if current is not None:
                self.report(
                    f"port {current} recorded for {component} is in use by another process; using {new} instead"
                )
                changed.add(component)
            values[field_name] = new
        ports = Ports(**values)
        self._save_ports(ports)
        return ports, changed

    # -- process bookkeeping -------------------------------------------------------------------

    def _pid_of(self, component: str) -> int | None:
        """The live pid of a component started from this state dir; drops stale pid files."""
        path = self.pid_path(component)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self._is_ours(pid):
            return pid
        path.unlink(missing_ok=True)
        return None

    def _is_ours(self, pid: int) -> bool:
        try:
            # Empty for a zombie main thread, whose memory (and command line) is gone already.
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return str(self.state) in cmdline and not _has_exited(pid)

    def orphan_pids(self) -> list[int]:
        """Every live process whose command line points into this state directory."""
        found = []
        marker = str(self.state).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and self._is_ours(int(entry.name)):
                found.append(int(entry.name))
        return found

    @staticmethod
    def _terminate(pid: int, grace: float = 10.0) -> None:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            return
        # Components run in their own process groups; a foreign group is never signalled as a whole.
        target_group = pgid == pid
        try:
            if target_group:
                os.killpg(pgid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if _has_exited(pid):
                return
            time.sleep(0.1)
        try:
            if target_group:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- component definitions -------------------------------------------------------------------

    def _component_kubeconfig(self) -> Path:
        return self.state / "components.kubeconfig"

    def _command(self, component: str, ports: Ports) -> list[str]:
        pki_dir = self.pki_dir
        kubeconfig = str(self._component_kubeconfig())
        if component == "etcd":
            return [
                str(build.ETCD.binary("etcd")),
                "--name=argosy-sandbox",
                f"--data-dir={self.state / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ports.etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{ports.etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-cluster=argosy-sandbox=http://127.0.0.1:{ports.etcd_peer}",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ]
        if component == "kube-apiserver":
            return [
                str(build.KUBERNETES.binary("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.apiserver}",
                f"--cert-dir={self.state / 'apiserver-certs'}",
                f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
                f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
                f"--client-ca-file={pki_dir / 'ca.crt'}",
                f"--token-auth-file={pki_dir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki_dir / 'sa.pub'}",
                f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
                f"--service-cluster-ip-range={pki.SERVICE_CIDR}",
                # No kubelet or kube-proxy: nothing would consume the kubernetes Service's endpoints.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ]
        if component == "kube-controller-manager":
            return [
                str(build.KUBERNETES.binary("kube-controller-manager")),
                f"--kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.controller_manager}",
                f"--cert-dir={self.state / 'controller-manager-certs'}",
                "--leader-elect=false",
                *self._qps_flags(),
                *([f"--controllers=*,{','.join('-' + c for c in self.disabled_controllers)}"]
                  if self.disabled_controllers else []),
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki_dir / 'sa.key'}",
                f"--root-ca-file={pki_dir / 'ca.crt'}",
                "--profiling=false",
                "--v=1",
            ]
        if component == "kube-scheduler":
            return [
                str(build.KUBERNETES.binary("kube-scheduler")),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.scheduler}",
                f"--cert-dir={self.state / 'scheduler-certs'}",
                "--leader-elect=false",
                *self._qps_flags(),
                "--profiling=false",
                "--v=1",
            ]
        if component == "kwok":
            stages = [f"--config={path}" for path in self._kwok_stage_files()]
            return [
                str(build.KWOK.binary("kwok")),
                f"--kubeconfig={kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={self.pod_cidr}",
                f"--node-ip={NODE_IP}",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{ports.kwok}",
                # Nodes advertise kwok's server as their kubelet, so `kubectl logs` reaches it,
                # and kwok reads where each pod's logs are from Logs objects the pod runner writes.
                f"--node-port={ports.kwok}",
                "--enable-crds=Logs",
                *stages,
            ]
        if component == "pod-runner":
            return [
                sys.executable, "-m", "argosy_sandbox", "--state", str(self.state), "pod-runner",
                "--port", str(ports.pod_runner), "--kubeconfig", str(self._component_kubeconfig()),
                "--default-vllm", os.environ.get("ARGOSY_SANDBOX_VLLM", DEFAULT_BACKEND),
            ]
        raise ValueError(component)

    def _kwok_stage_files(self) -> list[Path]:
        """kwok's stock stages, with pod-ready and pod-delete limited to pods the pod runner does not own,
        plus its own start stage for the runner's pods."""
        directory = self.state / "kwok-stages"
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for stock in build.kwok_stage_files():
            if stock.name == "pod-ready.yaml":
                stages = kwok_pod_stages(yaml.safe_load(stock.read_text()))
            elif stock.name == "pod-delete.yaml":
                stages = [kwok_pod_delete_stage(yaml.safe_load(stock.read_text()))]
            else:
                files.append(stock)
                continue
            for index, stage in enumerate(stages):
                path = directory / f"{index}-{stage['metadata']['name']}.yaml"
                text = yaml.safe_dump(stage, sort_keys=False)
                if not path.exists() or path.read_text() != text:
                    path.write_text(text)
                files.append(path)
        return files

    def _qps_flags(self) -> list[str]:
        if self.control_plane_qps is None:
            return []
        return [f"--kube-api-qps={self.control_plane_qps}", f"--kube-api-burst={2 * self.control_plane_qps}"]

    def _ssl_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            return ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def _get(self, url: str, verify: bool = False, token: bool = False) -> tuple[int, str]:
        request = urllib.request.Request(url)
        if token:
            request.add_header("Authorization", f"Bearer {pki.admin_token(self.pki_dir)}")
        context = self._ssl_context(verify) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    def _command_path(self, component: str) -> Path:
        return self.run_dir / f"{component}.command.json"

    def _recorded_command(self, component: str) -> list[str] | None:
        try:
            return list(json.loads(self._command_path(component).read_text()))
        except (OSError, ValueError):
            return None

    def _healthy(self, component: str, ports: Ports) -> bool:
        if component == "etcd":
            code, body = self._get(f"http://127.0.0.1:{ports.etcd_client}/health")
            return code == 200 and '"health":"true"' in body.replace(" ", "")
        if component == "kube-apiserver":
            code, _ = self._get(f"https://127.0.0.1:{ports.apiserver}/readyz", verify=True, token=True)
            return code == 200
        if component == "kube-controller-manager":
            return self._get(f"https://127.0.0.1:{ports.controller_manager}/healthz")[0] == 200
        if component == "kube-scheduler":
            return self._get(f"https://127.0.0.1:{ports.scheduler}/healthz")[0] == 200
        if component == "kwok":
            return self._get(f"http://127.0.0.1:{ports.kwok}/healthz")[0] == 200
        if component == "pod-runner":
            return self._get(f"http://127.0.0.1:{ports.pod_runner}/healthz")[0] == 200
        raise ValueError(component)

    # -- kubeconfig ------------------------------------------------------------------------------

    def _kubeconfig_document(self, ports: Ports) -> dict[str, Any]:
        import base64

        ca = base64.b64encode((self.pki_dir / "ca.crt").read_bytes()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "argosy-sandbox",
                    "cluster": {
                        "server": f"https://127.0.0.1:{ports.apiserver}",
                        "certificate-authority-data": ca,
                    },
                }
            ],
            "users": [{"name": pki.ADMIN_USER, "user": {"token": pki.admin_token(self.pki_dir)}}],
            "contexts": [
                {"name": "argosy-sandbox", "context": {"cluster": "argosy-sandbox", "user": pki.ADMIN_USER}}
            ],
            "current-context": "argosy-sandbox",
        }

    def _write_kubeconfigs(self, ports: Ports) -> None:
        text = yaml.safe_dump(self._kubeconfig_document(ports), sort_keys=False)
        for path in (self.kubeconfig, self._component_kubeconfig()):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o600)
            tmp.replace(path)

    # -- lifecycle -------------------------------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Bring every component up (keeping healthy ones), then the nodes; safe to call concurrently."""
        started = time.monotonic()
        build.ensure_built(report=self.report)
        for directory in (self.state, self.log_dir, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        with (self.state / "up.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._up_locked(timeout)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.report(f"sandbox ready in {time.monotonic() - started:.1f} s")

    def _up_locked(self, timeout: float) -> None:
        pki.ensure_pki(self.pki_dir)
        self.pod_cidr = allocate_pod_cidr(self.state)

        running = {component for component in self.COMPONENTS if self._pid_of(component) is not None}
        ports, changed = self._choose_ports(running)
        self._write_kubeconfigs(ports)
        restart_rest = False
        for component in self.COMPONENTS:
            pid = self._pid_of(component)
            if component in changed:
                # Components after one that moved were started against its old port.
                restart_rest = True
            same_command = self._recorded_command(component) == self._command(component, ports)
            if pid is not None and not restart_rest and same_command and self._healthy(component, ports):
                self.report(f"  {component}: already running (pid {pid}, port {self._port_of(component, ports)})")
                continue
            if pid is not None:
                why = "its command changed" if not same_command else "it was unhealthy or its dependencies moved"
                self.report(f"  {component}: restarting (pid {pid}: {why})")
                self._terminate(pid)
            if component == "kwok":
                self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=argosy-sandbox",
                             "-f", "-", input=json.dumps(LOGS_CRD))
            self._start(component, ports, timeout)
        self.sync_nodes(timeout=timeout)

    def _start(self, component: str, ports: Ports, timeout: float) -> None:
        port = self._port_of(component, ports)
        # A component stopped a moment ago may still be releasing its listener.
        if not _port_released(port, PORT_RELEASE_GRACE):
            raise SandboxError(
                f"{component}: port {port} on 127.0.0.1 is in use by another process; "
                "free it or run `make sandbox-down` and retry"
            )
        log_path = self.log_path(component)
        with log_path.open("a") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {component} ====\n")
            log.flush()
            process = subprocess.Popen(
                self._command(component, ports),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.state,
            )
        self.pid_path(component).write_text(f"{process.pid}\n")
        self._command_path(component).write_text(json.dumps(self._command(component, ports)) + "\n")
        deadline = time.monotonic() + timeout
        began = time.monotonic()
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_path(component).unlink(missing_ok=True)
                raise SandboxError(
                    f"{component} exited with code {process.returncode} while starting; "
                    f"last lines of {log_path}:\n{_tail(log_path)}"
                )
            if self._healthy(component, ports):
                self.report(
                    f"  {component}: started (pid {process.pid}, port {port}) in {time.monotonic() - began:.1f} s"
                )
                return
            time.sleep(0.2)
        self._terminate(process.pid)
        self.pid_path(component).unlink(missing_ok=True)
        raise SandboxError(f"{component} did not become healthy in {timeout:.0f} s; log: {log_path}\n{_tail(log_path)}")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kubectl_path()), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
        )

    def sync_nodes(self, timeout: float = 60.0) -> None:
        """Make the cluster's simulated nodes exactly the configured pools, and wait for them to be Ready."""
        manifests = node_manifests(self.pools)
        ports = self.load_ports()
        if ports is not None:
            for node in manifests:
                node["status"]["daemonEndpoints"] = {"kubeletEndpoint": {"Port": ports.kwok}}
        wanted = {node["metadata"]["name"] for node in manifests}
        existing = {
            node["metadata"]["name"]: node
            for node in json.loads(self.kubectl("get", "nodes", "-l", POOL_LABEL, "-o", "json").stdout)["items"]
        }
        for name in set(existing) - wanted:
            self.kubectl("delete", "node", name, "--wait=false")
        # One apply for every node; status (capacity) only where it differs, so a warm `up` is cheap.
        specs = {"apiVersion": "v1", "kind": "List",
                 "items": [{key: value for key, value in node.items() if key != "status"} for node in manifests]}
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=argosy-sandbox",
                     "-f", "-", input=json.dumps(specs))
        stale = [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node["metadata"]["name"]},
             "status": node["status"]}
            for node in manifests
            if not all(((existing.get(node["metadata"]["name"]) or {}).get("status") or {}).get(key) == value
                       for key, value in node["status"].items())
        ]
        if stale:  # one call for every node's capacity, however many nodes
            self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=argosy-sandbox",
                         "--subresource=status", "-f", "-",
                         input=json.dumps({"apiVersion": "v1", "kind": "List", "items": stale}))
        deadline = time.monotonic() + timeout
        while True:
            not_ready = self._not_ready_nodes(wanted)
            if not not_ready:
                self.report(f"  nodes: {len(wanted)} Ready in {len(self.pools)} pools")
                return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"nodes not Ready after {timeout:.0f} s: {sorted(not_ready)}; kwok log: {self.log_path('kwok')}"
                )
            time.sleep(0.5)

    def _not_ready_nodes(self, wanted: set[str]) -> set[str]:
        listing = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        ready = set()
        for node in listing["items"]:
            for condition in node.get("status", {}).get("conditions", []):
                if condition["type"] == "Ready" and condition["status"] == "True":
                    ready.add(node["metadata"]["name"])
        return wanted - ready

    def down(self) -> list[int]:
        """Stop every process of this sandbox (components, pod runners, anything they started)."""
        stopped = []
        for component in reversed(self.COMPONENTS):
            pid = self._pid_of(component)
            if pid is not None:
                self._terminate(pid)
                stopped.append(pid)
                self.report(f"  {component}: stopped (pid {pid})")
            self.pid_path(component).unlink(missing_ok=True)
        for pid_file in self.run_dir.glob("*.pid") if self.run_dir.exists() else []:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid and self._is_ours(pid):
                self._terminate(pid)
                stopped.append(pid)
                self.report(f"  {pid_file.stem}: stopped (pid {pid})")
            pid_file.unlink(missing_ok=True)
        for pid in container_pids_of(self.state):
            self._terminate(pid)
            stopped.append(pid)
            self.report(f"  stopped container process {pid}")
        for pid in self.orphan_pids():
            self._terminate(pid)
            stopped.append(pid)
            self.report(f"  stopped leftover process {pid}")
        return stopped

    def status(self) -> list[ComponentStatus]:
        ports = self.load_ports()
        result = []
        for component in self.COMPONENTS:
            pid = self._pid_of(component)
            port = self._port_of(component, ports) if ports else None
            if pid is None:
                state = "stopped"
            elif ports is not None and self._healthy(component, ports):
                state = "running"
            else:
                state = "unhealthy"
            result.append(ComponentStatus(component, state, pid, port))
        return result

    def is_up(self) -> bool:
        return all(status.state == "running" for status in self.status())


def allocate_pod_cidr(state: Path) -> str:
    """This sandbox's pod range, ``127.N.0.0/16``: kept once given, never the same as another live sandbox's.

    The machine-wide registry in the cache maps state directories to N; entries of state
    directories that no longer exist are given back.
    """
    registry = cache_dir() / POD_CIDR_REGISTRY
    with build.file_lock(POD_CIDR_REGISTRY + ".lock"):
        try:
            taken = {str(k): int(v) for k, v in json.loads(registry.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            taken = {}
        taken = {path: octet for path, octet in taken.items() if Path(path).exists()}
        octet = taken.get(str(state))
        if octet is None:
            free = [n for n in POD_CIDR_OCTETS if n not in set(taken.values())]
            if not free:
                raise SandboxError(f"every pod range 127.{{65..254}}.0.0/16 is taken; see {registry}")
            octet = free[0]
            taken[str(state)] = octet
            tmp = registry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(taken, indent=1, sort_keys=True) + "\n")
            tmp.replace(registry)
    return f"127.{octet}.0.0/16"


def container_pids_of(state: Path) -> list[int]:
    """Processes the pod runner of this state directory started for pods (marked in their environment)."""
    marker = f"{STATE_ENV}={state}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "stat").read_text()
        except OSError:
            continue
        pod_process = any(item.startswith(POD_UID_ENV.encode() + b"=") for item in environ)
        if marker in environ and pod_process and not _is_zombie(status):
            found.append(int(entry.name))
    return found


def _has_exited(pid: int) -> bool:
    """True when no thread of the process is left running (it is gone, or a zombie whose every thread exited).

    The main thread of a killed multi-threaded process (a Go server) is a zombie as soon as
    it has exited, while its other threads are still exiting and still hold the process's
    files, its listening socket among them; on a busy machine, for seconds. Only when the last
    thread is gone is the socket closed and the port free again.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for task in tasks:
        try:
            if not _is_zombie((task / "stat").read_text()):
                return False
        except OSError:  # that thread is gone meanwhile
            continue
    return True


def _is_zombie(proc_stat: str) -> bool:
    """From the text of /proc/<pid>/stat: the state field (after the command name in parentheses) is Z."""
    return proc_stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
