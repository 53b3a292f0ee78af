"""Policies that wrap a call to the outside world: retry decisions and backoff, the circuit breaker, deadlines.

One implementation for every resource kind: an executor asks `Retrier` whether and when to try again and asks
`CircuitBreaker` whether to try at all.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import grpc

from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.manifest import RetryPolicy

MAX_RETRY_AFTER_S = 30.0
_RULE = re.compile(r"^(\d{3})(?:-(\d{3}))?$")


class CircuitOpen(ProcessorError):
    """The upstream failed too often lately; calls are refused until a probe succeeds."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "CIRCUIT_OPEN"


@dataclass(frozen=True, slots=True)
class RetryRules:
    """A retry policy compiled for fast decisions."""

    max_retries: int
    exponential: bool
    initial_s: float
    max_interval_s: float
    statuses: frozenset[int]
    network: bool

    @classmethod
    def from_policy(cls, policy: RetryPolicy, retries_override: int | None = None) -> RetryRules:
        """Compile a manifest policy; `retries_override` (the caller's `retries`) replaces its count."""
        statuses: set[int] = set()
        for rule in policy.on:
            match = _RULE.match(rule)
            if match is None:
                continue
            low = int(match.group(1))
            high = int(match.group(2) or low)
            statuses.update(range(low, high + 1))
        return cls(
            max_retries=policy.max if retries_override is None else retries_override,
            exponential=policy.backoff == "exponential",
            initial_s=policy.initial.total_seconds(),
            max_interval_s=policy.max_interval.total_seconds(),
            statuses=frozenset(statuses),
            network="network" in policy.on,
        )

    def delay(self, retry: int, retry_after_s: float | None = None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1-based): full jitter over the backoff, capped.

        A `Retry-After` from the upstream is honoured, bounded by MAX_RETRY_AFTER_S.
        """
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
        base = self.initial_s * (2 ** (retry - 1) if self.exponential else 1)
        capped = min(base, self.max_interval_s)
        # Half fixed, half jitter: spreads retries of many callers without ever waiting (almost) nothing.
        return capped / 2 + capped / 2 * rand()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - (now or datetime.now(UTC))).total_seconds(), 0.0)


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
