"""Deadlines: the time a call (or a retry budget) has left, as a monotonic instant."""

from __future__ import annotations

import time


class Deadline:
    """The time a call has left: the caller's gRPC deadline, if any, as a monotonic instant."""

    __slots__ = ("at",)

    def __init__(self, remaining_s: float | None) -> None:
        self.at = None if remaining_s is None else time.monotonic() + remaining_s

    def remaining(self) -> float | None:
        """Seconds left, or None when the caller set no deadline."""
        return None if self.at is None else self.at - time.monotonic()

    def bound(self, timeout_s: float) -> float:
        """`timeout_s`, shortened to what is left of the deadline."""
        left = self.remaining()
        return timeout_s if left is None else min(timeout_s, left)
