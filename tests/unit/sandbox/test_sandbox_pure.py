"""The sandbox's pure parts: the generated Kubernetes wrapper module, version stamps, node pools."""

from __future__ import annotations

from pathlib import Path

import pytest
from argosy_sandbox import versions
from argosy_sandbox.build import GOMOD_DIR, kubernetes_ldflags
from argosy_sandbox.gomod import kubernetes_wrapper_gomod, staging_modules, staging_version
from argosy_sandbox.pools import DEFAULT_POOLS, PoolConfigError, load_pools, node_manifests

UPSTREAM_GOMOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
\tgithub.com/spf13/cobra v1.10.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/kube-aggregator => ./staging/src/k8s.io/kube-aggregator
)
"""


def test_wrapper_replaces_every_staging_module_with_its_release() -> None:
    text = kubernetes_wrapper_gomod("v1.36.3", UPSTREAM_GOMOD)
    assert "require k8s.io/kubernetes v1.36.3" in text
    for module in ("k8s.io/api", "k8s.io/client-go", "k8s.io/kube-aggregator"):
        assert f"\t{module} => {module} v0.36.3" in text
    assert "./staging" not in text
    assert "go 1.26.0" in text


def test_staging_list_comes_from_the_upstream_file_not_a_typed_list() -> None:
    assert staging_modules(UPSTREAM_GOMOD) == ["k8s.io/api", "k8s.io/client-go", "k8s.io/kube-aggregator"]
    with pytest.raises(ValueError, match="no staging"):
        kubernetes_wrapper_gomod("v1.36.3", "module k8s.io/kubernetes\n")


def test_staging_version_refuses_non_release_versions() -> None:
    assert staging_version("v1.36.3") == "v0.36.3"
    with pytest.raises(ValueError):
        staging_version("1.36")


def test_committed_wrapper_module_matches_the_pinned_version() -> None:
    gomod = (GOMOD_DIR / "kubernetes" / "go.mod").read_text()
    assert f"require k8s.io/kubernetes {versions.KUBERNETES}" in gomod
    release = staging_version(versions.KUBERNETES)
    replaces = [line for line in gomod.splitlines() if "=>" in line]
    assert len(replaces) > 25
    assert all(line.strip().endswith(release) for line in replaces)
    assert (GOMOD_DIR / "kubernetes" / "go.sum").stat().st_size > 0
    assert f"go.etcd.io/etcd/server/v3 {versions.ETCD}" in (GOMOD_DIR / "etcd" / "go.mod").read_text()


def test_version_stamp_matches_upstream_variables() -> None:
    flags = kubernetes_ldflags("v1.36.3", "2026-01-01T00:00:00Z")
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/component-base/version.gitMinor=36" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMajor=1" in flags


def test_default_pools_carry_gpu_feature_discovery_labels_and_taints() -> None:
    nodes = {node["metadata"]["name"]: node for node in node_manifests(DEFAULT_POOLS)}
    assert len(nodes) == 9
    h100 = nodes["h100-0"]
    assert h100["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert h100["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81559"
    assert h100["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert h100["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    assert nodes["a100-1"]["metadata"]["labels"]["nvidia.com/gpu.memory"] == "40960"
    assert nodes["l4-3"]["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in nodes["cpu-0"]["status"]["allocatable"]
    assert nodes["cpu-0"]["spec"]["taints"] == []


def test_pools_file_is_loaded_and_mistakes_are_named(tmp_path: Path) -> None:
    good = tmp_path / "pools.yaml"
    good.write_text(
        "pools:\n- name: b200\n  nodes: 3\n  gpu: {product: NVIDIA-B200, memoryMiB: 183359, count: 8}\n"
    )
    [pool] = load_pools(good)
    assert pool.nodes == 3 and pool.gpu is not None and pool.gpu.memory_mib == 183359

    typo = tmp_path / "typo.yaml"
    typo.write_text("pools:\n- name: x\n  nodes: 1\n  gpus: {}\n")
    with pytest.raises(PoolConfigError, match=r"pools\[0\].*unknown keys \['gpus'\]"):
        load_pools(typo)

    missing = tmp_path / "missing.yaml"
    missing.write_text("pools:\n- name: x\n  nodes: 1\n  gpu: {product: P, count: 8}\n")
    with pytest.raises(PoolConfigError, match="memoryMiB"):
        load_pools(missing)
