"""The embedded store: one SQLite file through aiosqlite, nothing to install.

One connection in WAL mode; writes take an in-process lock and `BEGIN IMMEDIATE`, so they are serialised also
against another process using the same file (busy timeout 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Generator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ductape_processor.errors import StoreUnavailable
from ductape_processor.store.base import (
    ExecutionFilter,
    ExecutionRecord,
    IdempotencyRecord,
    ProductRevision,
    SessionRecord,
    Store,
    VersionRecord,
)
from ductape_processor.store.files import private_directory, private_file
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


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


_IDEMPOTENCY_COLUMNS = "key, request_hash, owner, state, response, lease_until, expires_at"
_EXECUTION_COLUMNS = (
    "process_id, product, env, version, kind, resource, status, started_at, ended_at, attempts, "
    "upstream_status, error_reason, cached, detail"
)


def _idempotency(row: Any) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=row[0],
        request_hash=row[1],
        owner=row[2],
        state=row[3],
        response=bytes(row[4]) if row[4] is not None else None,
        lease_until=_dt(row[5]),
        expires_at=_dt(row[6]),
    )


_INSERT_EXECUTION = (
    f"INSERT OR IGNORE INTO executions ({_EXECUTION_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _execution_row(r: ExecutionRecord) -> tuple[Any, ...]:
    return (
        r.process_id,
        r.product,
        r.env,
        r.version,
        r.kind,
        r.resource,
        r.status,
        _ts(r.started_at),
        _ts(r.ended_at),
        r.attempts,
        r.upstream_status,
        r.error_reason,
        int(r.cached),
        r.detail,
    )


_SESSION_COLUMNS = (
    "session_id, product, env, tag, identifier, generation, started_at, refreshed_at, expires_at, revoked_at"
)


def _session(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row[0],
        product=row[1],
        env=row[2],
        tag=row[3],
        identifier=row[4],
        generation=row[5],
        started_at=_dt(row[6]),
        refreshed_at=_dt(row[7]),
        expires_at=_dt(row[8]),
        revoked_at=_dt(row[9]) if row[9] is not None else None,
    )


def _execution(row: Any) -> ExecutionRecord:
    return ExecutionRecord(
        process_id=row[0],
        product=row[1],
        env=row[2],
        version=row[3],
        kind=row[4],
        resource=row[5],
        status=row[6],
        started_at=_dt(row[7]),
        ended_at=_dt(row[8]),
        attempts=row[9],
        upstream_status=row[10],
        error_reason=row[11],
        cached=bool(row[12]),
        detail=row[13],
    )


# Failures of the database rather than of the statement: locked past the busy timeout, disk full, I/O errors.
# (IntegrityError and ProgrammingError are bugs or conflicts the caller handles, not outages.)
_STORE_FAILURE = (sqlite3.OperationalError, sqlite3.InternalError)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the store (SQLite) failed: {exc}; retry the call", metadata={"store": "sqlite"})


class _Statement:
    """One statement's result, awaited or used as `async with`; store failures become StoreUnavailable."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def __await__(self) -> Generator[Any, None, aiosqlite.Cursor]:
        return self._run().__await__()

    async def _run(self) -> aiosqlite.Cursor:
        try:
            cursor: aiosqlite.Cursor = await self._result
        except _STORE_FAILURE as exc:
            raise _unavailable(exc) from exc
        return cursor

    async def __aenter__(self) -> aiosqlite.Cursor:
        try:
            cursor: aiosqlite.Cursor = await self._result.__aenter__()
        except _STORE_FAILURE as exc:
            raise _unavailable(exc) from exc
        return cursor

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._result.__aexit__(*exc_info)


class _Connection:
    """The aiosqlite connection as the store uses it: the one place where SQLite failures become StoreUnavailable."""

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    @property
    def in_transaction(self) -> bool:
        return bool(self.raw.in_transaction)

    def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> _Statement:
        return _Statement(self.raw.execute(sql, parameters))

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Awaitable[aiosqlite.Cursor]:
        return _Statement(self.raw.executemany(sql, parameters))


class SqliteStore(Store):
    """Store on a local SQLite file."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def db(self) -> _Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return _Connection(self._db)

    async def open(self) -> None:
        # SQLite gives the -wal and -shm files it creates the database file's mode: a 0600 database keeps them 0600.
        private_directory(self._path.parent, tighten=False)
        private_file(self._path)
        for suffix in ("-wal", "-shm", "-journal"):
            private_file(self._path.with_name(self._path.name + suffix), create=False)
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
        async with self._transaction():
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

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction: serialised in-process by a lock and across processes by BEGIN IMMEDIATE.

        Rolled back on any exception, cancellation included; the rollback is shielded so a cancelled caller still
        leaves the connection outside a transaction for the next one.
        """
        async with self._write_lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if db.in_transaction:
                    await asyncio.shield(db.execute("ROLLBACK"))
                raise
            await db.execute("COMMIT")

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
        async with self._transaction():
            async with self.db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = ? "  # noqa: S608
                "ORDER BY version DESC LIMIT 1",
                (product,),
            ) as cur:
                row = await cur.fetchone()
            latest = _record(row) if row else None
            if latest is not None and latest.checksum == checksum:
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
            return record, True

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
        async with self._transaction():
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
        return int(row[0]) if row else None

    async def pins(self, product: str) -> dict[str, int]:
        async with self.db.execute("SELECT env, version FROM environment_pins WHERE product = ?", (product,)) as cur:
            rows = await cur.fetchall()
        return {str(env): int(version) for env, version in rows}

    async def revisions(self) -> list[ProductRevision]:
        async with self.db.execute("SELECT product, revision FROM products") as cur:
            rows = await cur.fetchall()
        return [ProductRevision(str(product), int(revision)) for product, revision in rows]

    # -- auth tokens --------------------------------------------------------------------------------------------

    async def get_auth_token(self, key: str, now: datetime) -> str | None:
        async with self.db.execute(
            "SELECT token_values FROM auth_tokens WHERE key = ? AND expires_at > ?", (key, _ts(now))
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def put_auth_token(self, key: str, values: str, expires_at: datetime) -> None:
        async with self._write_lock:
            await self.db.execute(
                "INSERT INTO auth_tokens (key, token_values, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET token_values = excluded.token_values, "
                "expires_at = excluded.expires_at",
                (key, values, _ts(expires_at)),
            )

    async def delete_auth_token(self, key: str, values: str) -> None:
        async with self._write_lock:
            await self.db.execute("DELETE FROM auth_tokens WHERE key = ? AND token_values = ?", (key, values))

    # -- cache --------------------------------------------------------------------------------------------------

    async def cache_get(self, key: str, now: datetime) -> bytes | None:
        async with self.db.execute(
            "SELECT value FROM cache_entries WHERE key = ? AND expires_at > ?", (key, _ts(now))
        ) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row else None

    async def cache_put(self, key: str, value: bytes, expires_at: datetime) -> None:
        async with self._write_lock:
            await self.db.execute(
                "INSERT INTO cache_entries (key, value, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                (key, value, _ts(expires_at)),
            )

    # -- idempotency --------------------------------------------------------------------------------------------

    async def idempotency_claim(
        self, key: str, request_hash: str, owner: str, now: datetime, lease_until: datetime, expires_at: datetime
    ) -> IdempotencyRecord:
        async with self._transaction():
            await self.db.execute(
                "INSERT INTO idempotency_keys (key, request_hash, owner, state, response, lease_until, expires_at) "
                "VALUES (?, ?, ?, 'pending', NULL, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "request_hash = excluded.request_hash, owner = excluded.owner, state = 'pending', response = NULL, "
                "lease_until = excluded.lease_until, expires_at = excluded.expires_at "
                "WHERE idempotency_keys.expires_at <= ? "
                "OR (idempotency_keys.state = 'pending' AND idempotency_keys.lease_until <= ?)",
                (key, request_hash, owner, _ts(lease_until), _ts(expires_at), _ts(now), _ts(now)),
            )
            async with self.db.execute(
                f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = ?",  # noqa: S608
                (key,),
            ) as cur:
                row = await cur.fetchone()
        return _idempotency(row)

    async def idempotency_mark_sent(self, key: str, owner: str, lease_until: datetime) -> bool:
        async with self._write_lock:
            cursor = await self.db.execute(
                "UPDATE idempotency_keys SET state = 'sent', lease_until = ? "
                "WHERE key = ? AND owner = ? AND state IN ('pending', 'sent')",
                (_ts(lease_until), key, owner),
            )
            return cursor.rowcount == 1

    async def idempotency_renew(self, key: str, owner: str, lease_until: datetime) -> bool:
        async with self._write_lock:
            cursor = await self.db.execute(
                "UPDATE idempotency_keys SET lease_until = ? WHERE key = ? AND owner = ? AND state <> 'done'",
                (_ts(lease_until), key, owner),
            )
            return cursor.rowcount == 1

    async def idempotency_complete(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord | None = None
    ) -> bool:
        async with self._transaction():
            cursor = await self.db.execute(
                "UPDATE idempotency_keys SET state = 'done', response = ? WHERE key = ? AND owner = ?",
                (response, key, owner),
            )
            if record is not None:
                await self.db.execute(_INSERT_EXECUTION, _execution_row(record))
            return cursor.rowcount == 1

    async def idempotency_release(self, key: str, owner: str) -> None:
        async with self._write_lock:
            await self.db.execute(
                "DELETE FROM idempotency_keys WHERE key = ? AND owner = ? AND state IN ('pending', 'sent')",
                (key, owner),
            )

    async def idempotency_get(self, key: str) -> IdempotencyRecord | None:
        async with self.db.execute(
            f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = ?",  # noqa: S608
            (key,),
        ) as cur:
            row = await cur.fetchone()
        return _idempotency(row) if row else None

    # -- executions ---------------------------------------------------------------------------------------------

    async def insert_executions(self, records: list[ExecutionRecord]) -> None:
        if not records:
            return
        async with self._transaction():
            await self.db.executemany(_INSERT_EXECUTION, [_execution_row(r) for r in records])

    async def list_executions(
        self, where: ExecutionFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ExecutionRecord]:
        clauses = ["product = ?"]
        params: list[Any] = [where.product]
        if where.env is not None:
            clauses.append("env = ?")
            params.append(where.env)
        if where.resource is not None:
            clauses.append("resource = ?")
            params.append(where.resource)
        if where.status is not None:
            clauses.append("status = ?")
            params.append(where.status)
        if where.since is not None:
            clauses.append("started_at >= ?")
            params.append(_ts(where.since))
        if where.until is not None:
            clauses.append("started_at < ?")
            params.append(_ts(where.until))
        if after is not None:
            clauses.append("(started_at < ? OR (started_at = ? AND process_id < ?))")
            params += [_ts(after[0]), _ts(after[0]), after[1]]
        params.append(limit)
        # The clauses are fixed strings chosen above; every value is a bound parameter.
        sql = (
            f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE {' AND '.join(clauses)} "  # noqa: S608
            "ORDER BY started_at DESC, process_id DESC LIMIT ?"
        )
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [_execution(row) for row in rows]

    # -- sessions -----------------------------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        async with self._write_lock:
            await self.db.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",  # noqa: S608
                (
                    record.session_id,
                    record.product,
                    record.env,
                    record.tag,
                    record.identifier,
                    record.generation,
                    _ts(record.started_at),
                    _ts(record.refreshed_at),
                    _ts(record.expires_at),
                ),
            )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        async with self.db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?",  # noqa: S608
            (session_id,),
        ) as cur:
            row = await cur.fetchone()
        return _session(row) if row else None

    async def rotate_session(self, session_id: str, generation: int, now: datetime) -> SessionRecord | None:
        async with self._write_lock:
            cursor = await self.db.execute(
                "UPDATE sessions SET generation = generation + 1, refreshed_at = ? "
                "WHERE session_id = ? AND generation = ? AND revoked_at IS NULL AND expires_at > ?",
                (_ts(now), session_id, generation, _ts(now)),
            )
            if cursor.rowcount != 1:
                return None
        return await self.get_session(session_id)

    async def revoke_sessions(
        self, product: str, env: str, tag: str, *, session_id: str | None, identifier: str | None, now: datetime
    ) -> list[tuple[str, datetime]]:
        column, value = ("session_id", session_id) if session_id is not None else ("identifier", identifier)
        async with (
            self._write_lock,
            self.db.execute(
                f"UPDATE sessions SET revoked_at = ? WHERE product = ? AND env = ? AND tag = ? AND {column} = ? "  # noqa: S608
                "AND revoked_at IS NULL RETURNING session_id, expires_at",
                (_ts(now), product, env, tag, value),
            ) as cur,
        ):
            rows = await cur.fetchall()
        return [(str(row[0]), _dt(row[1])) for row in rows]

    async def list_sessions(
        self,
        product: str,
        env: str,
        tag: str,
        identifier: str | None,
        now: datetime,
        *,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SessionRecord]:
        clauses = ["product = ?", "env = ?", "tag = ?", "revoked_at IS NULL", "expires_at > ?"]
        params: list[Any] = [product, env, tag, _ts(now)]
        if identifier is not None:
            clauses.append("identifier = ?")
            params.append(identifier)
        if after is not None:
            clauses.append("(started_at < ? OR (started_at = ? AND session_id < ?))")
            params += [_ts(after[0]), _ts(after[0]), after[1]]
        params.append(limit)
        sql = (
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(clauses)} "  # noqa: S608
            "ORDER BY started_at DESC, session_id DESC LIMIT ?"
        )
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [_session(row) for row in rows]

    async def revoked_since(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        async with self.db.execute(
            "SELECT session_id, revoked_at, expires_at FROM sessions WHERE revoked_at IS NOT NULL AND revoked_at >= ? "
            "ORDER BY revoked_at",
            (_ts(since),),
        ) as cur:
            rows = await cur.fetchall()
        return [(str(row[0]), _dt(row[1]), _dt(row[2])) for row in rows]

    async def purge_expired(self, now: datetime) -> int:
        removed = 0
        async with self._write_lock:
            for table in ("auth_tokens", "cache_entries", "idempotency_keys"):
                cursor = await self.db.execute(
                    f"DELETE FROM {table} WHERE expires_at <= ?",  # noqa: S608 - fixed table names
                    (_ts(now),),
                )
                removed += cursor.rowcount
        return removed
