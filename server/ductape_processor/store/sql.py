"""The store's operations and row mappers, written once over a small connection interface.

`SqlStore` implements every `Store` method with the shared statements (statements.py). A back-end supplies its
`Dialect` (placeholders, moments), a `Connection` for reads, and how it writes: a single statement (`_write`), and a
transaction (`_transaction`, with an optional lock name and whether it may be sent again after a lost connection).
SQLite serialises writes with a lock and `BEGIN IMMEDIATE`; PostgreSQL takes advisory locks and re-sends statements
whose connection died.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

from ductape_processor.store import statements as sql
from ductape_processor.store.base import (
    ExecutionFilter,
    ExecutionRecord,
    ExecutionStatus,
    IdempotencyRecord,
    ProductRevision,
    SessionFilter,
    SessionRecord,
    Store,
    VersionRecord,
)
from ductape_processor.store.migrations import Migration, migrations_table
from ductape_processor.store.statements import Dialect, SqlValue, Statement, Where

_T = TypeVar("_T")
IDS_PER_STATEMENT: Final = 500
"""Ids one statement names at most (SQLite bounds a statement's parameters)."""
Cursor = tuple[datetime, str]
"""Where a page of a listing starts: the moment and the id of the last row of the page before."""

MIGRATION_LOCK: Final = 0x70726F63
"""Advisory lock key held while migrating ("proc"); replicas starting together migrate one after the other."""
_NO_VERSION: Final = 2**31 - 1
"""Above every version number (an INTEGER column)."""


Row = Sequence[Any]
"""A result row, read by column position (a tuple from SQLite, an asyncpg Record)."""


class Connection(Protocol):
    """What the shared operations need from a back-end connection (or pool)."""

    async def fetch(self, statement: Statement, *args: SqlValue) -> Sequence[Row]:
        """Every row of a query."""

    async def fetchrow(self, statement: Statement, *args: SqlValue) -> Row | None:
        """The first row of a query, or None."""

    async def execute(self, statement: Statement, *args: SqlValue) -> int:
        """Run a statement; return how many rows it changed."""

    async def executemany(self, statement: Statement, rows: list[tuple[SqlValue, ...]]) -> None:
        """Run a statement once per row of parameters."""


@functools.cache
def _field_names(record: type) -> tuple[str, ...]:
    """The names of a record's fields, in order (read once per record type: `fields` is slow on every row)."""
    return tuple(column.name for column in fields(record))


def _named(record: type, row: Row, **convert: Callable[[Any], Any]) -> dict[str, Any]:
    """`row`'s values by the names of `record`'s fields (the statements list the columns in field order), those named
    in `convert` converted (NULL stays None)."""
    values = dict(zip(_field_names(record), row, strict=True))
    for name, to in convert.items():
        value = values[name]
        if value is not None:
            values[name] = to(value)
    return values


def _values(record: Any, **convert: Callable[[Any], Any]) -> tuple[Any, ...]:
    """`record`'s fields in order (the statements' column order), those named in `convert` converted."""
    names = _field_names(record.__class__)
    values = [getattr(record, name) for name in names]
    if convert:
        for index, name in enumerate(names):
            to = convert.get(name)
            if to is not None and values[index] is not None:
                values[index] = to(values[index])
    return tuple(values)


class SqlStore(Store):
    """A `Store` on a SQL database; the subclass supplies the connection handling of its back-end."""

    _dialect: Dialect
    _migrations: tuple[Migration, ...]

    @property
    @abc.abstractmethod
    def _reader(self) -> Connection:
        """The connection reads go through."""

    @abc.abstractmethod
    async def _write(self, statement: Statement, *args: SqlValue, retry: bool = True) -> int:
        """Run one write statement on its own; return how many rows it changed.

        `retry=False`: the statement must not be sent again after a lost connection (it is not idempotent).
        """

    @abc.abstractmethod
    async def _write_returning(self, statement: Statement, *args: SqlValue, retry: bool = True) -> Sequence[Row]:
        """Run one write statement with a RETURNING clause on its own; return its rows."""

    @abc.abstractmethod
    async def _transaction(
        self, body: Callable[[Connection], Awaitable[_T]], *, lock: int | str | None = None, retry: bool = True
    ) -> _T:
        """Run `body` in one write transaction, holding the lock named `lock` (if any) until it ends.

        `retry`: the body may run again on a fresh connection when the first one died under it.
        """

    async def _announce(self, conn: Connection, product: str, topic: str = "products") -> None:
        """Tell other replicas, inside the transaction that changed it, that something of `topic` in `product`
        changed (optional: see `Store.listen`)."""

    async def _first_moment(self, statement: Statement) -> datetime | None:
        """The moment `statement` reads (a time column of its one row), or None."""
        row = await self._reader.fetchrow(statement)
        return self._dialect.moment(row[0]) if row is not None and row[0] is not None else None

    async def _renewed(
        self, statement: Callable[[int], Statement], owner: str, ids: list[str], lease_until: datetime
    ) -> set[str]:
        """Extend `owner`'s leases of `ids` to `lease_until`, IDS_PER_STATEMENT ids a statement (`statement(count)`
        takes the lease's end, the owner, then `count` ids, and returns the ids renewed); the ids it still held."""
        until = self._dialect.time(lease_until)
        renewed: set[str] = set()
        for start in range(0, len(ids), IDS_PER_STATEMENT):
            chunk = ids[start : start + IDS_PER_STATEMENT]
            rows = await self._write_returning(statement(len(chunk)), until, owner, *chunk)
            renewed.update(str(row[0]) for row in rows)
        return renewed

    async def _newest_first(
        self, clause: Where, source: tuple[str, str], order: tuple[str, str], after: Cursor | None, limit: int
    ) -> Sequence[Row]:
        """One page of a listing: the rows of `source` (columns, table) that `clause` selects, newest first by
        `order` (a moment column, then the id column that breaks its ties), strictly after the `after` cursor (that
        moment and id of the last row of the page before), at most `limit`."""
        moment, key = order
        if after is not None:
            clause.add(f"({moment}, {key}) < (?, ?)", self._dialect.time(after[0]), after[1])
        query = clause.select(*source, f"{moment} DESC, {key} DESC")
        return await self._reader.fetch(query, *clause.params, limit)

    # -- row mappers ------------------------------------------------------------------------------------------------

    def _version(self, row: Row) -> VersionRecord:
        return VersionRecord(**_named(VersionRecord, row, source=bytes, created_at=self._dialect.stamp_moment))

    def _idempotency(self, row: Row) -> IdempotencyRecord:
        moment = self._dialect.moment
        return IdempotencyRecord(
            **_named(IdempotencyRecord, row, response=bytes, lease_until=moment, expires_at=moment)
        )

    def _execution(self, row: Row) -> ExecutionRecord:
        moment = self._dialect.moment
        return ExecutionRecord(
            **_named(ExecutionRecord, row, status=ExecutionStatus, started_at=moment, ended_at=moment, cached=bool)
        )

    def _execution_row(self, r: ExecutionRecord) -> tuple[SqlValue, ...]:
        # Spelled out rather than `_values`: one per call served, written in batches. The status goes as an exact
        # int (not the IntEnum) and the flag as the dialect's: SQLite binds those without an adapter lookup.
        time = self._dialect.time
        return (
            r.process_id,
            r.product,
            r.env,
            r.version,
            r.kind,
            r.resource,
            int(r.status),
            time(r.started_at),
            time(r.ended_at),
            r.attempts,
            r.upstream_status,
            r.error_reason,
            self._dialect.flag(r.cached),
            r.detail,
        )

    def _session(self, row: Row) -> SessionRecord:
        moment = self._dialect.moment
        times = dict.fromkeys(("started_at", "refreshed_at", "expires_at", "revoked_at"), moment)
        return SessionRecord(**_named(SessionRecord, row, **times))

    # -- schema -----------------------------------------------------------------------------------------------------

    async def _migrate(self) -> None:
        async def migrate(conn: Connection) -> None:
            await conn.execute(migrations_table(self._dialect))
            row = await conn.fetchrow(sql.SCHEMA_VERSION)
            current = int(row[0]) if row else 0
            for migration in self._migrations:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    await conn.execute(Statement(statement))
                await conn.execute(
                    sql.RECORD_MIGRATION,
                    migration.version,
                    migration.description,
                    self._dialect.stamp(datetime.now(UTC)),
                )

        await self._transaction(migrate, lock=MIGRATION_LOCK, retry=False)

    async def schema_version(self) -> int:
        row = await self._reader.fetchrow(sql.SCHEMA_VERSION)
        return int(row[0]) if row else 0

    # -- product registry -------------------------------------------------------------------------------------------

    async def _changed(self, conn: Connection, product: str) -> None:
        await conn.execute(sql.BUMP_REVISION, product)
        await self._announce(conn, product)

    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        async def apply(conn: Connection) -> tuple[VersionRecord, bool]:
            row = await conn.fetchrow(sql.LATEST_VERSION, product)
            latest = self._version(row) if row else None
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
            stamp = self._dialect.stamp(record.created_at)
            await conn.execute(sql.INSERT_VERSION, product, record.version, checksum, fmt, source, document, stamp)
            await self._changed(conn, product)
            return record, True

        return await self._transaction(apply, lock=f"product:{product}", retry=False)

    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        row = await self._reader.fetchrow(sql.VERSION, product, version)
        return self._version(row) if row else None

    async def latest_version(self, product: str) -> VersionRecord | None:
        row = await self._reader.fetchrow(sql.LATEST_VERSION, product)
        return self._version(row) if row else None

    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        before = before if before is not None else _NO_VERSION
        return [self._version(row) for row in await self._reader.fetch(sql.VERSIONS_BEFORE, product, before, limit)]

    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        async def pin(conn: Connection) -> int | None:
            row = await conn.fetchrow(sql.PIN, product, env)
            await conn.execute(sql.SET_PIN, product, env, version, self._dialect.stamp(datetime.now(UTC)))
            await self._changed(conn, product)
            return int(row[0]) if row else None

        return await self._transaction(pin, lock=f"product:{product}", retry=False)

    async def pins(self, product: str) -> dict[str, int]:
        return {str(row[0]): int(row[1]) for row in await self._reader.fetch(sql.PINS, product)}

    async def revisions(self) -> list[ProductRevision]:
        return [ProductRevision(str(row[0]), int(row[1])) for row in await self._reader.fetch(sql.REVISIONS)]

    # -- auth tokens and the result cache ---------------------------------------------------------------------------

    async def get_auth_token(self, key: str, now: datetime) -> str | None:
        row = await self._reader.fetchrow(sql.AUTH_TOKEN, key, self._dialect.time(now))
        return str(row[0]) if row else None

    async def put_auth_token(self, key: str, values: str, expires_at: datetime) -> None:
        await self._write(sql.PUT_AUTH_TOKEN, key, values, self._dialect.time(expires_at))

    async def delete_auth_token(self, key: str, values: str) -> None:
        await self._write(sql.DELETE_AUTH_TOKEN, key, values)

    async def cache_get(self, key: str, now: datetime) -> bytes | None:
        row = await self._reader.fetchrow(sql.CACHED, key, self._dialect.time(now))
        return bytes(row[0]) if row else None

    async def cache_put(self, key: str, value: bytes, expires_at: datetime) -> None:
        await self._write(sql.PUT_CACHED, key, value, self._dialect.time(expires_at))

    async def purge_expired(self, now: datetime) -> int:
        at = self._dialect.time(now)
        return sum([await self._write(statement, at) for statement in sql.PURGE])

    # -- idempotency ------------------------------------------------------------------------------------------------

    async def idempotency_claim(
        self, key: str, request_hash: str, owner: str, now: datetime, lease_until: datetime, expires_at: datetime
    ) -> IdempotencyRecord:
        time = self._dialect.time

        async def claim(conn: Connection) -> IdempotencyRecord:
            lease, expiry, at = time(lease_until), time(expires_at), time(now)
            await conn.execute(sql.CLAIM, key, request_hash, owner, lease, expiry, at, at)
            row = await conn.fetchrow(sql.IDEMPOTENCY_KEY, key)
            if row is None:  # the statement above inserted the key or found it, in this transaction
                raise RuntimeError(f"idempotency key {key!r} vanished inside its claim's transaction")
            return self._idempotency(row)

        # Sent again after a lost connection, the claim finds its own row (the owner is this call): idempotent.
        return await self._transaction(claim)

    async def idempotency_mark_sent(self, key: str, owner: str, lease_until: datetime) -> bool:
        return await self._write(sql.MARK_SENT, self._dialect.time(lease_until), key, owner) == 1

    async def idempotency_renew(self, key: str, owner: str, lease_until: datetime) -> bool:
        return await self._write(sql.RENEW, self._dialect.time(lease_until), key, owner) == 1

    async def idempotency_complete(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord | None = None
    ) -> bool:
        async def complete(conn: Connection) -> int:
            changed = await conn.execute(sql.COMPLETE, response, key, owner)
            if record is not None:
                await conn.execute(sql.insert_executions(1), *self._execution_row(record))
            return changed

        return await self._transaction(complete) == 1

    async def idempotency_release(self, key: str, owner: str) -> None:
        await self._write(sql.RELEASE, key, owner)

    async def idempotency_get(self, key: str) -> IdempotencyRecord | None:
        row = await self._reader.fetchrow(sql.IDEMPOTENCY_KEY, key)
        return self._idempotency(row) if row else None

    # -- execution log ----------------------------------------------------------------------------------------------

    async def insert_executions(self, records: list[ExecutionRecord]) -> None:
        if not records:
            return
        rows = [self._execution_row(r) for r in records]

        async def insert(conn: Connection) -> None:
            start = 0
            for size in sql.EXECUTION_ROWS:
                while len(rows) - start >= size:
                    chunk = rows[start : start + size]
                    await conn.execute(sql.insert_executions(size), *[value for row in chunk for value in row])
                    start += size

        await self._transaction(insert)

    async def list_executions(
        self, where: ExecutionFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ExecutionRecord]:
        time = self._dialect.time
        clause = Where("product = ?", where.product)
        clause.when("env = ?", where.env)
        clause.when("resource = ?", where.resource)
        clause.when("status = ?", where.status)
        clause.when("started_at >= ?", where.since, time)
        clause.when("started_at < ?", where.until, time)
        rows = await self._newest_first(
            clause, (sql.EXECUTION_COLUMNS, "executions"), ("started_at", "process_id"), after, limit
        )
        return [self._execution(row) for row in rows]

    # -- sessions ---------------------------------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        time = self._dialect.time
        # A new session is not revoked: the statement writes NULL for the last column, revoked_at.
        values = _values(record, started_at=time, refreshed_at=time, expires_at=time)[:-1]
        await self._write(sql.INSERT_SESSION, *values, retry=False)  # sent again after a commit, it fails on the key

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._reader.fetchrow(sql.SESSION, session_id)
        return self._session(row) if row else None

    async def rotate_session(self, session_id: str, generation: int, now: datetime) -> SessionRecord | None:
        at = self._dialect.time(now)
        # Sent again after a commit, it would answer as if another refresh won: never re-sent.
        rows = await self._write_returning(sql.ROTATE_SESSION, at, session_id, generation, at, retry=False)
        return self._session(rows[0]) if rows else None

    async def revoke_sessions(
        self, product: str, env: str, tag: str, *, session_id: str | None, identifier: str | None, now: datetime
    ) -> list[tuple[str, datetime]]:
        column, value = ("session_id", session_id) if session_id is not None else ("identifier", identifier)
        statement = sql.REVOKE_SESSIONS[column]
        rows = await self._write_returning(statement, self._dialect.time(now), product, env, tag, value)
        return [(str(row[0]), self._dialect.moment(row[1])) for row in rows]

    async def list_sessions(
        self, where: SessionFilter, now: datetime, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[SessionRecord]:
        time = self._dialect.time
        clause = Where("product = ? AND env = ? AND tag = ?", where.product, where.env, where.tag)
        clause.add("revoked_at IS NULL AND expires_at > ?", time(now))
        clause.when("identifier = ?", where.identifier)
        rows = await self._newest_first(
            clause, (sql.SESSION_COLUMNS, "sessions"), ("started_at", "session_id"), after, limit
        )
        return [self._session(row) for row in rows]

    async def revoked_since(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        moment = self._dialect.moment
        rows = await self._reader.fetch(sql.REVOKED_SINCE, self._dialect.time(since))
        return [(str(row[0]), moment(row[1]), moment(row[2])) for row in rows]
