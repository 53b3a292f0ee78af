"""Rounds of claiming due work from the store, for one replica: claim what is due (under a lease, so each piece of
work runs once across replicas), hand it on, and sleep until the store says the next piece falls due.

Waiting is event-driven: a round ends by sleeping until the earliest due moment the store reports, woken earlier by
`wake` (this replica added work) or, on PostgreSQL, by another replica's change on the store's topic
(LISTEN/NOTIFY); a poll every `poll_s` covers a lost notification. A claim that came back full makes the next round
start at once. Used by webhook deliveries (runtime/webhooks/deliveries.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.periodic import PeriodicTask
from ductape_processor.store.base import Store

log = logging.getLogger(__name__)


class ClaimRounds(PeriodicTask):
    """Runs `claim` (True when more may be due at once) in rounds from `listen_and_start` until `stop` (work
    already handed on is the caller's to finish), sleeping until `next_moment()` (or `poll_s`) between rounds."""

    def __init__(
        self,
        name: str,
        claim: Callable[[], Awaitable[bool]],
        next_moment: Callable[[], Awaitable[datetime | None]],
        clock: Clock,
        poll_s: float,
    ) -> None:
        super().__init__(name, poll_s, claim)
        self._claim = claim
        self._next_moment = next_moment
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False

    async def listen_and_start(self, store: Store, topic: str) -> None:
        """Listen for other replicas' changes of `topic` and start the rounds."""
        await store.listen(lambda _payload: self.wake(), topic)
        self.start()

    def wake(self) -> None:
        """Look for due work now."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop the rounds; the loop also ends by itself at its next turn, should a cancellation be lost."""
        self._stopping = True
        await super().stop()

    async def _rounds(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                busy = await self._claim()
            except Exception as exc:  # the store may be briefly unreachable: the next round tries again
                log.warning("%s: a claim failed: %s", self.name, exc)
                busy = False
            if busy:
                await asyncio.sleep(0)  # let the work claimed start before claiming more
                continue
            fallback = self._clock.now() + timedelta(seconds=self._interval_s)
            try:
                moment = await self._next_moment()
            except Exception as exc:
                log.warning("%s: cannot read the next due moment: %s", self.name, exc)
                moment = None
            await self._clock.wait_until(min(moment, fallback) if moment is not None else fallback, self._wake)
