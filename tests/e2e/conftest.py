"""Fixtures the operator's e2e files share: the CRD applied to the sandbox, and the Cluster helper."""

from test_operator import cluster, crd  # noqa: F401
