"""The execution log, written off the hot path: records queue in memory and are stored in batches.

A call only appends to a list. A background task writes the list every `flush_interval` seconds, or as soon as it
holds `batch_size` records, in one store round trip. `close()` writes what is left. When the store fails, the batch
is kept and retried at the next flush, up to `max_pending` records; past that the oldest are dropped and counted,
because serving calls matters more than logging them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from datetime import UTC, datetime

from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.store.base import ExecutionRecord, ExecutionStatus, Store

log = logging.getLogger(__name__)


def execution_record(
    resolved: Resolved,
    kind: str,
    resource: str,
    process_id: str,
    started: datetime,
    status: ExecutionStatus,
    *,
    attempts: int,
    error_reason: str,
    cached: bool = False,
    upstream_status: int = 0,
    detail: str = "",
) -> ExecutionRecord:
    """The execution record of one run of a resource (`kind`: action, database, notification …) of the resolved
    product version, ending now."""
    return ExecutionRecord(
        process_id=process_id,
        product=resolved.product,
        env=resolved.env.slug,
        version=resolved.version,
        kind=kind,
        resource=resource,
        status=status,
        started_at=started,
        ended_at=datetime.now(UTC),
        attempts=attempts,
        upstream_status=upstream_status,
        error_reason=error_reason,
        cached=cached,
        detail=detail,
    )


class ExecutionRecorder:
    """Batches execution records into the store."""

    def __init__(
        self, store: Store, *, flush_interval: float = 0.2, batch_size: int = 500, max_pending: int = 100_000
    ) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._pending: list[ExecutionRecord] = []
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()  # held while a batch is on its way to the store
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.dropped = 0
        self._id_prefix = os.urandom(4).hex()
        self._next_id = itertools.count(1).__next__

    def new_id(self) -> str:
        """A unique, roughly time-ordered execution id: milliseconds (12 hex), this recorder (8 random hex), a counter
        (6 hex)."""
        return f"{int(time.time() * 1000):012x}{self._id_prefix}{self._next_id() & 0xFFFFFF:06x}"

    def start(self) -> None:
        """Start the background writer."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="execution-recorder")

    def record(self, record: ExecutionRecord) -> None:
        """Queue one record (no I/O)."""
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()
        if len(self._pending) > self._max_pending:
            excess = len(self._pending) - self._max_pending
            del self._pending[:excess]
            self.dropped += excess

    async def flush(self) -> None:
        """Write everything queued now; a batch the background writer took but has not stored yet is waited for, so
        what was recorded before the flush is in the store after it."""
        async with self._writing:
            while self._pending and await self._write_batch():
                pass

    async def _write_batch(self) -> bool:
        """Write the oldest `batch_size` records queued; False when the store failed (they stay queued)."""
        batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
        try:
            await self._store.insert_executions(batch)
        except Exception as exc:
            self._pending[:0] = batch
            log.warning("execution log: writing %d records failed (%s); will retry", len(batch), exc)
            return False
        return True

    async def _run(self) -> None:
        # One batch per wake-up: the records that came in while a batch was being written wait for the next
        # interval (or a full batch), instead of following it at once a few at a time, each a round trip to the store.
        while not self._stopping:
            if len(self._pending) < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._wake.wait()
            self._wake.clear()
            if self._pending:
                async with self._writing:
                    await self._write_batch()

    async def close(self) -> None:
        """Stop the writer (letting a write in progress finish, so no transaction is cut) and write what is left."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        await self.flush()
        if self._pending:
            log.error("execution log: %d records could not be written at shutdown", len(self._pending))
