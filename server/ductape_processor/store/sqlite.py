"""The embedded store: one SQLite file through aiosqlite, nothing to install.

One connection in WAL mode; writes take an in-process lock and `BEGIN IMMEDIATE`, so they are serialised also
against another process using the same file (busy timeout 5 s).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ductape_processor.store.base import ProductRevision, Store, VersionRecord
from ductape_processor.store.migrations import SQLITE

_VERSION_COLUMNS = "product, version, checksum, format, source, document, created_at"


def _record(row: Any) -> VersionRecord:
    return VersionRecord(
        product=row[0],
        version=row[1],
        checksum=row[2],
        format=row[3],
        source=bytes(row[4]),
        document=row[5],
        created_at=datetime.fromisoformat(row[6]),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqliteStore(Store):
    """Store on a local SQLite file."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def _migrate(self) -> None:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
                async with self.db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations") as cur:
                    row = await cur.fetchone()
                current = int(row[0]) if row else 0
                for migration in SQLITE:
                    if migration.version <= current:
                        continue
                    for statement in migration.statements:
                        await self.db.execute(statement)
                    await self.db.execute(
                        "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.description, _now()),
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        async with self.db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _bump(self, product: str) -> None:
        await self.db.execute(
            "INSERT INTO products (product, revision) VALUES (?, 1) "
            "ON CONFLICT (product) DO UPDATE SET revision = revision + 1",
            (product,),
        )

    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                async with self.db.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = ? "  # noqa: S608
                    "ORDER BY version DESC LIMIT 1",
                    (product,),
                ) as cur:
                    row = await cur.fetchone()
                latest = _record(row) if row else None
                if latest is not None and latest.checksum == checksum:
                    await self.db.execute("COMMIT")
                    return latest, False
                record = VersionRecord(
                    product=product,
                    version=(latest.version if latest else 0) + 1,
                    checksum=checksum,
                    format=fmt,
                    source=source,
                    document=document,
                    created_at=datetime.now(UTC),
                )
                await self.db.execute(
                    f"INSERT INTO product_versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (product, record.version, checksum, fmt, source, document, record.created_at.isoformat()),
                )
                await self._bump(product)
                await self.db.execute("COMMIT")
                return record, True
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        async with self.db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = ? AND version = ?",  # noqa: S608
            (product, version),
        ) as cur:
            row = await cur.fetchone()
        return _record(row) if row else None

    async def latest_version(self, product: str) -> VersionRecord | None:
        async with self.db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = ? "  # noqa: S608
            "ORDER BY version DESC LIMIT 1",
            (product,),
        ) as cur:
            row = await cur.fetchone()
        return _record(row) if row else None

    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        async with self.db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions "  # noqa: S608
            "WHERE product = ? AND version < ? ORDER BY version DESC LIMIT ?",
            (product, before if before is not None else 2**31, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [_record(row) for row in rows]

    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                async with self.db.execute(
                    "SELECT version FROM environment_pins WHERE product = ? AND env = ?", (product, env)
                ) as cur:
                    row = await cur.fetchone()
                await self.db.execute(
                    "INSERT INTO environment_pins (product, env, version, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (product, env) DO UPDATE SET version = excluded.version, "
                    "updated_at = excluded.updated_at",
                    (product, env, version, _now()),
                )
                await self._bump(product)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return int(row[0]) if row else None

    async def pins(self, product: str) -> dict[str, int]:
        async with self.db.execute("SELECT env, version FROM environment_pins WHERE product = ?", (product,)) as cur:
            rows = await cur.fetchall()
        return {str(env): int(version) for env, version in rows}

    async def revisions(self) -> list[ProductRevision]:
        async with self.db.execute("SELECT product, revision FROM products") as cur:
            rows = await cur.fetchall()
        return [ProductRevision(str(product), int(revision)) for product, revision in rows]
