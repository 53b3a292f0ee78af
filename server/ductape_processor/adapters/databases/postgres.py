"""PostgreSQL through asyncpg: its pool, its statement cache, and values typed the way the server asks for them.

asyncpg encodes parameters in PostgreSQL's binary format, so it wants a `datetime` for a timestamp, a `Decimal` for a
numeric and an `int` for an integer; callers send JSON (text and numbers). The parameter types of each statement are
learned once per pool (one `prepare`), and every call's values are converted to them (`coerce`); after that a call is
one `fetch` on the connection's statement cache. JSON and JSONB columns are read and written as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from ductape_processor.adapters.databases import base
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.registry.databases import PostgresDatabaseEnv

CONNECT_TIMEOUT_S = 5.0
STATEMENTS_TYPED = 4096
"""Statements whose parameter types a pool remembers."""
_CONSTRAINTS: dict[str, base.ConstraintKind] = {
    "23505": "unique",
    "23503": "foreign_key",
    "23514": "check",
    "23502": "not_null",
}


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("is a boolean, not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError("is not an integer")


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("is not a number")
    return float(value)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("is not a number")
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError("is not a number") from None


def _moment(value: Any, aware: bool) -> datetime:
    if not isinstance(value, str):
        raise ValueError("is not an RFC 3339 timestamp text")
    moment = datetime.fromisoformat(value)
    if aware:
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value)


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("is not base64 text") from None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise ValueError("is not true or false")


_COERCE: dict[str, Callable[[Any], Any]] = {
    "int2": _integer,
    "int4": _integer,
    "int8": _integer,
    "oid": _integer,
    "float4": _float,
    "float8": _float,
    "numeric": _decimal,
    "bool": _boolean,
    "text": _text,
    "varchar": _text,
    "bpchar": _text,
    "name": _text,
    "citext": _text,
    "timestamptz": lambda v: _moment(v, True),
    "timestamp": lambda v: _moment(v, False),
    "date": lambda v: date.fromisoformat(v) if isinstance(v, str) else _fail("is not an ISO 8601 date text"),
    "time": lambda v: time.fromisoformat(v) if isinstance(v, str) else _fail("is not an ISO 8601 time text"),
    "uuid": lambda v: uuid.UUID(v) if isinstance(v, str) else _fail("is not a UUID text"),
    "interval": lambda v: timedelta(seconds=_float(v)),
    "bytea": _bytes,
}


def _fail(why: str) -> Any:
    raise ValueError(why)


def coerce(value: Any, type_name: str, where: str) -> Any:
    """A caller's JSON value as asyncpg encodes a parameter of `type_name`; base.ValueRejected naming `where`."""
    if value is None:
        return None
    convert = _COERCE.get(type_name)
    if convert is None:
        return value  # json/jsonb (the codec encodes), arrays, other types: as given
    try:
        return convert(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise base.ValueRejected(f"{where} {exc} (the column is {type_name})") from None


def failure(exc: BaseException, what: str, *, sent: bool = True) -> base.DatabaseFailure:
    """An asyncpg error as the processor reports it; server messages name objects, never the DSN."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        message = getattr(exc, "message", "") or type(exc).__name__
        if state.startswith("23"):
            name = getattr(exc, "constraint_name", None) or getattr(exc, "column_name", None) or ""
            return base.ConstraintViolation(
                f"{what}: {message}", kind=_CONSTRAINTS.get(state, "other"), constraint=name
            )
        if state.startswith("28") or state == "3D000":
            # Its message names the role or the database of the DSN: not shown.
            why = "refused the credentials" if state.startswith("28") else "has no database of the DSN's name"
            return base.DatabaseUnreachable(f"{what}: the server {why} ({state})", sent=False)
        if state == "57014":
            return base.StatementTimeout(f"{what}: the statement ran past its time")
        if state.startswith(("08", "57P", "53")):
            return base.DatabaseUnreachable(f"{what}: the server ended the connection ({state})", sent=sent)
        if state.startswith("22"):
            return base.ValueRejected(f"{what}: {message}")
        return base.QueryInvalid(f"{what}: {message}")
    if isinstance(exc, asyncpg.exceptions.DataError):
        return base.ValueRejected(f"{what}: {exc}")
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The server ended an idle connection and asyncpg was still reading its farewell when the pool lent it:
        # nothing of this statement was sent.
        return base.DatabaseUnreachable(f"{what}: the connection was ending ({type(exc).__name__})", sent=False)
    if isinstance(exc, asyncpg.InterfaceError | OSError | asyncpg.exceptions.ConnectionDoesNotExistError):
        return base.DatabaseUnreachable(f"{what}: the connection failed ({type(exc).__name__})", sent=sent)
    return base.QueryInvalid(f"{what}: {type(exc).__name__}")


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            encoder=lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
            decoder=base.json_column,
            schema="pg_catalog",
        )


async def _reset_if_needed(conn: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back. asyncpg's default sends a reset statement every time (an extra
    round trip per call); the processor changes no session state but transactions (ended before the connection is
    given back) and advisory locks (released by `locked`), so the full reset runs only when one was left open."""
    if conn.is_in_transaction():
        await conn.reset()


def lock_id(name: str) -> int:
    """A 64-bit advisory lock id for a lock name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class _Session(base.DatabaseSession):
    def __init__(self, adapter: PostgresDatabase, conn: asyncpg.Connection) -> None:
        self._adapter = adapter
        self._conn = conn
        self.broken = False

    async def _types(self, text: str) -> Sequence[str]:
        known = self._adapter.typed.get(text)
        if known is None:
            prepared = await self._conn.prepare(text)
            known = tuple(t.name for t in prepared.get_parameters())
            self._adapter.typed.put(text, known)
        return known

    async def run(self, statement: base.Statement, timeout_s: float) -> base.Outcome:
        name = self._adapter.name
        conn = self._conn
        timeout = max(timeout_s, 0.001)
        try:
            args = list(statement.args)
            if args:
                types = await self._types(statement.text)
                names = list(statement.names) or [f"${i + 1}" for i in range(len(args))]
                args = [coerce(v, t, f"params.{n}") for v, t, n in zip(args, types, names, strict=False)]
            if statement.returns_rows:
                bounds = statement.bounds
                if bounds is not None and not statement.limited:
                    records = await self._bounded(statement.text, args, timeout, bounds)
                else:
                    records = await conn.fetch(statement.text, *args, timeout=timeout)
                    if bounds is not None:  # the rows are limited in the SQL; their size is checked here
                        base.RowBudget(bounds, name).take(records)
                columns = list(records[0].keys()) if records else []
                return base.Outcome(columns, [tuple(r.values()) for r in records], len(records))
            status = await conn.execute(statement.text, *args, timeout=timeout)
        except TimeoutError:
            raise base.StatementTimeout(f"{name}: the statement ran past its time") from None
        except base.ValueRejected:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, OSError) as exc:
            error = failure(exc, name)
            self.broken = isinstance(error, base.DatabaseUnreachable)
            raise error from None
        last = status.rsplit(" ", 1)[-1]
        return base.Outcome(affected=int(last) if last.isdigit() else 0)

    async def _bounded(self, text: str, args: list[Any], timeout: float, bounds: base.Bounds) -> list[asyncpg.Record]:
        """Rows fetched a chunk at a time through a cursor, stopping as soon as they pass the bounds. A cursor lives
        in a transaction: the batch's, or one of its own, which a result over the bounds rolls back (a write with
        RETURNING answering too much is undone)."""
        conn = self._conn

        async def fetch() -> list[asyncpg.Record]:
            cursor = await conn.cursor(text, *args)
            return await base.RowBudget(bounds, self._adapter.name).fetch(cursor.fetch)

        try:
            async with asyncio.timeout(timeout):
                if conn.is_in_transaction():
                    return await fetch()
                async with conn.transaction():
                    return await fetch()
        except TimeoutError:
            self.broken = True  # cancelled mid-statement: the connection is replaced rather than trusted
            raise

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        transaction = self._conn.transaction()
        try:
            await transaction.start()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise failure(exc, self._adapter.name, sent=False) from None
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        try:
            await transaction.commit()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise failure(exc, self._adapter.name) from None

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()

    @contextlib.asynccontextmanager
    async def locked(self, name: str, timeout_s: float) -> AsyncIterator[None]:
        # A session-level advisory lock, so each migration under it commits in a transaction of its own.
        key = lock_id(name)
        try:
            await self._conn.execute("SELECT pg_advisory_lock($1)", key, timeout=max(timeout_s, 0.001))
        except TimeoutError:
            raise base.StatementTimeout(f"{self._adapter.name}: the lock {name!r} stayed taken") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise failure(exc, self._adapter.name, sent=False) from None
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._conn.execute("SELECT pg_advisory_unlock($1)", key)


class PostgresDatabase(base.DatabaseAdapter):
    """An asyncpg pool to one PostgreSQL database, created on first use."""

    dialect = "postgresql"

    def __init__(self, settings: PostgresDatabaseEnv, place: base.Place) -> None:
        self.name = place.name
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self.typed: BoundedCache[str, tuple[str, ...]] = BoundedCache(STATEMENTS_TYPED)

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                settings = self._settings
                timeout_ms = int(settings.statement_timeout.total_seconds() * 1000)
                try:
                    self._pool = await asyncpg.create_pool(
                        settings.url,
                        min_size=settings.pool.min,
                        max_size=settings.pool.max,
                        init=_json_codecs,
                        reset=_reset_if_needed,
                        timeout=CONNECT_TIMEOUT_S,
                        server_settings={"statement_timeout": str(timeout_ms)},
                    )
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    raise failure(exc, self.name, sent=False) from None
                except ValueError:  # a DSN asyncpg cannot parse: its message would quote it
                    raise base.DatabaseUnreachable(f"{self.name}: the URL cannot be parsed", sent=False) from None
            return self._pool

    @contextlib.asynccontextmanager
    async def session(self, acquire_timeout_s: float | None) -> AsyncIterator[base.DatabaseSession]:
        pool = self._pool or await self._open()
        try:
            conn = await pool.acquire(timeout=None if acquire_timeout_s is None else max(acquire_timeout_s, 0.0))
        except TimeoutError:
            raise base.PoolExhausted(f"{self.name}: every connection stayed busy") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise failure(exc, self.name, sent=False) from None
        except ValueError:  # asyncpg parses the DSN's host list when it connects: its message would quote it
            raise base.DatabaseUnreachable(f"{self.name}: the URL cannot be parsed", sent=False) from None
        session = _Session(self, conn)
        try:
            yield session
        finally:
            with contextlib.suppress(Exception):
                if session.broken:
                    conn.terminate()  # the pool opens a new one in its place (asyncpg may have released it already)
                await pool.release(conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10.0)
