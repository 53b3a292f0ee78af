"""The journal of one replica's feature runs: every record a run makes (its start, each call, its end) goes through
here, and the records that come in while the store writes a batch are written together in the next one (a group
commit): a run waits for its own records, but the runs going at once share one transaction instead of taking one
each. The writes are fenced by the runs' leases (`Store.write_features`): a record of a run this replica no longer
holds is not written, and whoever waits for it gets `RunLost`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from ductape_processor.runtime.policies.periodic import cancel_and_wait
from ductape_processor.store.base import Store
from ductape_processor.store.feature_records import FeatureRunChange, FeatureRunRecord, FeatureStepRecord, FeatureWrites

log = logging.getLogger(__name__)

MAX_BATCH: Final = 500
"""Records (run starts, calls, run changes) one transaction takes, about: a request's records stay together."""
RETRY_PAUSE_S: Final = 0.5
"""The pause before records whose transaction failed (the store was unreachable) are tried again."""


class RunLost(Exception):
    """This replica no longer holds the run (cancelled, or taken over after its lease ran out): it stops there."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"feature run {run_id} is no longer held by this replica")
        self.run_id = run_id


@dataclass(frozen=True, slots=True)
class _Entry:
    """One request's records, and who waits for them."""

    writes: FeatureWrites
    done: asyncio.Future[None]


class Journal:
    """Writes the records of this replica's runs in batches, from `start` until `stop`."""

    def __init__(self, store: Store, owner: str) -> None:
        self._store = store
        self._owner = owner
        self._queued: list[_Entry] = []
        self._pending = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start writing."""
        self._writer = asyncio.get_running_loop().create_task(self._write_rounds(), name="feature journal")

    async def stop(self) -> None:
        """Write what is queued (once), then stop."""
        writer, self._writer = self._writer, None
        await cancel_and_wait(writer)
        with contextlib.suppress(Exception):  # the leases cover records that stay unwritten
            while self._queued:
                await self._flush()

    def record(
        self,
        *,
        runs: tuple[FeatureRunRecord, ...] = (),
        steps: tuple[FeatureStepRecord, ...] = (),
        changes: tuple[FeatureRunChange, ...] = (),
    ) -> asyncio.Future[None]:
        """Queue records; the future is done once they are written (`RunLost` when a run's were not)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append(_Entry(FeatureWrites(runs, steps, changes), done))
        self._pending.set()
        return done

    async def _write_rounds(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            while self._queued:
                try:
                    await self._flush()
                except Exception as exc:  # the store is away: the records wait, their runs with them
                    log.warning("feature runs: cannot record: %s", exc)
                    await asyncio.sleep(RETRY_PAUSE_S)

    async def _flush(self) -> None:
        taken = 0
        size = 0
        while taken < len(self._queued) and (size < MAX_BATCH or taken == 0):
            size += self._queued[taken].writes.size
            taken += 1
        batch = self._queued[:taken]
        lost = await self._store.write_features(self._owner, FeatureWrites.joined([entry.writes for entry in batch]))
        del self._queued[:taken]
        for entry in batch:
            if entry.done.done():
                continue
            gone = entry.writes.touched & lost
            if gone:
                entry.done.set_exception(RunLost(min(gone)))
                entry.done.exception()  # retrieved here in case nobody waits any more
            else:
                entry.done.set_result(None)
