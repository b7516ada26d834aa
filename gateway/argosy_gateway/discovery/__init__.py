"""Discovery: sources of route tables (a static YAML file, or the Kubernetes API)."""

from __future__ import annotations

from collections.abc import Callable

from argosy_gateway.routetable import RouteTable

Publish = Callable[[RouteTable], None]
"""Discovery calls this with each new table; the first call marks the gateway ready."""
