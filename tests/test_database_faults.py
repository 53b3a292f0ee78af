"""Databases under stress and faults: a pool with no free connection, a statement past its time, connections killed
by the server, unreachable servers (whose errors never show a password), results over the bounds, a changed DSN."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
import pytest
from ductape.processor import DeadlineExceededError, FailedPreconditionError, ResourceExhaustedError, UnavailableError

from tests.conftest import POSTGRES_DSN, ServerFactory
from tests.test_databases import SYSTEMS, Db, open_db, require

SLOW = {
    "postgresql": {
        "query": "SELECT pg_sleep(:seconds) IS NULL AS slept",
        "params": {"seconds": "$Input{filter}{seconds}"},
    },
    "mysql": {"query": "SELECT SLEEP(:seconds) AS slept", "params": {"seconds": "$Input{filter}{seconds}"}},
    # SQLite has no sleep: a recursive count that takes about a second per five million rows on this machine.
    "sqlite": {
        "query": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :seconds * 5000000) "
        "SELECT count(*) AS slept FROM c",
        "params": {"seconds": "$Input{filter}{seconds}"},
    },
}


def slow_action(system: str) -> dict[str, Any]:
    return {"tag": "slow", "type": "read", **SLOW[system]}


async def reopen(db: Db, **env: Any) -> None:
    """Apply the same database with other environment settings (a new manifest version)."""
    from tests.test_databases import users_actions

    await db.apply([*users_actions(db.table), slow_action(db.system)], **env)


@pytest.mark.parametrize("system", SYSTEMS)
async def test_a_busy_pool_waits_then_fails_at_the_deadline(start_server: ServerFactory, system: str) -> None:
    db = await open_db(start_server, system, [slow_action(system)])
    try:
        await reopen(db, pool={"min": 0, "max": 1})
        holding = asyncio.ensure_future(db.execute("slow", filter={"seconds": 3}, timeout=20))
        await asyncio.sleep(0.5)  # the slow call has the only connection
        with pytest.raises(ResourceExhaustedError) as caught:
            await db.execute("count", filter={"min": 0}, timeout=1.0)
        assert caught.value.reason == "DB_POOL_EXHAUSTED"
        assert (await holding).rows
        assert (await db.execute("count", filter={"min": 0})).count == 0  # the connection came back
    finally:
        await db.execute("teardown")


@pytest.mark.parametrize("system", SYSTEMS)
async def test_a_statement_past_its_timeout_is_deadline_exceeded_and_the_next_call_works(
    start_server: ServerFactory, system: str
) -> None:
    db = await open_db(start_server, system, [slow_action(system)])
    try:
        await reopen(db, statement_timeout="300ms", pool={"min": 0, "max": 1})
        with pytest.raises(DeadlineExceededError) as caught:
            await db.execute("slow", filter={"seconds": 30})
        assert caught.value.reason == "DB_TIMEOUT"
        assert (await db.execute("count", filter={"min": 0})).count == 0
    finally:
        await db.execute("teardown")


async def _kill_postgres(run: str) -> int:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", run
        )
    finally:
        await conn.close()
    return len(rows)


async def _mysql(sql: str) -> list[Any]:
    conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql)
            return list(await cursor.fetchall())
    finally:
        conn.close()


async def _kill_mysql(schema: str) -> int:
    ids = await _mysql(f"SELECT ID FROM information_schema.PROCESSLIST WHERE DB = '{schema}'")
    for (thread,) in ids:
        await _mysql(f"KILL {int(thread)}")
    return len(ids)


@pytest.mark.parametrize("system", ["postgresql", "mysql"])
async def test_connections_killed_by_the_server_are_replaced_without_a_restart(
    start_server: ServerFactory, system: str
) -> None:
    await require(system)
    schema = f"t_{secrets.token_hex(5)}"
    if system == "mysql":
        await _mysql(f"CREATE DATABASE {schema}")
    try:
        db = await open_db(start_server, system)
        if system == "mysql":
            await reopen(db, url=f"mysql://root@127.0.0.1:3306/{schema}", pool={"min": 0, "max": 3})
            await db.execute("setup")
        await db.execute("create", data={"id": 1, "email": "ada@example.com", "name": "Ada", "score": 1})
        # Several connections in the pool, then every one of them killed while idle.
        await asyncio.gather(*(db.execute("count", filter={"min": 0}) for _ in range(3)))
        killed = await (_kill_postgres(db.run) if system == "postgresql" else _kill_mysql(schema))
        assert killed >= 1
        for _ in range(5):
            assert (await db.execute("count", filter={"min": 0})).count == 1
        # Killed in the middle of a statement: a read is retried on a new connection.
        slow = asyncio.ensure_future(
            db.running.client.database.execute(
                product="shop", env="dev", database="main", action="list", input={"filter": {"min": 0}}
            )
        )
        await (_kill_postgres(db.run) if system == "postgresql" else _kill_mysql(schema))
        assert (await slow).rows[0]["id"] == 1
        written = await db.execute("create", data={"id": 2, "email": "bob@example.com", "name": "Bob", "score": 1})
        assert written.affected_rows == 1
        await db.execute("teardown")
    finally:
        if system == "mysql":
            await _mysql(f"DROP DATABASE IF EXISTS {schema}")


@pytest.mark.parametrize(
    ("system", "url"),
    [
        ("postgresql", "postgresql://someone:hunter2-secret@127.0.0.1:1/test"),
        ("mysql", "mysql://root:hunter2-secret@127.0.0.1:3306/test"),
        ("mysql", "mysql://root:hunter2-secret@127.0.0.1:1/test"),
    ],
)
async def test_an_unreachable_database_is_unavailable_and_never_shows_the_password(
    start_server: ServerFactory, system: str, url: str
) -> None:
    await require(system)
    running = await start_server()
    secret_url = url.replace("hunter2-secret", "$Secret{DB_PASSWORD}")
    os.environ["PROCESSOR_SECRET_DB_PASSWORD"] = "hunter2-secret"
    try:
        db = Db(running, system, "t_x", "t_x")
        await db.apply([{"tag": "ping", "type": "read", "query": "SELECT 1 AS one"}], url=secret_url)
        with pytest.raises(UnavailableError) as caught:
            await db.execute("ping", retries=0)
    finally:
        del os.environ["PROCESSOR_SECRET_DB_PASSWORD"]
    assert caught.value.reason == "DB_UNREACHABLE"
    shown = f"{caught.value} {caught.value.metadata} {caught.value.field_violations}"
    assert "hunter2" not in shown and "someone" not in shown


@pytest.mark.parametrize("system", SYSTEMS)
async def test_results_over_the_bounds_are_resource_exhausted(start_server: ServerFactory, system: str) -> None:
    db = await open_db(start_server, system, database_max_rows=5, database_max_result_bytes=1024)
    try:
        for i in range(1, 7):
            await db.execute("create", data={"id": i, "email": f"u{i}@x", "name": "short", "score": i})
        with pytest.raises(ResourceExhaustedError) as rows:
            await db.execute("list", filter={"min": 0})
        assert rows.value.reason == "DB_RESULT_TOO_LARGE" and rows.value.metadata["limit"] == "rows"
        assert len((await db.execute("list", filter={"min": 2})).rows) == 5
        page = await db.execute("list", filter={"min": 0}, page_size=5)
        assert len(page.rows) == 5 and page.next_page_token
        await db.execute("rename", data={"name": "n" * 190}, filter={"min": 0})
        with pytest.raises(ResourceExhaustedError) as size:
            await db.execute("list", filter={"min": 0}, page_size=5)
        assert size.value.metadata["limit"] == "bytes"
    finally:
        await db.execute("teardown")


async def test_a_new_dsn_closes_the_old_pool(start_server: ServerFactory) -> None:
    db = await open_db(start_server, "postgresql")
    old = db.run
    try:
        assert await _connections(old) >= 1
        db.run = f"t_{secrets.token_hex(5)}"  # a new application_name: another DSN
        await reopen(db)
        assert (await db.execute("count", filter={"min": 0})).count == 0
        for _ in range(100):
            if await _connections(old) == 0:
                break
            await asyncio.sleep(0.05)
        assert await _connections(old) == 0
        assert await _connections(db.run) >= 1
    finally:
        await db.execute("teardown")


async def _connections(application: str) -> int:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application)
        )
    finally:
        await conn.close()


async def test_a_sqlite_file_linked_outside_the_data_directory_is_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    running = await start_server()
    folder = Path(running.app.settings.data_dir) / "databases" / "shop"
    folder.mkdir(parents=True)
    (folder / "link.db").symlink_to(tmp_path / "elsewhere.db")
    db = Db(running, "sqlite", "link", "t_x")
    await db.apply([{"tag": "ping", "type": "read", "query": "SELECT 1 AS one"}])
    with pytest.raises(FailedPreconditionError) as caught:
        await db.execute("ping")
    assert "outside" in str(caught.value)
    assert not (tmp_path / "elsewhere.db").exists()
