"""MySQL and MariaDB through asyncmy (measured faster than aiomysql on a primary-key read: see docs/databases.md).

Connections are in autocommit mode with the session's time zone UTC, so TIMESTAMP columns read as UTC instants.
A connection whose stream broke (the server restarted, `KILL`) is noticed before it is lent and replaced. A statement
past its time is abandoned on the client (its connection closed, not reused) and `KILL QUERY` is sent to the server
on a connection of its own, so the server stops working on it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncmy
from asyncmy import errors as mysql_errors
from asyncmy.cursors import SSCursor

from ductape_processor.adapters.databases import base
from ductape_processor.adapters.databases.pool import SlotPool
from ductape_processor.runtime.registry.databases import MysqlDatabaseEnv

CONNECT_TIMEOUT_S = 5
_JSON_TYPE = 245
_TIMESTAMP_TYPE = 7
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
_QUOTED_NAME = re.compile(r"(?:key|CONSTRAINT) [`']([^`']+)[`']")
_CONSTRAINTS: dict[int, base.ConstraintKind] = {
    1062: "unique",
    1451: "foreign_key",
    1452: "foreign_key",
    3819: "check",
    4025: "check",
    1048: "not_null",
}
_TIMEOUTS = frozenset({1969, 3024, 1317, 1205})
_LOST = frozenset({2003, 2006, 2013, 2055, 1927, 1053, 1040, 1203})
_VALUES = frozenset({1264, 1265, 1292, 1366, 1406, 1411, 1367, 3140, 4038, 1690})


def connect_args(url: str) -> dict[str, Any]:
    """asyncmy's connection arguments from a `mysql://user:password@host:port/database` URL."""
    parts = urlsplit(url)
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.lstrip("/")) or None,
        "charset": options.get("charset", "utf8mb4"),
    }


def failure(exc: BaseException, what: str, *, sent: bool = True) -> base.DatabaseFailure:
    """An asyncmy error as the processor reports it. Server messages name objects and values, never the DSN; a
    connection error's text is not shown (it names the user and host)."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    code = args[0] if args and isinstance(args[0], int) else 0
    message = str(args[1]) if len(args) > 1 else type(exc).__name__
    if code in _CONSTRAINTS or isinstance(exc, mysql_errors.IntegrityError):
        found = _QUOTED_NAME.search(message)
        if code == 1048:
            found = re.search(r"Column '([^']+)'", message)
        return base.ConstraintViolation(
            f"{what}: {message}", kind=_CONSTRAINTS.get(code, "other"), constraint=found.group(1) if found else ""
        )
    if code in _TIMEOUTS:
        return base.StatementTimeout(f"{what}: the statement ran past its time")
    if code in _LOST or code >= 2000 or isinstance(exc, OSError | mysql_errors.InterfaceError):
        return base.DatabaseUnreachable(
            f"{what}: the connection failed (error {code or type(exc).__name__})", sent=sent
        )
    if code == 1045:
        return base.DatabaseUnreachable(f"{what}: the server refused the credentials", sent=False)
    if code in _VALUES or isinstance(exc, mysql_errors.DataError):
        return base.ValueRejected(f"{what}: {message}")
    return base.QueryInvalid(f"{what}: {message}")


def parameter(value: Any) -> Any:
    """A bound value: RFC 3339 timestamp text as a UTC DATETIME (MySQL refuses the `T…Z` form), the rest as
    `base.plain_parameter` makes it."""
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        return datetime.fromisoformat(value).astimezone(UTC).replace(tzinfo=None)
    return base.plain_parameter(value)


_QUOTING_MODES = frozenset({"ANSI", "ANSI_QUOTES", "NO_BACKSLASH_ESCAPES"})
"""sql_mode flags that change how the server reads quotes: the SQL compiler (`runtime/databases/sql.py`) and the
driver's escaping follow the default rules, so a session never runs with them."""
_NO_BACKSLASH_ESCAPES = 0x200
"""The server-status bit a server sets while the session's sql_mode has NO_BACKSLASH_ESCAPES."""


def _healthy(conn: Any) -> bool:
    return bool(conn.connected) and not getattr(conn, "_stream_broken", False)


async def _default_quoting(conn: Any) -> None:
    """Take the quoting flags out of the session's sql_mode when the server's default has them (see _QUOTING_MODES)."""
    async with conn.cursor() as cursor:
        await cursor.execute("SELECT @@SESSION.sql_mode")
        row = await cursor.fetchone()
        modes = [m for m in str(row[0] if row else "").split(",") if m]
        kept = [m for m in modes if m.upper() not in _QUOTING_MODES]
        if kept != modes:
            await cursor.execute("SET SESSION sql_mode = %s", (",".join(kept),))


class _Session(base.DatabaseSession):
    def __init__(self, adapter: MysqlDatabase, conn: Any) -> None:
        self._adapter = adapter
        self._conn = conn
        self.broken = False

    async def run(self, statement: base.Statement, timeout_s: float) -> base.Outcome:
        name = self._adapter.name
        if statement.args and self._conn.server_status & _NO_BACKSLASH_ESCAPES:
            # An earlier statement on this connection set it: the connection is dropped, the statement not sent.
            self.broken = True
            raise base.QueryInvalid(
                f"{name}: the session's sql_mode has NO_BACKSLASH_ESCAPES (an earlier statement set it), which the "
                "processor's quoting of values does not follow: the statement was not sent"
            )
        args = tuple(parameter(v) for v in statement.args)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                if statement.bounds is None:
                    async with self._conn.cursor() as cursor:
                        affected = await cursor.execute(statement.text, args)
                        rows = await cursor.fetchall() if cursor.description else ()
                        description = cursor.description or ()
                        last = cursor.lastrowid
                else:
                    affected, rows, description, last = await self._bounded(statement, args, statement.bounds)
        except base.ResultOverflow:
            self.broken = True  # the rest of the result is still on the connection: closed, not read to its end
            raise
        except TimeoutError:
            self.broken = True
            self._adapter.kill_query(self._conn.thread_id())
            raise base.StatementTimeout(f"{name}: the statement ran past its time") from None
        except (mysql_errors.MySQLError, OSError) as exc:
            self.broken = not _healthy(self._conn)
            raise failure(exc, name) from None
        columns = [d[0] for d in description]
        converted = rows
        special = [i for i, d in enumerate(description) if d[1] in (_JSON_TYPE, _TIMESTAMP_TYPE)]
        if special:
            converted = [self._convert(row, description, special) for row in rows]
        return base.Outcome(columns, converted, len(rows) if description else int(affected or 0), last or None)

    async def _bounded(self, statement: base.Statement, args: tuple[Any, ...], bounds: base.Bounds) -> tuple[Any, ...]:
        """Run on an unbuffered cursor, fetching a chunk of rows at a time until the bounds are passed."""
        cursor = self._conn.cursor(SSCursor)
        affected = await cursor.execute(statement.text, args)
        description = cursor.description or ()
        rows = await base.RowBudget(bounds, self._adapter.name).fetch(cursor.fetchmany) if description else []
        last = cursor.lastrowid
        await cursor.close()
        return affected, rows, description, last

    @staticmethod
    def _convert(row: Any, description: Any, special: list[int]) -> tuple[Any, ...]:
        values = list(row)
        for i in special:
            value = values[i]
            if value is None:
                continue
            if description[i][1] == _JSON_TYPE:
                values[i] = base.json_column(value)
            elif isinstance(value, datetime):
                values[i] = value.replace(tzinfo=UTC)  # the session's time zone is UTC
        return tuple(values)

    async def _command(self, sql: str) -> None:
        try:
            async with self._conn.cursor() as cursor:
                await cursor.execute(sql)
        except (mysql_errors.MySQLError, OSError) as exc:
            self.broken = not _healthy(self._conn)
            raise failure(exc, self._adapter.name) from None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        await self._command("START TRANSACTION")
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                await self._command("ROLLBACK")
            raise
        await self._command("COMMIT")

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()

    @contextlib.asynccontextmanager
    async def locked(self, name: str, timeout_s: float) -> AsyncIterator[None]:
        # GET_LOCK names are at most 64 characters: a digest keeps any name within it.
        lock = "ductape:" + hashlib.sha256(name.encode()).hexdigest()[:48]
        wait_s = max(int(timeout_s), 0)
        outcome = await self.run(base.Statement("SELECT GET_LOCK(%s, %s)", (lock, wait_s), True), timeout_s + 1)
        if not outcome.rows or outcome.rows[0][0] != 1:
            raise base.StatementTimeout(f"{self._adapter.name}: the lock {name!r} stayed taken")
        try:
            yield
        finally:
            with contextlib.suppress(base.DatabaseFailure):
                await self.run(base.Statement("SELECT RELEASE_LOCK(%s)", (lock,), True), 5.0)


class MysqlDatabase(base.DatabaseAdapter):
    """A pool of asyncmy connections to one MySQL or MariaDB database."""

    dialect = "mysql"

    def __init__(self, settings: MysqlDatabaseEnv, place: base.Place) -> None:
        self.name = place.name
        self._settings = settings
        self._pool: SlotPool[Any] = SlotPool(settings.pool.max, self._open, self._close, _healthy)
        self._killing: set[asyncio.Task[None]] = set()

    async def _connect(self) -> Any:
        try:
            conn = await asyncmy.connect(
                **connect_args(self._settings.url),
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                init_command="SET time_zone = '+00:00'",
            )
            try:
                await _default_quoting(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        except (mysql_errors.MySQLError, OSError, TimeoutError) as exc:
            raise failure(exc, self.name, sent=False) from None
        except ValueError:  # a URL that does not parse (a port that is not a number): never quote it
            raise base.DatabaseUnreachable(f"{self.name}: the URL cannot be parsed", sent=False) from None

    async def _open(self) -> Any:
        return await self._connect()

    @staticmethod
    async def _close(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def kill_query(self, thread_id: int) -> None:
        """Ask the server to stop the statement of connection `thread_id` (best effort, in the background)."""

        async def kill() -> None:
            with contextlib.suppress(base.DatabaseFailure, mysql_errors.MySQLError, OSError):
                conn = await self._connect()
                try:
                    async with conn.cursor() as cursor:
                        await cursor.execute(f"KILL QUERY {int(thread_id):d}")
                finally:
                    conn.close()

        task = asyncio.get_running_loop().create_task(kill(), name="mysql-kill-query")
        self._killing.add(task)
        task.add_done_callback(self._killing.discard)

    def session(self, acquire_timeout_s: float | None) -> contextlib.AbstractAsyncContextManager[base.DatabaseSession]:
        return self._pool.lend(
            acquire_timeout_s, f"{self.name}: every connection stayed busy", lambda conn: _Session(self, conn)
        )

    async def close(self) -> None:
        await self._pool.close()
