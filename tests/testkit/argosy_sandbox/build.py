"""Build the sandbox's upstream components from the Go module proxy into a versioned cache.

Each component lands in ``<cache>/bin/<name>/<version>/`` only when its build
succeeded completely (built in a temporary directory, then renamed), so a crash
mid-build never leaves a half-built cache that later runs would trust.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import versions
from .paths import PACKAGE_DIR, cache_dir

GOMOD_DIR = PACKAGE_DIR / "gomod"
COMPLETE_MARKER = ".complete"

# The kwok stage files the sandbox runs with, as shipped inside kwok's own module.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


class BuildError(RuntimeError):
    """A component failed to build; the message names it and its log."""


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin" / self.name / self.version

    @property
    def log_path(self) -> Path:
        return cache_dir() / "logs" / f"build-{self.name}-{self.version}.log"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def is_built(self) -> bool:
        return (self.bin_dir / COMPLETE_MARKER).exists() and all(
            self.binary(name).exists() for name in self.binaries
        )


ETCD = Component("etcd", versions.ETCD, ("etcd",))
KUBERNETES = Component(
    "kubernetes", versions.KUBERNETES, ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
)
KWOK = Component("kwok", versions.KWOK, ("kwok",))
HELM = Component("helm", versions.HELM, ("helm",))
ALL_COMPONENTS = (ETCD, KUBERNETES, KWOK, HELM)


def helm_binary() -> Path:
    """The pinned helm: from the cache, else on PATH, else built now with Go; BuildError without either."""
    if HELM.is_built():
        return HELM.binary("helm")
    found = shutil.which("helm")
    if found:
        return Path(found)
    if shutil.which("go"):
        ensure_built((HELM,))
        return HELM.binary("helm")
    raise BuildError("helm is missing: neither the sandbox's cached helm, `helm` on PATH, nor Go to build it "
                     "(install Go 1.26+ and run `make sandbox-build`)")


def kwok_stage_files() -> list[Path]:
    return [KWOK.bin_dir / "stages" / Path(stage).name for stage in KWOK_STAGES]


Reporter = Callable[[str], None]


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_built(components: tuple[Component, ...] = ALL_COMPONENTS, report: Reporter = _print) -> None:
    """Build whatever is missing from the cache; a no-op when everything is there."""
    missing = [component for component in components if not component.is_built()]
    if not missing:
        return
    if shutil.which("go") is None:
        raise BuildError("the Go toolchain is needed to build the sandbox components: install Go 1.26+")
    with _build_lock():
        missing = [component for component in missing if not component.is_built()]
        for index, component in enumerate(missing, start=1):
            report(
                f"[{index}/{len(missing)}] building {component.name} {component.version} "
                f"({', '.join(component.binaries)}); log: {component.log_path}"
            )
            started = time.monotonic()
            _build(component, report)
            report(f"[{index}/{len(missing)}] {component.name} built in {time.monotonic() - started:.0f} s")


def _build_lock() -> AbstractContextManager[None]:
    return file_lock("build.lock")


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive lock on `<cache>/<name>`: one installer at a time across checkouts."""
    lock_path = cache_dir() / name
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(component: Component, report: Reporter) -> None:
    final = component.bin_dir
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    component.log_path.parent.mkdir(parents=True, exist_ok=True)
    builders = {"etcd": _build_etcd, "kubernetes": _build_kubernetes, "kwok": _build_kwok, "helm": _build_helm}
    try:
        with component.log_path.open("w") as log:
            builders[component.name](staging, log, report)
    except BuildError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except (OSError, subprocess.SubprocessError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise BuildError(f"building {component.name} failed: {error}; log: {component.log_path}") from error
    (staging / COMPLETE_MARKER).write_text(datetime.now(UTC).isoformat() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-mod=readonly")
    return env


def _count_packages(targets: list[str], cwd: Path | None, log) -> int | None:  # type: ignore[no-untyped-def]
    """How many packages `go build -v` will report, for a percentage; None when unknown."""
    result = subprocess.run(
        ["go", "list", "-deps", *targets],
        cwd=cwd,
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    log.write(result.stderr)
    if result.returncode != 0:
        return None
    return len(result.stdout.split())


def _run_go(
    name: str, args: list[str], cwd: Path | None, log, report: Reporter, total: int | None, env=None  # type: ignore[no-untyped-def]
) -> None:
    """Run a go build/install with -v, turning its package lines into progress reports."""
    log.write(f"$ {' '.join(args)}  (in {cwd or os.getcwd()})\n")
    log.flush()
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env or _go_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    compiled = 0
    started = time.monotonic()
    last_report = started
    done = threading.Event()

    def heartbeat() -> None:
        # Linking the big binaries prints nothing for minutes; keep the user informed.
        while not done.wait(30):
            report(f"    {name}: still building ({compiled} packages, {time.monotonic() - started:.0f} s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if not line.startswith(("go: ", "#")) and " " not in line.strip():
                compiled += 1
            now = time.monotonic()
            if now - last_report >= 10:
                last_report = now
                share = f" ({min(99, 100 * compiled // total)}%)" if total else ""
                counted = f"{compiled}/{total}" if total else str(compiled)
                report(f"    {name}: {counted} packages compiled{share}, {now - started:.0f} s")
        code = process.wait()
    finally:
        done.set()
        if process.poll() is None:
            process.kill()
    log.flush()
    if code != 0:
        raise BuildError(f"building {name} failed (go exited {code}); log: {log.name}")


def _build_etcd(out: Path, log, report: Reporter) -> None:  # type: ignore[no-untyped-def]
    module = GOMOD_DIR / "etcd"
    total = _count_packages(["."], module, log)
    _run_go(
        "etcd",
        ["go", "build", "-v", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "."],
        module,
        log,
        report,
        total,
    )


def kubernetes_ldflags(version: str, build_date: str) -> str:
    """Version stamping as upstream's hack/lib/version.sh does it."""
    major, minor = version.lstrip("v").split(".")[:2]
    stamps = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": build_date,
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in stamps.items()]
    return " ".join(flags)


def _build_kubernetes(out: Path, log, report: Reporter) -> None:  # type: ignore[no-untyped-def]
    module = GOMOD_DIR / "kubernetes"
    targets = [f"k8s.io/kubernetes/cmd/{binary}" for binary in KUBERNETES.binaries]
    total = _count_packages(targets, module, log)
    build_date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _run_go(
        "kubernetes",
        [
            "go",
            "build",
            "-v",
            "-trimpath",
            "-ldflags",
            kubernetes_ldflags(versions.KUBERNETES, build_date),
            "-o",
            str(out) + "/",
            *targets,
        ],
        module,
        log,
        report,
        total,
    )


def _module_dir(module: str, version: str, log) -> Path:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    log.write(result.stderr)
    if result.returncode != 0:
        raise BuildError(f"downloading {module}@{version} failed: {result.stdout.strip()}; log: {log.name}")
    return Path(json.loads(result.stdout)["Dir"])


def _go_install(name: str, package: str, version: str, ldflags: str, out: Path, log, report: Reporter) -> None:  # type: ignore[no-untyped-def]
    env = _go_env()
    env["GOBIN"] = str(out)
    env.pop("GOFLAGS", None)
    _run_go(
        name,
        ["go", "install", "-v", "-trimpath", "-ldflags", ldflags, f"{package}@{version}"],
        None,
        log,
        report,
        None,
        env=env,
    )


def _build_kwok(out: Path, log, report: Reporter) -> None:  # type: ignore[no-untyped-def]
    _go_install(
        "kwok",
        "sigs.k8s.io/kwok/cmd/kwok",
        versions.KWOK,
        "-s -w",
        out,
        log,
        report,
    )
    source = _module_dir("sigs.k8s.io/kwok", versions.KWOK, log)
    (out / "stages").mkdir()
    for stage in KWOK_STAGES:
        shutil.copyfile(source / stage, out / "stages" / Path(stage).name)


def _build_helm(out: Path, log, report: Reporter) -> None:  # type: ignore[no-untyped-def]
    _go_install(
        "helm",
        "helm.sh/helm/v4/cmd/helm",
        versions.HELM,
        f"-s -w -X helm.sh/helm/v4/internal/version.version={versions.HELM}",
        out,
        log,
        report,
    )
