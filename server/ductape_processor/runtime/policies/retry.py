"""Retrying: which failures an action retries (`RetryRules`), how long to pause (`Backoff`), and the retries of one
operation within the time it may take (`RetryBudget`).

One implementation for actions and the broker adapters: each keeps deciding which of its errors are worth another
attempt and what it raises when it gives up; the pause before the next attempt, and whether that attempt still fits
in the time left, are decided here.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.registry.manifest import RetryPolicy

MAX_RETRY_AFTER_S: Final = 30.0
"""The longest pause an upstream's `Retry-After` may ask for; a longer one is cut to this."""
_RULE = re.compile(r"^(\d{3})(?:-(\d{3}))?$")


@dataclass(frozen=True, slots=True)
class Backoff:
    """The pause before retry number n (1-based): `initial_s`, doubled for each retry when `exponential`, capped at
    `max_s`. With `jitter`, a pause is between half and all of that: retries of many callers spread out, and none
    waits (almost) nothing."""

    initial_s: float
    max_s: float
    exponential: bool = True
    jitter: bool = True

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        base = self.initial_s * (2 ** (retry - 1) if self.exponential else 1)
        capped = min(base, self.max_s)
        return capped / 2 + capped / 2 * rand() if self.jitter else capped


@dataclass(frozen=True, slots=True)
class RetryRules:
    """An action's retry policy, compiled for fast decisions."""

    max_retries: int
    backoff: Backoff
    statuses: frozenset[int]
    network: bool

    @classmethod
    def from_policy(cls, policy: RetryPolicy) -> RetryRules:
        """Compile a manifest policy."""
        statuses: set[int] = set()
        for rule in policy.on:
            match = _RULE.match(rule)
            if match is None:
                continue
            low = int(match.group(1))
            high = int(match.group(2) or low)
            statuses.update(range(low, high + 1))
        return cls(
            max_retries=policy.max,
            backoff=Backoff(
                policy.initial.total_seconds(),
                policy.max_interval.total_seconds(),
                exponential=policy.backoff == "exponential",
            ),
            statuses=frozenset(statuses),
            network="network" in policy.on,
        )


class RetryBudget:
    """The retries of one operation within the time it may take: a `Deadline` (the caller's, or a budget of the
    adapter's own) and a `Backoff`.

    The caller attempts, decides whether its failure is worth another attempt, then awaits `pause()`: it sleeps the
    next pause and returns True, or returns False at once when the attempt after that pause would not start before
    the deadline (the caller then gives up with its own error; `pause_s` is the pause that did not fit).
    """

    __slots__ = ("_backoff", "_deadline", "pause_s", "retries")

    def __init__(self, backoff: Backoff, deadline: Deadline) -> None:
        self._backoff = backoff
        self._deadline = deadline
        self.retries = 0
        """Pauses asked for so far (slept or not): the failed attempts when the caller gives up."""
        self.pause_s = 0.0

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None when there is none."""
        return self._deadline.remaining()

    async def pause(self, retry_after_s: float | None = None) -> bool:
        """Sleep before the next attempt: the backoff's pause, or `retry_after_s` (an upstream's `Retry-After`,
        bounded by MAX_RETRY_AFTER_S) when given. False, without sleeping, when the pause reaches the deadline."""
        self.retries += 1
        if retry_after_s is not None:
            self.pause_s = min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
        else:
            self.pause_s = self._backoff.delay(self.retries)
        left = self._deadline.remaining()
        if left is not None and self.pause_s >= left:
            return False
        await asyncio.sleep(self.pause_s)
        return True


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
