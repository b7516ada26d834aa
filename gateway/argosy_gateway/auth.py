"""API keys: a YAML file of sha256-hashed keys, each with an optional model allow-list
and a requests-per-minute limit.

File format (the same file can be a mounted Kubernetes Secret key)::

    keys:
      - name: team-a
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: [llama-8b]          # optional; absent = every model
        requestsPerMinute: 600      # optional; absent = unlimited

Pure parsing and lookup; reading the file is the caller's job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key of the keys file. ``sha256`` identifies it (rate-limit buckets are keyed by it);
    ``name`` is only a label for logs and metrics, and two keys may share it."""

    name: str
    models: frozenset[str] | None = None
    requests_per_minute: int | None = None
    sha256: str = ""

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class KeyStore:
    by_hash: Mapping[str, ApiKey]

    def lookup(self, presented_key: str) -> ApiKey | None:
        digest = hashlib.sha256(presented_key.encode("utf-8", "surrogatepass")).hexdigest()
        # Looking up the digest (not the key) means lookup timing reveals nothing about the key.
        return self.by_hash.get(digest)


def hash_key(key: str) -> str:
    """The value to write in the keys file for a plain API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys_file(text: str) -> KeyStore:
    """Parse the keys YAML; raise ValueError naming the first problem."""
    document: Any = yaml.safe_load(text) or {}
    if not isinstance(document, dict) or not isinstance(document.get("keys", []), list):
        raise ValueError("the keys file must be a mapping with a 'keys' list")
    by_hash: dict[str, ApiKey] = {}
    for index, entry in enumerate(document.get("keys") or []):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping")
        name = entry.get("name")
        digest = entry.get("sha256")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string")
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest.lower()):
            raise ValueError(f"{where}.sha256 must be 64 hex digits (sha256 of the key)")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise ValueError(f"{where}.models must be a list of model names")
        rpm = entry.get("requestsPerMinute")
        if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 1):
            raise ValueError(f"{where}.requestsPerMinute must be a positive integer")
        if digest.lower() in by_hash:
            raise ValueError(f"{where}: the same key hash appears twice")
        by_hash[digest.lower()] = ApiKey(name, frozenset(models) if models is not None else None, rpm, digest.lower())
    return KeyStore(MappingProxyType(by_hash))


def bearer_token(authorization: bytes | None) -> str | None:
    """The key from an ``Authorization: Bearer <key>`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip().decode("latin-1")
