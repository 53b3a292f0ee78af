"""One contract, two stores: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from ductape_processor.store import Store
from ductape_processor.store.base import ExecutionFilter, ExecutionRecord
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


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_auth_tokens_expire_and_are_deleted_only_when_unchanged(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.put_auth_token("shop/prd/api/login", '{"t":1}', at(60))
    assert await store.get_auth_token("shop/prd/api/login", at(59)) == '{"t":1}'
    assert await store.get_auth_token("shop/prd/api/login", at(60)) is None
    await store.put_auth_token("shop/prd/api/login", '{"t":2}', at(120))
    await store.delete_auth_token("shop/prd/api/login", '{"t":1}')  # stale: a newer token is kept
    assert await store.get_auth_token("shop/prd/api/login", at(0)) == '{"t":2}'
    await store.delete_auth_token("shop/prd/api/login", '{"t":2}')
    assert await store.get_auth_token("shop/prd/api/login", at(0)) is None


async def test_cache_entries_are_fresh_until_they_expire(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.cache_put("k", b"\x00value", at(10))
    assert await store.cache_get("k", at(9.9)) == b"\x00value"
    assert await store.cache_get("k", at(10)) is None
    await store.cache_put("k", b"new", at(20))
    assert await store.cache_get("k", at(15)) == b"new"
    assert await store.purge_expired(at(30)) >= 1
    assert await store.cache_get("k", at(0)) is None


async def test_idempotency_claims_are_exclusive_until_released_or_expired(store_factory: StoreFactory) -> None:
    a, b = await store_factory(), await store_factory()
    first = await a.idempotency_claim("key", "h1", "owner-a", at(0), at(30), at(3600))
    assert (first.owner, first.state) == ("owner-a", "pending")
    second = await b.idempotency_claim("key", "h1", "owner-b", at(1), at(31), at(3601))
    assert second.owner == "owner-a", "a live claim is not taken over"
    assert not await b.idempotency_complete("key", "owner-b", b"nope")
    assert await a.idempotency_complete("key", "owner-a", b"response")
    done = await b.idempotency_claim("key", "h1", "owner-b", at(100), at(130), at(3700))
    assert (done.owner, done.state, done.response) == ("owner-a", "done", b"response")
    expired = await b.idempotency_claim("key", "h2", "owner-b", at(3600), at(3630), at(7200))
    assert (expired.owner, expired.request_hash, expired.response) == ("owner-b", "h2", None)


async def test_a_dead_owners_lease_can_be_taken_over(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.idempotency_claim("key", "h", "dead", at(0), at(30), at(3600))
    taken = await store.idempotency_claim("key", "h", "alive", at(31), at(61), at(3631))
    assert taken.owner == "alive"
    await store.idempotency_release("key", "alive")
    assert await store.idempotency_get("key") is None


async def test_concurrent_claims_have_one_winner(store_factory: StoreFactory) -> None:
    replicas = [await store_factory() for _ in range(2)]
    results = await asyncio.gather(
        *(replicas[n % 2].idempotency_claim("race", "h", f"owner-{n}", at(0), at(30), at(3600)) for n in range(10))
    )
    assert len({r.owner for r in results}) == 1


def execution(n: int, **overrides: object) -> ExecutionRecord:
    values: dict[str, object] = {
        "process_id": f"p{n:03d}",
        "product": "shop",
        "env": "prd",
        "version": 1,
        "kind": "action",
        "resource": "mailer:send",
        "status": 1,
        "started_at": at(n),
        "ended_at": at(n + 0.5),
        "attempts": 1,
        "upstream_status": 200,
        "error_reason": "",
        "cached": False,
        "detail": "POST /send",
    }
    values.update(overrides)
    return ExecutionRecord(**values)  # type: ignore[arg-type]


async def test_executions_are_listed_newest_first_with_filters(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.insert_executions(
        [execution(n) for n in range(5)]
        + [execution(10, env="dev"), execution(11, status=2, error_reason="UPSTREAM_UNREACHABLE")]
        + [execution(12, resource="mailer:other", cached=True), execution(13, product="blog")]
    )
    everything = await store.list_executions(ExecutionFilter("shop"), after=None, limit=100)
    assert [r.process_id for r in everything] == ["p012", "p011", "p010", "p004", "p003", "p002", "p001", "p000"]
    assert everything[0].cached and everything[0].started_at == at(12)
    assert everything[1] == execution(11, status=2, error_reason="UPSTREAM_UNREACHABLE")
    page = await store.list_executions(ExecutionFilter("shop", env="prd"), after=(at(3), "p003"), limit=2)
    assert [r.process_id for r in page] == ["p002", "p001"]
    failed = await store.list_executions(ExecutionFilter("shop", status=2), after=None, limit=10)
    assert [r.process_id for r in failed] == ["p011"]
    window = await store.list_executions(
        ExecutionFilter("shop", resource="mailer:send", since=at(1), until=at(4)), after=None, limit=10
    )
    assert [r.process_id for r in window] == ["p003", "p002", "p001"]
