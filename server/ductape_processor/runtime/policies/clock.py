"""The clock of background work (the jobs scheduler, webhook deliveries): what time it is, and waiting until a
moment (or a wake-up). Injected, so tests move time on instead of sleeping through it."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Time as background work reads it."""

    def now(self) -> datetime:
        """The current moment (aware, UTC)."""

    async def wait_until(self, moment: datetime, wake: asyncio.Event) -> None:
        """Return at `moment`, or earlier when `wake` is set."""


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """The current moment."""
        return datetime.now(UTC)

    async def wait_until(self, moment: datetime, wake: asyncio.Event) -> None:
        """Sleep until `moment` or until `wake` is set."""
        seconds = (moment - self.now()).total_seconds()
        if seconds > 0 and not wake.is_set():
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when the event is set at the
            # moment its task is cancelled, swallowing the cancellation, and a loop stopped that way never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await wake.wait()
