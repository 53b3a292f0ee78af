"""The embedded store: one SQLite file through aiosqlite, nothing to install.

One connection in WAL mode; writes take an in-process lock and `BEGIN IMMEDIATE`, so they are serialised also
against another process using the same file (busy timeout 5 s). The statements and row mappers are shared with
PostgreSQL (sql.py); this module holds what is SQLite's own: the connection, its failures, and the locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

from ductape_processor.errors import StoreUnavailable
from ductape_processor.store import migrations, statements
from ductape_processor.store.features import SqlFeatureStore
from ductape_processor.store.files import private_directory, private_file
from ductape_processor.store.sql import Connection, Row
from ductape_processor.store.statements import SqlValue, Statement

_T = TypeVar("_T")


# Failures of the database rather than of the statement: locked past the busy timeout, disk full, I/O errors.
# (IntegrityError and ProgrammingError are bugs or conflicts the caller handles, not outages.)
_STORE_FAILURE = (sqlite3.OperationalError, sqlite3.InternalError)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the store (SQLite) failed: {exc}; retry the call", metadata={"store": "sqlite"})


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except _STORE_FAILURE as exc:
        raise _unavailable(exc) from exc


class _Connection:
    """The aiosqlite connection as the store uses it: the one place where SQLite failures become StoreUnavailable."""

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    @property
    def in_transaction(self) -> bool:
        return bool(self.raw.in_transaction)

    async def run(self, command: str) -> None:
        """A statement without parameters or result (BEGIN, COMMIT, ROLLBACK)."""
        with _mapped():
            await self.raw.execute(command)

    # Each call is one trip to aiosqlite's thread (about 28 µs of CPU, and a wake-up of that thread): a statement run
    # through a cursor that is then fetched from and closed took two or three.

    async def fetch(self, statement: Statement, *args: SqlValue) -> Sequence[Row]:
        with _mapped():
            return list(await self.raw.execute_fetchall(statement.qmark, args))

    async def fetchrow(self, statement: Statement, *args: SqlValue) -> Row | None:
        """The first row of a query that gives one at most (a key's row, an aggregate)."""
        with _mapped():
            rows = list(await self.raw.execute_fetchall(statement.qmark, args))
            return rows[0] if rows else None

    async def execute(self, statement: Statement, *args: SqlValue) -> int:
        with _mapped():
            cursor = await self.raw.execute(statement.qmark, args)  # done: nothing to fetch or close
            return int(cursor.rowcount)

    async def executemany(self, statement: Statement, rows: list[tuple[SqlValue, ...]]) -> None:
        with _mapped():
            await self.raw.executemany(statement.qmark, rows)


class SqliteStore(SqlFeatureStore):
    """Store on a local SQLite file."""

    dialect = "sqlite"
    _dialect = statements.SQLITE
    _migrations = migrations.SQLITE

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

    @property
    def _reader(self) -> Connection:
        return self.db

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

    async def _write(self, statement: Statement, *args: SqlValue, retry: bool = True) -> int:
        async with self._write_lock:
            return await self.db.execute(statement, *args)

    async def _write_returning(self, statement: Statement, *args: SqlValue, retry: bool = True) -> Sequence[Row]:
        async with self._write_lock:
            return await self.db.fetch(statement, *args)

    async def _transaction(
        self, body: Callable[[Connection], Awaitable[_T]], *, lock: int | str | None = None, retry: bool = True
    ) -> _T:
        """One write transaction: serialised in-process by a lock and across processes by BEGIN IMMEDIATE (which
        also stands for `lock`); never sent again (the file does not lose its connection).

        Rolled back on any exception, cancellation included; the rollback is shielded so a cancelled caller still
        leaves the connection outside a transaction for the next one. A caller cancelled while its BEGIN is queued in
        the connection's thread is rolled back too, once the BEGIN has run (else the next BEGIN fails with "cannot
        start a transaction within a transaction").
        """
        async with self._write_lock:
            db = self.db
            begin = asyncio.ensure_future(db.run("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
                result = await body(db)
            except BaseException:
                await asyncio.shield(self._roll_back(db, begin))
                raise
            await db.run("COMMIT")
            return result

    @staticmethod
    async def _roll_back(db: _Connection, begin: asyncio.Future[None]) -> None:
        with contextlib.suppress(Exception):
            await begin  # a cancelled caller's BEGIN may still be running
        if db.in_transaction:
            await db.run("ROLLBACK")
