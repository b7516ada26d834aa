"""Which replica stored which Responses API response. Pure and bounded.

vLLM keeps a stored response in the memory of the replica that produced it, so
``GET /v1/responses/{id}`` (and cancel) must reach that replica. The gateway remembers
``response id -> (model, endpoint)`` for the responses it proxied, reading the id from the
first bytes of the answer (the JSON body, or the ``response.created`` event of a stream).
The oldest entries are forgotten first; a forgotten or unknown id answers 404.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEFAULT_CAPACITY: Final = 100_000
# vLLM's ids are "resp_" + hex; the first one in the answer is the response's own id
# (output items have other prefixes: msg_, rs_, fc_, ...).
_RESPONSE_ID: Final = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
_SCAN_BYTES: Final = 8192


@dataclass(frozen=True, slots=True)
class StoredResponse:
    model: str
    endpoint: str


def response_id(first_bytes: bytes) -> str | None:
    """The response id in the first bytes of an answer, or None."""
    match = _RESPONSE_ID.search(first_bytes, 0, _SCAN_BYTES)
    return match.group(1).decode("ascii") if match else None


class ResponseLocations:
    """A bounded map of response id to where it is stored, oldest forgotten first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def remember(self, model: str, endpoint: str, first_bytes: bytes) -> str | None:
        identifier = response_id(first_bytes)
        if identifier is None:
            return None
        self._entries[identifier] = StoredResponse(model, endpoint)
        self._entries.move_to_end(identifier)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return identifier

    def get(self, identifier: str) -> StoredResponse | None:
        return self._entries.get(identifier)

    def forget(self, identifier: str) -> None:
        self._entries.pop(identifier, None)

    def __len__(self) -> int:
        return len(self._entries)
