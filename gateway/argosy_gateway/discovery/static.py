"""Static discovery: a YAML file of models and endpoints, reloaded when it changes.

    models:
      - name: llama-8b
        endpoints: [http://10.0.0.7:8000, http://10.0.0.8:8000]
        policy: prefix-affinity        # optional; default: the gateway's default policy

A file that fails to parse keeps the last good table and logs an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from argosy_gateway.discovery import Publish
from argosy_gateway.routetable import POLICY_NAMES, ModelRoute, RouteTable

log = logging.getLogger(__name__)


def parse_static_config(text: str, default_policy: str) -> RouteTable:
    """Build a route table from the YAML text; raise ValueError naming the first problem."""
    try:
        document: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict) or not isinstance(document.get("models", []), list):
        raise ValueError("the file must be a mapping with a 'models' list")
    routes: list[ModelRoute] = []
    for index, entry in enumerate(document.get("models") or []):
        where = f"models[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string")
        endpoints = entry.get("endpoints") or []
        if not isinstance(endpoints, list):
            raise ValueError(f"{where}.endpoints must be a list of URLs")
        urls = tuple(_endpoint_url(f"{where}.endpoints[{i}]", url) for i, url in enumerate(endpoints))
        policy = entry.get("policy") or default_policy
        if policy not in POLICY_NAMES:
            raise ValueError(f"{where}.policy {policy!r} is not one of {', '.join(POLICY_NAMES)}")
        routes.append(ModelRoute(name, tuple(dict.fromkeys(urls)), policy))
    return RouteTable.build(routes)


def _endpoint_url(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or (parts.port is None and ":" in parts.netloc):
        raise ValueError(f"{where} {value!r} must look like http://host:port")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{where} {value!r} must be a base URL without a path")
    return f"{parts.scheme}://{parts.netloc}"


class StaticDiscovery:
    """Polls the file's mtime and size; publishes a new table after each good change."""

    def __init__(self, path: Path, default_policy: str, poll_seconds: float) -> None:
        self._path = path
        self._default_policy = default_policy
        self._poll_seconds = poll_seconds

    async def run(self, publish: Publish) -> None:
        seen: tuple[int, int, int] | None = None
        missing_logged = False
        while True:
            try:
                stat = os.stat(self._path)
            except OSError as exc:
                if not missing_logged:
                    log.error("cannot read the static route file %s: %s", self._path, exc)
                    missing_logged = True
            else:
                missing_logged = False
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if signature != seen:
                    seen = signature
                    self._load(publish)
            await asyncio.sleep(self._poll_seconds)

    def _load(self, publish: Publish) -> None:
        try:
            text = self._path.read_text(encoding="utf-8")
            table = parse_static_config(text, self._default_policy)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.error("keeping the last good routes: %s is invalid: %s", self._path, exc)
            return
        log.info("loaded %d models from %s", len(table.routes), self._path)
        publish(table)
