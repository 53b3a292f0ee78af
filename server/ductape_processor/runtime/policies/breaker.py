"""The circuit breaker: stop calling an upstream that keeps failing, probe it again after a cool-down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ductape_processor.errors import Unavailable
from ductape_processor.reasons import Reason


class CircuitOpen(Unavailable, reason=Reason.CIRCUIT_OPEN):
    """The upstream failed too often lately; calls are refused until a probe succeeds."""


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `cooldown_s` one probe is let through (half-open).

    A success closes it; a failed probe opens it for another cool-down.
    """

    threshold: int = 5
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = field(default=False)

    def before_call(self, name: str) -> None:
        """Raise CircuitOpen unless a call may go out now."""
        if self.opened_at is None:
            return
        if self.probing or self.clock() - self.opened_at < self.cooldown_s:
            retry_in = max(self.cooldown_s - (self.clock() - self.opened_at), 0.0)
            raise CircuitOpen(
                f"{name} failed {self.failures} times in a row; calls resume after a probe in {retry_in:.1f}s",
                metadata={"upstream": name},
                retry_after_s=retry_in,
            )
        self.probing = True

    def success(self) -> None:
        """The call went through: close the circuit."""
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        """The call failed (unreachable, timed out, or a retryable status)."""
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False

    def release(self) -> None:
        """A probe ended without a verdict (e.g. cancelled): let the next call probe."""
        self.probing = False
