"""The shared store: PostgreSQL through an asyncpg pool, for several replicas.

All tables live in one schema (`store_schema`, default `processor`). Writes that must not race across replicas
take a transaction-scoped advisory lock per product. Every change is announced with NOTIFY on a channel named
after the schema, so other replicas drop their cached copy within milliseconds; polling `products.revision`
covers a notification lost while a listener reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from ductape_processor.store.base import ChangeListener, ProductRevision, Store, VersionRecord
from ductape_processor.store.migrations import POSTGRES

log = logging.getLogger(__name__)

_VERSION_COLUMNS = "product, version, checksum, format, source, document, created_at"
_MIGRATION_LOCK = 0x70726F63  # advisory lock key held while migrating ("proc")


def _record(row: Any) -> VersionRecord:
    return VersionRecord(
        product=row["product"],
        version=row["version"],
        checksum=row["checksum"],
        format=row["format"],
        source=bytes(row["source"]),
        document=row["document"],
        created_at=row["created_at"],
    )


class PostgresStore(Store):
    """Store on PostgreSQL, shared by every replica."""

    dialect = "postgresql"

    def __init__(self, dsn: str, schema: str = "processor", *, min_size: int = 1, max_size: int = 10) -> None:
        self._dsn = dsn
        self._schema = schema
        self._channel = f"{schema}_product_changes"
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listeners: list[ChangeListener] = []
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def open(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings={"search_path": self._schema, "application_name": "ductape-processor"},
        )
        await self._migrate()

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        if self._listen_conn is not None:
            conn, self._listen_conn = self._listen_conn, None
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for migration in POSTGRES:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )

    async def schema_version(self) -> int:
        return int(await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))

    async def _changed(self, conn: asyncpg.Connection, product: str) -> None:
        await conn.execute(
            "INSERT INTO products (product, revision) VALUES ($1, 1) "
            "ON CONFLICT (product) DO UPDATE SET revision = products.revision + 1",
            product,
        )
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, product)

    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"product:{product}")
            row = await conn.fetchrow(
                f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 "  # noqa: S608
                "ORDER BY version DESC LIMIT 1",
                product,
            )
            if row is not None and row["checksum"] == checksum:
                return _record(row), False
            version = (row["version"] if row else 0) + 1
            created = await conn.fetchrow(
                f"INSERT INTO product_versions (product, version, checksum, format, source, document) "  # noqa: S608
                f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_VERSION_COLUMNS}",
                product,
                version,
                checksum,
                fmt,
                source,
                document,
            )
            await self._changed(conn, product)
            return _record(created), True

    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 AND version = $2",  # noqa: S608
            product,
            version,
        )
        return _record(row) if row else None

    async def latest_version(self, product: str) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 "  # noqa: S608
            "ORDER BY version DESC LIMIT 1",
            product,
        )
        return _record(row) if row else None

    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions "  # noqa: S608
            "WHERE product = $1 AND version < $2 ORDER BY version DESC LIMIT $3",
            product,
            before if before is not None else 2**31 - 1,
            limit,
        )
        return [_record(row) for row in rows]

    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"product:{product}")
            previous = await conn.fetchval(
                "SELECT version FROM environment_pins WHERE product = $1 AND env = $2", product, env
            )
            await conn.execute(
                "INSERT INTO environment_pins (product, env, version) VALUES ($1, $2, $3) "
                "ON CONFLICT (product, env) DO UPDATE SET version = excluded.version, updated_at = now()",
                product,
                env,
                version,
            )
            await self._changed(conn, product)
        return int(previous) if previous is not None else None

    async def pins(self, product: str) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT env, version FROM environment_pins WHERE product = $1", product)
        return {row["env"]: int(row["version"]) for row in rows}

    async def revisions(self) -> list[ProductRevision]:
        rows = await self.pool.fetch("SELECT product, revision FROM products")
        return [ProductRevision(row["product"], int(row["revision"])) for row in rows]

    async def listen(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._listen_conn is None:
            await self._connect_listener()

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(self._channel, self._notified)
        conn.add_termination_listener(self._listener_lost)
        self._listen_conn = conn

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        for listener in self._listeners:
            result = listener(payload)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)  # noqa: RUF006 - listeners are short and log their own errors

    def _listener_lost(self, _conn: Any) -> None:
        self._listen_conn = None
        if not self._closing and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self._connect_listener()
                log.info("store change listener reconnected")
                return
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("store change listener: reconnect failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
