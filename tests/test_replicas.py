"""Several replicas on one store: a change made through one is served by the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ductape_processor.store.postgres import PostgresStore
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import EXAMPLE, POSTGRES_DSN, Running, ServerFactory
from tests.test_product_service import manifest


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until `check()` holds; fails after `within` seconds."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not seen within {within}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def pinned_version(replica: Running, env: str) -> int:
    return (await replica.client.product.get("shop", env=env)).version.version


async def exercise(a: Running, b: Running, within: float) -> None:
    await a.client.product.apply(manifest("one"))
    assert await pinned_version(b, "prd") == 1, "a product applied on A is found on B"
    await b.client.product.apply(manifest("two"))
    await eventually(lambda: _is(a, "prd", 2), within)
    await a.client.product.promote("shop", env="prd", version=1)
    await eventually(lambda: _is(b, "prd", 1), within)
    await b.client.product.promote("shop", env="production", version=2)
    await eventually(lambda: _is(a, "prd", 2), within)


async def _is(replica: Running, env: str, version: int) -> bool:
    return await pinned_version(replica, env) == version


async def test_postgres_replicas_see_each_others_changes_by_notification(
    start_server: ServerFactory, pg_schema: str
) -> None:
    # Polling is set to a minute, so only the LISTEN/NOTIFY path can make the changes visible in time.
    a = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), registry_poll_s=60)
    b = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), registry_poll_s=60)
    await exercise(a, b, within=1.0)


async def test_postgres_replicas_apply_concurrently_without_losing_a_version(
    start_server: ServerFactory, pg_schema: str
) -> None:
    a = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema))
    b = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema))
    results = await asyncio.gather(*((a if n % 2 else b).client.product.apply(manifest(f"v{n}")) for n in range(16)))
    assert sorted(r.version.version for r in results) == list(range(1, 17))
    notes = {json.loads((await a.client.product.get("shop", version=n)).manifest)["description"] for n in range(1, 17)}
    assert notes == {f"v{n}" for n in range(16)}


async def test_replicas_without_notifications_catch_up_by_polling(start_server: ServerFactory, tmp_path: Path) -> None:
    # Two processes sharing one SQLite file have no notification channel: the poll of revisions covers it.
    a = await start_server(store=SqliteStore(tmp_path / "shared.db"), registry_poll_s=0.1)
    b = await start_server(store=SqliteStore(tmp_path / "shared.db"), registry_poll_s=0.1)
    await exercise(a, b, within=2.0)


async def test_a_replica_serves_from_memory_until_a_change(start_server: ServerFactory, tmp_path: Path) -> None:
    class CountingStore(SqliteStore):
        reads = 0

        async def latest_version(self, product: str):  # type: ignore[no-untyped-def]
            CountingStore.reads += 1
            return await super().latest_version(product)

    running = await start_server(store=CountingStore(tmp_path / "count.db"))
    await running.client.product.apply(EXAMPLE)
    for _ in range(20):
        await running.client.product.get("shop", env="prd")
        await running.app.components.registry.resolve("shop", "production")
    assert CountingStore.reads <= 2, "resolving is served from memory"
    await running.client.product.promote("shop", env="prd", version=1)
    await running.client.product.get("shop", env="prd")
    assert CountingStore.reads <= 3
