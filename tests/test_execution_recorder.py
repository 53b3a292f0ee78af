"""The execution log's writer: records queue in memory and reach the store a batch at a time, off the calls' path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ductape_processor.runtime.logs.recorder import ExecutionRecorder
from ductape_processor.store.base import ExecutionFilter, ExecutionRecord, ExecutionStatus
from ductape_processor.store.sqlite import SqliteStore

START = datetime(2026, 1, 1, tzinfo=UTC)


class CountingStore(SqliteStore):
    """The real SQLite store, counting the batches written and able to hold a write until released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.hold: asyncio.Event | None = None

    async def insert_executions(self, records: list[ExecutionRecord]) -> None:
        self.batches.append(len(records))
        if self.hold is not None:
            await self.hold.wait()
        await super().insert_executions(records)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    opened = CountingStore(tmp_path / "store.db")
    await opened.open()
    yield opened
    await opened.close()


def record(n: int) -> ExecutionRecord:
    return ExecutionRecord(
        process_id=f"p{n:05d}",
        product="shop",
        env="dev",
        version=1,
        kind="action",
        resource="api:user",
        status=ExecutionStatus.SUCCESS,
        started_at=START + timedelta(seconds=n),
        ended_at=START + timedelta(seconds=n, milliseconds=5),
        attempts=1,
        upstream_status=200,
        error_reason="",
        cached=False,
        detail="GET /users/1",
    )


async def stored(store: SqliteStore) -> list[str]:
    rows = await store.list_executions(ExecutionFilter(product="shop"), after=None, limit=10_000)
    return sorted(r.process_id for r in rows)


async def test_records_arriving_during_a_write_wait_for_the_next_interval(store: CountingStore) -> None:
    recorder = ExecutionRecorder(store, flush_interval=0.3, batch_size=500)
    recorder.start()
    store.hold = asyncio.Event()
    for n in range(3):
        recorder.record(record(n))
    while not store.batches:  # the first interval ends: the three records' write starts, and is held
        await asyncio.sleep(0.01)
    for n in range(3, 10):
        recorder.record(record(n))
    store.hold.set()
    await asyncio.sleep(0.15)  # the held write ends well inside the next interval
    assert store.batches == [3], "the records queued meanwhile did not follow at once, a few at a time"
    await asyncio.sleep(0.4)
    assert store.batches == [3, 7]
    await recorder.close()
    assert await stored(store) == [f"p{n:05d}" for n in range(10)]


async def test_a_full_batch_is_written_without_waiting_for_the_interval(store: CountingStore) -> None:
    recorder = ExecutionRecorder(store, flush_interval=30.0, batch_size=300)
    recorder.start()
    for n in range(700):
        recorder.record(record(n))
    for _ in range(200):
        if sum(store.batches) >= 600:
            break
        await asyncio.sleep(0.01)
    assert store.batches == [300, 300], "two full batches went out; the 100 left wait for the interval"
    await recorder.close()
    assert store.batches == [300, 300, 100]
    assert len(await stored(store)) == 700


@pytest.mark.parametrize("count", [1, 5, 83, 256, 341, 500])
async def test_a_batch_of_any_size_is_stored_whole(store: CountingStore, count: int) -> None:
    """A batch goes out as a few multi-row statements (256, 64, 16, 4 and 1 rows): every record lands once."""
    await store.insert_executions([record(n) for n in range(count)])
    assert await stored(store) == [f"p{n:05d}" for n in range(count)]
    rows = await store.list_executions(ExecutionFilter(product="shop"), after=None, limit=1)
    assert rows == [record(count - 1)]


async def test_a_flush_waits_for_the_batch_the_writer_is_storing(store: CountingStore) -> None:
    recorder = ExecutionRecorder(store, flush_interval=0.05, batch_size=500)
    recorder.start()
    store.hold = asyncio.Event()
    recorder.record(record(1))
    while not store.batches:  # the writer took the record out of the queue; its write is held
        await asyncio.sleep(0.01)
    flushing = asyncio.ensure_future(recorder.flush())
    await asyncio.sleep(0.1)
    assert not flushing.done(), "the flush returned while the record it should cover was not stored"
    store.hold.set()
    await flushing
    assert await stored(store) == ["p00001"]
    await recorder.close()
