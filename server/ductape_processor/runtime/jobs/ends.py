"""Runs' ends, recorded many to a store call: while one call is on its way, the ends that come in meanwhile wait and
go together in the next (a group commit: no added wait when the store keeps up, fewer round trips when it does not).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from ductape_processor.store.base import Store
from ductape_processor.store.job_records import RunEnd, RunRecord

MAX_ENDS_PER_CALL: Final = 500
"""Ends one store call records at most."""


class EndRecorder:
    """Records `owner`'s runs' ends (`Store.end_runs`), batching those that arrive while a call is going."""

    def __init__(self, store: Store, owner: str) -> None:
        self._store = store
        self._owner = owner
        self._waiting: list[tuple[str, RunEnd, asyncio.Future[RunRecord | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def end(self, run_id: str, end: RunEnd) -> RunRecord | None:
        """Record how the run ended; the run as stored, or None when `owner` no longer held it."""
        loop = asyncio.get_running_loop()
        recorded: asyncio.Future[RunRecord | None] = loop.create_future()
        self._waiting.append((run_id, end, recorded))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name="job run ends")
        # A caller cancelled meanwhile (shutdown) cancels only its wait: the end is recorded with the others.
        return await recorded

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:MAX_ENDS_PER_CALL]
                del self._waiting[:MAX_ENDS_PER_CALL]
                try:
                    ended = await self._store.end_runs(self._owner, [(run_id, end) for run_id, end, _ in batch])
                except Exception as exc:  # each waiting run sees the store's failure
                    for _, _, recorded in batch:
                        if not recorded.done():
                            recorded.set_exception(exc)
                    continue
                for run_id, _, recorded in batch:
                    if not recorded.done():
                        recorded.set_result(ended.get(run_id))
        finally:
            self._flusher = None

    async def stop(self) -> None:
        """Wait for the ends already handed over to be recorded."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
