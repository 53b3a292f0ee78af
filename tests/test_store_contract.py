"""One contract, two stores: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from ductape_processor.store import Store
from ductape_processor.store.migrations import POSTGRES, SQLITE

StoreFactory = Callable[[], Awaitable[Store]]


async def test_open_applies_every_migration_once(store_factory: StoreFactory) -> None:
    store = await store_factory()
    expected = (SQLITE if store.dialect == "sqlite" else POSTGRES)[-1].version
    assert await store.schema_version() == expected
    again = await store_factory()  # a second open (a restart, or another replica) finds nothing to do
    assert await again.schema_version() == expected


async def test_apply_numbers_versions_and_skips_identical_latest(store_factory: StoreFactory) -> None:
    store = await store_factory()
    first, created = await store.apply_version("shop", "c1", 1, b"product: shop", '{"product":"shop"}')
    assert (first.version, created) == (1, True)
    same, created = await store.apply_version("shop", "c1", 1, b"product: shop", '{"product":"shop"}')
    assert (same.version, created) == (1, False)
    second, created = await store.apply_version("shop", "c2", 2, b"{}", "{}")
    assert (second.version, created) == (2, True)
    back, created = await store.apply_version("shop", "c1", 1, b"product: shop", '{"product":"shop"}')
    assert (back.version, created) == (3, True), "only the latest version's checksum counts as identical"
    other, _ = await store.apply_version("blog", "c1", 1, b"x", "{}")
    assert other.version == 1


async def test_records_keep_what_was_applied(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.apply_version("shop", "abc", 2, b'{"product": "shop"}', '{"product":"shop"}')
    record = await store.get_version("shop", 1)
    assert record is not None
    assert (record.product, record.checksum, record.format) == ("shop", "abc", 2)
    assert record.source == b'{"product": "shop"}'
    assert record.document == '{"product":"shop"}'
    assert record.created_at.tzinfo is not None
    assert await store.get_version("shop", 2) is None
    assert await store.get_version("nope", 1) is None
    latest = await store.latest_version("shop")
    assert latest == record
    assert await store.latest_version("nope") is None


async def test_list_versions_pages_newest_first(store_factory: StoreFactory) -> None:
    store = await store_factory()
    for n in range(1, 6):
        await store.apply_version("shop", f"c{n}", 1, b"x", "{}")
    page = await store.list_versions("shop", before=None, limit=2)
    assert [r.version for r in page] == [5, 4]
    page = await store.list_versions("shop", before=4, limit=2)
    assert [r.version for r in page] == [3, 2]
    page = await store.list_versions("shop", before=2, limit=2)
    assert [r.version for r in page] == [1]
    assert await store.list_versions("nope", before=None, limit=10) == []


async def test_pins_return_the_previous_pin_and_bump_the_revision(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.apply_version("shop", "c1", 1, b"x", "{}")
    await store.apply_version("shop", "c2", 1, b"y", "{}")
    before = {r.product: r.revision for r in await store.revisions()}
    assert await store.set_pin("shop", "prd", 2) is None
    assert await store.set_pin("shop", "prd", 1) == 2
    assert await store.set_pin("shop", "dev", 2) is None
    assert await store.pins("shop") == {"prd": 1, "dev": 2}
    assert await store.pins("nope") == {}
    after = {r.product: r.revision for r in await store.revisions()}
    assert after["shop"] == before["shop"] + 3


async def test_identical_apply_does_not_bump_the_revision(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.apply_version("shop", "c1", 1, b"x", "{}")
    before = await store.revisions()
    await store.apply_version("shop", "c1", 1, b"x", "{}")
    assert await store.revisions() == before


async def test_concurrent_applies_from_two_replicas_get_distinct_versions(store_factory: StoreFactory) -> None:
    replica_a, replica_b = await store_factory(), await store_factory()
    results = await asyncio.gather(
        *(
            (replica_a if n % 2 else replica_b).apply_version("shop", f"checksum-{n}", 1, f"v{n}".encode(), "{}")
            for n in range(20)
        )
    )
    versions = sorted(record.version for record, created in results if created)
    assert versions == list(range(1, 21)), "every apply got its own version; none was lost"
    stored = await replica_a.list_versions("shop", before=None, limit=100)
    assert sorted(r.checksum for r in stored) == sorted(f"checksum-{n}" for n in range(20))


async def test_data_survives_a_restart(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.apply_version("shop", "c1", 1, b"x", "{}")
    await store.set_pin("shop", "prd", 1)
    await store.close()
    reopened = await store_factory()
    assert (await reopened.latest_version("shop")) is not None
    assert await reopened.pins("shop") == {"prd": 1}


async def test_a_pin_to_a_missing_version_is_refused(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.apply_version("shop", "c1", 1, b"x", "{}")
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        await store.set_pin("shop", "prd", 7)
    assert await store.pins("shop") == {}
