"""The interface every database adapter implements, and the failures it reports in the processor's terms.

An adapter owns one pool of connections to one database environment. `session` lends one connection, on which
statements run one after another, optionally inside `transaction()` (a batch, a migration); `run` is one statement
on a pooled connection. Drivers' exceptions never leave an adapter: each is turned into one of the errors below,
whose text never quotes a DSN (the runtime maps them to gRPC statuses in one place).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ConstraintKind = Literal["unique", "foreign_key", "check", "not_null", "other"]


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement with the driver's placeholders and the values bound to them, in order."""

    text: str
    args: Sequence[Any]
    returns_rows: bool
    names: Sequence[str] = ()
    """The parameter each value is bound for (errors about a value name it)."""


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


def plain_parameter(value: Any) -> Any:
    """A bound value for a driver that takes text, numbers and bytes (MySQL, SQLite): objects and lists as JSON text,
    booleans as 1 and 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value
