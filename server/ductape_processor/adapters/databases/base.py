"""The interface every database adapter implements, and the failures it reports in the processor's terms.

An adapter owns one pool of connections to one database environment. `session` lends one connection, on which
statements run one after another, optionally inside `transaction()` (a batch, a migration); `run` is one statement
on a pooled connection. Drivers' exceptions never leave an adapter: each is turned into one of the errors below,
whose text never quotes a DSN (the runtime maps them to gRPC statuses in one place).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

ConstraintKind = Literal["unique", "foreign_key", "check", "not_null", "other"]


FETCH_CHUNK: Final = 200
"""Rows fetched at a time from a statement with bounds: a result over them stops within one chunk."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """The most a caller takes of a statement's rows: `rows` rows, about `bytes` bytes."""

    rows: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement with the driver's placeholders and the values bound to them, in order."""

    text: str
    args: Sequence[Any]
    returns_rows: bool
    names: Sequence[str] = ()
    """The parameter each value is bound for (errors about a value name it)."""
    bounds: Bounds | None = None
    """Fetch its rows in chunks and stop (ResultOverflow) past these; None: fetch every row (the processor's own)."""
    limited: bool = False
    """The statement's SQL already limits its rows to `bounds.rows` + 1: only the bytes need watching."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a statement answered: its rows (tuples, in `columns` order), the rows it changed and, where the system
    says, the id its insert generated (MySQL, SQLite)."""

    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    affected: int = 0
    last_insert_id: int | None = None


@dataclass(frozen=True, slots=True)
class Place:
    """Where an adapter lives: a name for logs and errors, and the folder a file database must stay inside."""

    name: str
    folder: Path
    database: str
    env: str = ""
    """The product environment: a file database's default name holds it, so environments never share a file."""


class DatabaseFailure(Exception):
    """Base of an adapter's errors. The message is safe to show a caller: no DSN, no password."""


class DatabaseUnreachable(DatabaseFailure):
    """The database could not be reached, or the connection broke. `sent`: the statement may have reached it."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ConstraintViolation(DatabaseFailure):
    """A write broke a constraint; `constraint` names it (or the columns, when the system names no constraint)."""

    def __init__(self, message: str, *, kind: ConstraintKind, constraint: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.constraint = constraint


class QueryInvalid(DatabaseFailure):
    """The statement cannot run as written: a syntax error, an unknown table or column, a permission."""


class ValueRejected(DatabaseFailure):
    """A bound value does not fit its column or parameter (bad number or date text, too long, out of range)."""


class StatementTimeout(DatabaseFailure):
    """The statement ran past its time (the environment's statement_timeout or the caller's deadline)."""


class PoolExhausted(DatabaseFailure):
    """Every connection stayed busy until the caller's deadline."""


class ResultOverflow(DatabaseFailure):
    """A statement answered more than its bounds; fetching stopped there."""

    def __init__(self, message: str, *, limit: Literal["rows", "bytes"], maximum: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.maximum = maximum


def value_size(value: Any) -> int:
    """About how many bytes a column's value takes in a JSON answer (counted before it is converted)."""
    if value is None or isinstance(value, bool | int | float):
        return 8
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) * 4 // 3 + 4
    if isinstance(value, dict | list):
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))
    return len(str(value)) + 2


class RowBudget:
    """Rows counted and measured as an adapter fetches them: ResultOverflow as soon as they pass the bounds, so a
    huge result is never held whole."""

    def __init__(self, bounds: Bounds, what: str) -> None:
        self._bounds = bounds
        self._what = what
        self._rows = 0
        self._bytes = 0

    async def fetch(self, fetchmany: Callable[[int], Awaitable[Iterable[Any]]]) -> list[Any]:
        """Every row `fetchmany(n)` (a cursor's) hands out, a chunk at a time, each chunk counted as it comes."""
        rows: list[Any] = []
        while True:
            chunk = list(await fetchmany(FETCH_CHUNK))
            self.take(chunk)
            rows += chunk
            if len(chunk) < FETCH_CHUNK:
                return rows

    def take(self, rows: Sequence[Sequence[Any]]) -> None:
        """Count `rows`, just fetched."""
        self._rows += len(rows)
        if self._rows > self._bounds.rows:
            raise ResultOverflow(
                f"{self._what}: the result has more than {self._bounds.rows} rows",
                limit="rows",
                maximum=self._bounds.rows,
            )
        for row in rows:
            self._bytes += sum(value_size(v) for v in row)
            if self._bytes > self._bounds.bytes:
                raise ResultOverflow(
                    f"{self._what}: the result is larger than {self._bounds.bytes} bytes",
                    limit="bytes",
                    maximum=self._bounds.bytes,
                )


class DatabaseSession(abc.ABC):
    """One connection lent by the pool: statements run one after another."""

    @abc.abstractmethod
    async def run(self, statement: Statement, timeout_s: float) -> Outcome:
        """Run one statement within `timeout_s` seconds."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """A transaction: committed when the block ends, rolled back when it raises."""

    @abc.abstractmethod
    def locked(self, name: str, timeout_s: float) -> AbstractAsyncContextManager[None]:
        """Hold the database-wide lock `name` for the block (PostgreSQL advisory lock, MySQL GET_LOCK, SQLite a write
        transaction): what a migration run takes so two replicas never migrate one database at once."""


class DatabaseAdapter(abc.ABC):
    """A pool of connections to one database environment, opened on first use."""

    dialect: Literal["postgresql", "mysql", "sqlite"]

    @abc.abstractmethod
    def session(self, acquire_timeout_s: float | None) -> AbstractAsyncContextManager[DatabaseSession]:
        """Lend one connection for the block; PoolExhausted when none is free within `acquire_timeout_s`."""

    async def run(self, statement: Statement, timeout_s: float, acquire_timeout_s: float | None) -> Outcome:
        """One statement on a pooled connection."""
        async with self.session(acquire_timeout_s) as session:
            return await session.run(statement, timeout_s)

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (waiting for the ones lent out to come back)."""


JSON_COLUMN_DEPTH: Final = 31
"""The deepest JSON column value (objects and arrays inside each other) answered as JSON; a deeper one is answered as
its JSON text, as MariaDB and SQLite answer every JSON column. A row is a Struct inside the response, so its values sit
one level below an action's result, whose limit is 32 (`api/values.py`: protobuf parsers refuse messages nested more
than 100 levels); and Python's parser and the conversions after it would recurse past their limit on far deeper ones."""


def json_column(text: str | bytes) -> Any:
    """A JSON column's value: parsed, unless it nests deeper than JSON_COLUMN_DEPTH (then its text)."""
    try:
        value = json.loads(text)
    except RecursionError:
        return text if isinstance(text, str) else text.decode()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth == JSON_COLUMN_DEPTH:
                return text if isinstance(text, str) else text.decode()
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def plain_parameter(value: Any) -> Any:
    """A bound value for a driver that takes text, numbers and bytes (MySQL, SQLite): objects and lists as JSON text,
    booleans as 1 and 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value
