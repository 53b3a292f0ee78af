"""SQLite through aiosqlite: a file under the product's database folder, a small pool of connections.

Each aiosqlite connection runs its statements on a thread of its own, so the event loop never waits on the file.
Connections run in autocommit mode (`isolation_level=None`) with foreign keys enforced and WAL journaling; a
transaction is an explicit BEGIN … COMMIT. A statement past its time is interrupted (`sqlite3_interrupt`) and its
connection closed rather than reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiosqlite

from ductape_processor.adapters.databases import base
from ductape_processor.adapters.databases.pool import SlotPool
from ductape_processor.runtime.registry.databases import SqliteDatabaseEnv

_CONSTRAINT = re.compile(r"^(UNIQUE|FOREIGN KEY|CHECK|NOT NULL) constraint failed(?::\s*(.*))?$")
_KINDS: dict[str, base.ConstraintKind] = {
    "UNIQUE": "unique",
    "FOREIGN KEY": "foreign_key",
    "CHECK": "check",
    "NOT NULL": "not_null",
}


def database_file(folder: Path, path: str, database: str, env: str) -> Path:
    """The file of a database in one environment: `path` (default `<database>.<env>.db`, so environments never share
    one) inside `folder`, refused if it resolves outside it (a symbolic link pointing elsewhere, for instance). The
    manifest already refuses absolute paths and `..`."""
    root = folder.resolve()
    target = (root / (path or f"{database}.{env}.db")).resolve()
    if not target.is_relative_to(root) or target == root:
        raise base.QueryInvalid(f"database {database!r}: its path leads outside the product's database folder")
    return target


def failure(exc: BaseException, what: str) -> base.DatabaseFailure:
    """A sqlite3 error as the processor reports it. SQLite's messages name tables and columns, never credentials."""
    message = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        match = _CONSTRAINT.match(message)
        kind: base.ConstraintKind = _KINDS[match.group(1)] if match else "other"
        constraint = (match.group(2) or "") if match else ""
        return base.ConstraintViolation(f"{what}: {message}", kind=kind, constraint=constraint)
    if isinstance(exc, sqlite3.OperationalError):
        if "interrupted" in message:
            return base.StatementTimeout(f"{what}: the statement ran past its time")
        if "locked" in message or "busy" in message:
            return base.StatementTimeout(
                f"{what}: the database stayed locked by another writer past the statement's time"
            )
        if "unable to open" in message or "disk I/O" in message:
            return base.DatabaseUnreachable(f"{what}: the database file cannot be opened ({message})", sent=False)
        return base.QueryInvalid(f"{what}: {message}")
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError | OverflowError | sqlite3.DataError):
        return base.ValueRejected(f"{what}: {message}")
    return base.QueryInvalid(f"{what}: {type(exc).__name__}: {message}")


_PRIVATE_FILES: Final = frozenset({"", ":memory:"})
"""Databases an ATTACH may name: SQLite's private temporary ones (a plain VACUUM attaches `''`)."""
_PROCESS_PRAGMAS: Final = frozenset({"temp_store_directory", "data_store_directory"})
"""Pragmas that change the whole process (every connection, the processor's own store included)."""


def confine(action: int, first: str | None, second: str | None, _database: str | None, _trigger: str | None) -> int:
    """SQLite's authorizer on every connection: a statement may not open any other file than the database's own.
    ATTACH (and VACUUM INTO, which attaches its target) would let a manifest read or write any file the processor
    can: another product's database, the processor's own store. Checked as each statement is prepared."""
    if action == sqlite3.SQLITE_ATTACH and first not in _PRIVATE_FILES:  # None: a bound parameter, unknown here
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (first or "").lower() in _PROCESS_PRAGMAS and second is not None:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


async def _command(conn: aiosqlite.Connection, sql: str) -> None:
    """Run one statement of the processor's own (PRAGMA, BEGIN, COMMIT …) and close its cursor at once: a statement
    left open on a connection (`PRAGMA journal_mode = WAL` answers a row) makes SQLite refuse a later DROP or ALTER
    on that connection with "database table is locked"."""
    cursor = await conn.execute(sql)
    await cursor.close()


async def _fetch(cursor: aiosqlite.Cursor, statement: base.Statement, what: str) -> list[Any]:
    """The statement's rows; with bounds, fetched a chunk at a time and stopped as soon as they pass them."""
    if statement.bounds is None:
        return list(await cursor.fetchall())
    return await base.RowBudget(statement.bounds, what).fetch(cursor.fetchmany)


class _Session(base.DatabaseSession):
    def __init__(self, adapter: SqliteDatabase, conn: aiosqlite.Connection) -> None:
        self._adapter = adapter
        self.conn = conn
        self.broken = False
        self._depth = 0  # transactions open on this connection: an inner one is a savepoint

    async def run(self, statement: base.Statement, timeout_s: float) -> base.Outcome:
        conn = self.conn
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                cursor = await conn.execute(statement.text, tuple(base.plain_parameter(v) for v in statement.args))
                try:
                    rows = await _fetch(cursor, statement, self._adapter.name) if statement.returns_rows else []
                    columns = [d[0] for d in cursor.description or ()]
                    affected = max(cursor.rowcount, 0)
                    last = cursor.lastrowid
                finally:
                    await cursor.close()
        except TimeoutError:
            self.broken = True
            with contextlib.suppress(Exception):
                await conn.interrupt()
            raise base.StatementTimeout(f"{self._adapter.name}: the statement ran past its time") from None
        except asyncio.CancelledError:
            self.broken = True  # the caller gave up: the statement goes on in the thread; the connection is not reused
            with contextlib.suppress(Exception):
                await conn.interrupt()
            raise
        except (sqlite3.Error, OverflowError) as exc:
            raise failure(exc, self._adapter.name) from None
        except ValueError as exc:  # aiosqlite: the connection was closed under us
            self.broken = True
            raise base.DatabaseUnreachable(f"{self._adapter.name}: the connection closed ({exc})", sent=True) from None
        return base.Outcome(columns, [tuple(row) for row in rows], affected, last or None)

    @contextlib.asynccontextmanager
    async def _begin(self, kind: str, wait_s: float | None = None) -> AsyncIterator[None]:
        savepoint = f"ductape_{self._depth}"
        begin, commit, rollback = (
            (f"SAVEPOINT {savepoint}", f"RELEASE {savepoint}", f"ROLLBACK TO {savepoint}")
            if self._depth
            else (f"BEGIN {kind}", "COMMIT", "ROLLBACK")
        )
        try:
            async with asyncio.timeout(wait_s):
                await _command(self.conn, begin)
        except sqlite3.Error as exc:
            raise failure(exc, self._adapter.name) from None
        except BaseException as exc:
            # Timed out or cancelled while SQLite waited for another writer: the BEGIN goes on in the connection's
            # thread and may yet take the lock, so the connection is closed (ending that transaction), never reused.
            self.broken = True
            if isinstance(exc, TimeoutError):
                raise base.StatementTimeout(
                    f"{self._adapter.name}: the database stayed locked by another writer"
                ) from None
            raise
        self._depth += 1
        try:
            yield
        except BaseException:
            await self._end(rollback, commit if self._depth > 1 else None)
            raise
        else:
            try:
                await _command(self.conn, commit)
            except BaseException as exc:
                await self._end(rollback, None)
                if isinstance(exc, sqlite3.Error):
                    raise failure(exc, self._adapter.name) from None
                raise
        finally:
            self._depth -= 1

    async def _end(self, rollback: str, release: str | None) -> None:
        """Roll a failed transaction (or savepoint) back; a connection where that fails too is not reused, so no
        transaction stays open on a pooled connection."""
        try:
            await _command(self.conn, rollback)
            if release is not None:
                await _command(self.conn, release)  # a savepoint rolled back to is still open: end it
        except BaseException:
            self.broken = True

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._begin("DEFERRED")

    def locked(self, name: str, timeout_s: float) -> contextlib.AbstractAsyncContextManager[None]:
        # A write transaction is SQLite's database-wide lock: BEGIN IMMEDIATE waits (busy_timeout) for other writers,
        # and the caller no longer than `timeout_s`.
        return self._begin("IMMEDIATE", max(timeout_s, 0.0))


class SqliteDatabase(base.DatabaseAdapter):
    """An SQLite file and a pool of aiosqlite connections to it."""

    dialect = "sqlite"

    def __init__(self, settings: SqliteDatabaseEnv, place: base.Place) -> None:
        self.name = place.name
        self._file = database_file(place.folder, settings.path, place.database, place.env)
        self._busy_ms = int(settings.statement_timeout.total_seconds() * 1000)
        self._pool: SlotPool[aiosqlite.Connection] = SlotPool(settings.pool.max, self._open, self._close)

    async def _open(self) -> aiosqlite.Connection:
        def prepare() -> None:
            self._file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

        try:
            await asyncio.to_thread(prepare)
            conn = await aiosqlite.connect(self._file, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise base.DatabaseUnreachable(
                f"{self.name}: cannot open the database file ({type(exc).__name__})", sent=False
            ) from None
        try:
            await conn.set_authorizer(confine)
            await _command(conn, "PRAGMA foreign_keys = ON")
            await _command(conn, f"PRAGMA busy_timeout = {self._busy_ms:d}")
            async with conn.execute("PRAGMA journal_mode") as cursor:
                mode = await cursor.fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                # Switching the journal mode does not wait for other connections (SQLite answers "locked" at once
                # while another holds a lock): WAL is an optimisation, so a connection that cannot switch goes on.
                with contextlib.suppress(sqlite3.OperationalError):
                    await _command(conn, "PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            await conn.close()
            raise failure(exc, self.name) from None
        return conn

    @staticmethod
    async def _close(conn: aiosqlite.Connection) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    def session(self, acquire_timeout_s: float | None) -> contextlib.AbstractAsyncContextManager[base.DatabaseSession]:
        return self._pool.lend(
            acquire_timeout_s, f"{self.name}: every connection stayed busy", lambda conn: _Session(self, conn)
        )

    async def close(self) -> None:
        await self._pool.close()
