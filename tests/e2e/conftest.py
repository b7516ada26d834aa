"""The fixtures the e2e files share (the CRD fixture is in tests/conftest.py): the Cluster and the
operator process (test_operator.py), the gateway process (test_gateway_k8s.py)."""

from test_gateway_k8s import gateway  # noqa: F401
from test_operator import cluster, operator  # noqa: F401
