"""The planner's one error type."""

from __future__ import annotations

from typing import Literal

PlacementReason = Literal[
    "InsufficientGpuMemory",
    "NoMatchingGpus",
    "InvalidParallelism",
    "UnknownModel",
    "ModelFactsUnavailable",
    "MaxModelLenTooLong",
]


class PlacementError(Exception):
    """No placement is possible. `reason` is a CamelCase condition reason, `message` one sentence."""

    def __init__(self, reason: PlacementReason, message: str) -> None:
        super().__init__(message)
        self.reason: PlacementReason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"PlacementError({self.reason!r}, {self.message!r})"
