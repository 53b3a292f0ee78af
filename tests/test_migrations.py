"""MigrationService through a real server, on SQLite, PostgreSQL and MariaDB: run, roll back, status and drift,
plan, failures, and two processors migrating one database at once."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from typing import Any

import pytest
from ductape.processor import FailedPreconditionError, NotFoundError

from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import Running, ServerFactory
from tests.test_databases import SYSTEMS, env_config, require


def migrations(table: str, *, changed: bool = False, broken: bool = False) -> list[dict[str, Any]]:
    second = f"ALTER TABLE {table} ADD COLUMN email VARCHAR(100)"
    return [
        {
            "tag": "create_users",
            "up": [f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(100) DEFAULT '100%')"],
            "down": [f"DROP TABLE {table}"],
        },
        {
            "tag": "add_email",
            "up": [second + (" NOT NULL" if changed else "")],
            "down": [f"ALTER TABLE {table} DROP COLUMN email"],
        },
        {
            "tag": "add_index",
            "up": [f"CREATE INDEX {table}_email ON {table} (email)"]
            + ([f"INSERT INTO {table}_nowhere VALUES (1)"] if broken else []),
            "down": [f"DROP INDEX {table}_email"],
        },
    ]


def document(system: str, run: str, **options: Any) -> bytes:
    items = migrations(run, **options)
    if system == "mysql":  # MySQL names the table of an index it drops
        items[2]["down"] = [f"DROP INDEX {run}_email ON {run}"]
    return json.dumps(
        {
            "product": run,  # the record's scope is product/database: unique per test, as the table is
            "environments": [{"slug": "dev"}],
            "databases": [
                {
                    "tag": "main",
                    "envs": {"dev": env_config(system, run)},
                    "migrations": items,
                    "actions": [{"tag": "drop", "type": "execute", "query": f"DROP TABLE IF EXISTS {run}"}],
                }
            ],
        }
    ).encode()


async def status(running: Running, run: str) -> dict[str, str]:
    found = await running.client.migration.status(product=run, env="dev", database="main")
    return {item.tag: item.state for item in found}


async def start(start_server: ServerFactory, system: str, **options: Any) -> tuple[Running, str]:
    await require(system)
    run = f"t_{secrets.token_hex(5)}"
    running = await start_server()
    await running.client.product.apply(document(system, run, **options))
    return running, run


async def cleanup(running: Running, system: str, run: str) -> None:
    await running.client.database.execute(product=run, env="dev", database="main", action="drop")
    if system != "sqlite":
        await _forget(system, run)


async def _forget(system: str, run: str) -> None:
    """Delete this test's rows of the record (its scope is `<run>/main`) from the shared database."""
    if system == "postgresql":
        import asyncpg

        from tests.conftest import POSTGRES_DSN

        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute("DELETE FROM ductape_migrations WHERE scope = $1", f"{run}/main")
        finally:
            await conn.close()
    else:
        from tests.test_database_faults import _mysql

        await _mysql(f"DELETE FROM test.ductape_migrations WHERE scope = '{run}/main'")


@pytest.mark.parametrize("system", SYSTEMS)
async def test_run_status_plan_and_rollback(start_server: ServerFactory, system: str) -> None:
    running, run = await start(start_server, system)
    client = running.client.migration
    try:
        planned = await client.plan(product=run, env="dev", database="main")
        assert [tag for tag, _ in planned] == ["create_users", "add_email", "add_index"]
        assert await status(running, run) == {"create_users": "pending", "add_email": "pending", "add_index": "pending"}

        applied = await client.run(product=run, env="dev", database="main", tag="add_email")
        assert [m.tag for m in applied] == ["create_users", "add_email"]
        assert await status(running, run) == {"create_users": "applied", "add_email": "applied", "add_index": "pending"}
        assert [m.tag for m in await client.run(product=run, env="dev", database="main")] == ["add_index"]
        assert await client.run(product=run, env="dev", database="main") == []

        planned_back = await client.plan(product=run, env="dev", database="main", rollback=True, steps=2)
        assert [tag for tag, _ in planned_back] == ["add_index", "add_email"]
        reverted = await client.rollback(product=run, env="dev", database="main", steps=2)
        assert [m.tag for m in reverted] == ["add_index", "add_email"]
        assert await status(running, run) == {"create_users": "applied", "add_email": "pending", "add_index": "pending"}
        assert [m.tag for m in await client.rollback(product=run, env="dev", database="main", tag="create_users")] == [
            "create_users"
        ]
        assert set((await status(running, run)).values()) == {"pending"}
        with pytest.raises(NotFoundError) as unknown:
            await client.run(product=run, env="dev", database="main", tag="nope")
        assert unknown.value.reason == "MIGRATION_NOT_FOUND"
    finally:
        await cleanup(running, system, run)


@pytest.mark.parametrize("system", SYSTEMS)
async def test_a_changed_migration_is_reported_as_drift(start_server: ServerFactory, system: str) -> None:
    running, run = await start(start_server, system)
    try:
        await running.client.migration.run(product=run, env="dev", database="main", tag="add_email")
        await running.client.product.apply(document(system, run, changed=True))
        assert await status(running, run) == {"create_users": "applied", "add_email": "drifted", "add_index": "pending"}
    finally:
        await cleanup(running, system, run)


@pytest.mark.parametrize("system", SYSTEMS)
async def test_a_failing_migration_stops_the_run_and_keeps_the_earlier_ones(
    start_server: ServerFactory, system: str
) -> None:
    running, run = await start(start_server, system, broken=True)
    try:
        with pytest.raises(FailedPreconditionError) as caught:
            await running.client.migration.run(product=run, env="dev", database="main")
        assert caught.value.reason == "MIGRATION_FAILED" and caught.value.metadata["migration"] == "add_index"
        found = await status(running, run)
        assert found["create_users"] == found["add_email"] == "applied"
        # PostgreSQL and SQLite undo the failed migration whole; MySQL committed its index: recorded as failed.
        assert found["add_index"] == ("failed" if system == "mysql" else "pending")
        if system == "mysql":
            with pytest.raises(FailedPreconditionError):
                await running.client.migration.run(product=run, env="dev", database="main")
            await running.client.migration.rollback(product=run, env="dev", database="main", tag="add_index")
            assert (await status(running, run))["add_index"] == "pending"
    finally:
        await cleanup(running, system, run)


@pytest.mark.parametrize("system", SYSTEMS)
async def test_two_processors_migrating_at_once_apply_each_migration_once(
    start_server: ServerFactory, system: str, tmp_path: Any
) -> None:
    await require(system)
    run = f"t_{secrets.token_hex(5)}"
    # Two processors (replicas) sharing one store and, for SQLite, one data directory: the same database file.
    first = await start_server(data_dir=tmp_path / "shared", store=SqliteStore(tmp_path / "store.db"))
    second = await start_server(data_dir=tmp_path / "shared", store=SqliteStore(tmp_path / "store.db"))
    await first.client.product.apply(document(system, run))
    try:
        results = await asyncio.gather(
            *(
                replica.client.migration.run(product=run, env="dev", database="main")
                for replica in (first, second, first, second)
            )
        )
        applied = [m.tag for result in results for m in result]
        assert sorted(applied) == ["add_email", "add_index", "create_users"]
        assert set((await status(second, run)).values()) == {"applied"}
    finally:
        await cleanup(first, system, run)


async def test_the_migrate_command_runs_reports_and_plans_through_the_processor(start_server: ServerFactory) -> None:
    running, run = await start(start_server, "sqlite")

    async def migrate(*arguments: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ductape_processor.cli", "migrate", *arguments,
            "--address", running.address, "--product", run, "--env", "dev", "--database", "main",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    code, out = await migrate("plan")
    assert code == 0 and f"CREATE TABLE {run} (" in out and "-- add_index" in out
    code, out = await migrate("run", "--tag", "add_email")
    assert code == 0 and out.splitlines()[0].startswith("applied create_users (1 statements")
    code, out = await migrate("status")
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["applied", "create_users"],
        ["applied", "add_email"],
        ["pending", "add_index"],
    ]
    code, out = await migrate("rollback", "--tag", "nope")
    assert code == 1 and "MIGRATION_NOT_FOUND" in out
    code, out = await migrate("rollback", "--steps", "2")
    assert code == 0 and [line.split()[2] for line in out.splitlines()] == ["add_email", "create_users"]
