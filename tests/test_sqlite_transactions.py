"""The SQLite store's write transactions survive a caller cancelled at any point, its BEGIN included."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ductape_processor.store.sql import Connection
from ductape_processor.store.sqlite import SqliteStore


async def test_a_caller_cancelled_while_its_begin_is_queued_leaves_no_transaction_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    try:

        async def body(conn: Connection) -> int:
            return 1

        for turns in range(4):  # cancelled after 0..3 loop turns: before, during and after the BEGIN
            task = asyncio.ensure_future(store._transaction(body))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert await store._transaction(body) == 1, f"the next transaction after a cancel at turn {turns}"
    finally:
        await store.close()
