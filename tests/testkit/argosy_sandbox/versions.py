"""Pinned versions of the upstream components the sandbox builds.

Bumping one of these is the whole upgrade: the cache is keyed by version, and the
Kubernetes wrapper go.mod is regenerated with `python -m argosy_sandbox gomod`.
"""

ETCD = "v3.6.16"
KUBERNETES = "v1.36.3"
KWOK = "v0.8.0"
HELM = "v4.3.1"
