"""Background rounds: work the processor repeats every few seconds (the registry's poll, the session revocations,
the store's purge), each in a task of its own from `start` until `stop`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import Any

from ductape_processor.runtime.policies.clock import Clock, SystemClock

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` (nothing when None) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def end_within(tasks: Collection[asyncio.Future[Any]], grace_s: float) -> None:
    """Give `tasks` `grace_s` seconds to end, then cancel those still going and wait until they have ended."""
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)


class PeriodicTask:
    """Runs `work` every `interval_s` seconds (the first time one interval after `start`) until `stop`, on `clock`
    (the system's, unless a test gives its own).

    A round that fails is logged as a warning naming the task, and the next round runs as usual: these rounds read
    or tidy the store, which may be briefly unreachable, and what they keep in memory serves meanwhile.
    """

    def __init__(
        self, name: str, interval_s: float, work: Callable[[], Awaitable[object]], clock: Clock | None = None
    ) -> None:
        self.name = name
        self._interval_s = interval_s
        self._work = work
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the rounds in a background task."""
        self._task = asyncio.get_running_loop().create_task(self._rounds(), name=self.name)

    async def stop(self) -> None:
        """Stop the rounds and wait for the task to end; nothing happens when they were not started."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _rounds(self) -> None:
        never = asyncio.Event()
        while True:
            await self._clock.wait_until(self._clock.now() + timedelta(seconds=self._interval_s), never)
            try:
                await self._work()
            except Exception as exc:
                log.warning("%s failed: %s", self.name, exc)
