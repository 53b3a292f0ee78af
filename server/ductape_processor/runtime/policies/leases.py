"""Rounds of claiming due work from the store, for one replica: claim what is due (under a lease, so each piece of
work runs once across replicas), hand it on, and sleep until the store says the next piece falls due; and the ends
of claimed work, written a batch per store call (`EndBatches`); `ClaimedWork` puts both together for work whose
pieces run as tasks, a bounded number at once.

Waiting is event-driven: a round ends by sleeping until the earliest due moment the store reports, woken earlier by
`wake` (this replica added work), by `wake_by` (work added that falls due before the rounds would look), or, on
PostgreSQL, by another replica's change on the store's topic (LISTEN/NOTIFY; a change that announces its due moment,
`announced_due`, wakes the rounds only when they would look later than that); a poll every `poll_s` covers a lost
notification. A claim that came back full makes the next round start at once. Used by the jobs scheduler
(runtime/jobs/scheduler.py), webhook deliveries (runtime/webhooks/deliveries.py) and received webhooks' dispatches
(runtime/webhooks/dispatches.py).

Work that may outlast its lease has the lease heart-beaten while it goes (`LeaseRenewer`: the jobs' runs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.periodic import PeriodicTask, cancel_and_wait, end_within
from ductape_processor.store.base import Store
from ductape_processor.store.job_records import announced_due

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        super().__init__(name, poll_s, claim, clock)
        self._claim = claim
        self._next_moment = next_moment
        self._wake = asyncio.Event()
        self._next_look: datetime | None = None
        """When the waiting rounds look again; None while a round is going (it reads the next moment at its end)."""
        self._stopping = False

    async def listen_and_start(self, store: Store, topic: str) -> None:
        """Listen for other replicas' changes of `topic` and start the rounds."""
        await store.listen(self._heard, topic)
        self.start()

    def wake(self) -> None:
        """Look for due work now."""
        self._wake.set()

    def wake_by(self, due: datetime) -> None:
        """Work falling due at `due` was added: look now if the rounds would look later than that."""
        if self._next_look is None or due < self._next_look:
            self._wake.set()

    def _heard(self, payload: str) -> None:
        due = announced_due(payload)
        if due is None:
            self.wake()
        else:
            self.wake_by(due)

    async def stop(self) -> None:
        """Stop the rounds; the loop also ends by itself at its next turn, should a cancellation be lost."""
        self._stopping = True
        await super().stop()

    async def _rounds(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._next_look = None
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
            self._next_look = min(moment, fallback) if moment is not None else fallback
            await self._clock.wait_until(self._next_look, self._wake)


class EndBatches(Generic[T]):
    """The ends of claimed work, written many to a store call by a task of their own: while one call is on its way,
    the ends that come in meanwhile wait and go together in the next (a group commit: no added wait when the store
    keeps up, fewer transactions when it does not). With a `linger`, a batch waits that long for more ends before it
    is written: for ends nothing waits on, whose lease covers the delay, it makes fewer store writes, and keeps them
    off the moments the work itself is busy. A call that fails is logged and the batch is tried again a second
    later; should the store stay away, the leases run out and the work is claimed again."""

    def __init__(
        self, name: str, write: Callable[[list[T]], Awaitable[object]], batch: int, linger_s: float = 0.0
    ) -> None:
        self.name = name
        self._write = write
        self._batch = batch
        self._linger_s = linger_s
        self._ends: list[T] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, end: T) -> None:
        """Write `end` with the next batch."""
        self._ends.append(end)
        self._ready.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._rounds(), name=self.name)

    async def close(self) -> None:
        """Stop the task and write the ends left (one try each batch; a failure is logged)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        try:
            await self._flush()
        except Exception as exc:
            log.warning("%s: cannot write %d ends at shutdown: %s", self.name, len(self._ends), exc)

    async def _rounds(self) -> None:
        while True:
            await self._ready.wait()
            if self._linger_s and len(self._ends) < self._batch:
                await asyncio.sleep(self._linger_s)
            self._ready.clear()
            try:
                await self._flush()
            except Exception as exc:  # kept for the next round
                log.warning("%s: cannot write ends: %s", self.name, exc)
                await asyncio.sleep(1.0)
                self._ready.set()

    async def _flush(self) -> None:
        while self._ends:
            batch = self._ends[: self._batch]
            await self._write(batch)
            del self._ends[: len(batch)]


@dataclass(frozen=True, slots=True)
class ClaimLimits:
    """How claimed work goes: the fallback poll, the most claimed in one statement, the most running at once."""

    poll_s: float
    claim_batch: int
    concurrency: int


class ClaimedWork:
    """One replica's share of work claimed under leases: `claim(free)` claims up to `free` pieces and hands each to
    `run` (a task); the rounds claim while fewer than `concurrency` run, and a piece that ends makes room. Work this
    replica creates can skip the claim: `reserve` room for it, store it leased to this replica, then `run` it (or
    `release` the room). `stop` gives the pieces running a grace; those cut off leave leases that run out, and the
    work is claimed again."""

    def __init__(
        self,
        name: str,
        claim: Callable[[int], Awaitable[int]],
        next_moment: Callable[[], Awaitable[datetime | None]],
        clock: Clock,
        limits: ClaimLimits,
    ) -> None:
        self._claim_up_to = claim
        self._limits = limits
        self.rounds = ClaimRounds(name, self._claim, next_moment, clock, limits.poll_s)
        self._running: set[asyncio.Task[None]] = set()
        self._reserved = 0

    def reserve(self, wanted: int) -> int:
        """Room for up to `wanted` pieces this replica is about to store leased to itself: how many fit now."""
        granted = max(0, min(wanted, self._limits.concurrency - len(self._running) - self._reserved))
        self._reserved += granted
        return granted

    def release(self, count: int) -> None:
        """Give back room `reserve` granted and no piece took."""
        self._reserved -= count

    def run(self, work: Coroutine[Any, Any, None], *, reserved: bool = False) -> None:
        """Run one piece of work in a task of its own (`reserved`: in room `reserve` granted)."""
        if reserved:
            self._reserved -= 1
        task = asyncio.get_running_loop().create_task(work)
        self._running.add(task)
        task.add_done_callback(self._done)

    def wake(self) -> None:
        """Look for due work now."""
        self.rounds.wake()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; the pieces running get `grace_s` to end, then are cancelled."""
        await self.rounds.stop()
        await end_within(set(self._running), grace_s)

    async def _claim(self) -> bool:
        free = min(self._limits.claim_batch, self._limits.concurrency - len(self._running) - self._reserved)
        if free <= 0:
            return False  # a piece that ends wakes the rounds
        return await self._claim_up_to(free) == free

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if len(self._running) == self._limits.concurrency - 1:
            self.rounds.wake()


class LeaseRenewer(PeriodicTask):
    """Heart-beats the leases of the work this replica is doing: every third of `lease`, one call of `renew(ids,
    lease_until)` (which returns the ids whose lease the replica still held) extends them all, from `start` until
    `stop` (a call that fails is logged, and the next beat tries again). Work whose lease another replica took over
    (this one stalled past it) is no longer renewed."""

    def __init__(
        self,
        name: str,
        renew: Callable[[list[str], datetime], Awaitable[set[str]]],
        clock: Clock,
        lease: timedelta,
    ) -> None:
        super().__init__(name, lease.total_seconds() / 3, self._beat, clock)
        self._renew = renew
        self._lease = lease
        self._held: set[str] = set()

    def hold(self, key: str) -> None:
        """Renew `key`'s lease from now on."""
        self._held.add(key)

    def release(self, key: str) -> None:
        """Stop renewing `key`'s lease (its work ended)."""
        self._held.discard(key)

    async def _beat(self) -> None:
        held = list(self._held)
        if not held:
            return
        renewed = await self._renew(held, self._clock.now() + self._lease)
        for key in held:
            if key not in renewed and key in self._held:
                log.warning("%s: %s was taken over by another replica (its lease ran out)", self.name, key)
                self._held.discard(key)
