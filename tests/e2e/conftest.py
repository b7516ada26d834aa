"""The Cluster fixture the operator's e2e files share (the CRD fixture is in tests/conftest.py)."""

from test_operator import cluster  # noqa: F401
