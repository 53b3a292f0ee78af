"""The store's SQL, written once for both back-ends.

Statements are written with `?` placeholders (SQLite's style); each `Statement` also carries the `$1, $2, ...` form
asyncpg needs, translated once when the statement is built (at import for the fixed ones). What the back-ends still
differ in is a `Dialect`: how a moment is stored (SQLite: seconds as REAL, or ISO text for the registry's own
columns; PostgreSQL: TIMESTAMPTZ) and the column types of the schema.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

_PLACEHOLDER = re.compile(r"\?")


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement in both placeholder styles: `qmark` (`?`, SQLite) and `numbered` (`$n`, PostgreSQL)."""

    qmark: str
    numbered: str = field(init=False)

    def __post_init__(self) -> None:
        count = iter(range(1, self.qmark.count("?") + 1))
        object.__setattr__(self, "numbered", _PLACEHOLDER.sub(lambda _: f"${next(count)}", self.qmark))


SqlValue = str | int | float | bytes | datetime | None
"""A value bound to a placeholder (aiosqlite and asyncpg take each of these; a moment goes through `Dialect.time`)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the back-ends once the statements are shared: moments and column types."""

    name: str
    time: Callable[[datetime], SqlValue]
    """A moment as a value for a time column (expiries, leases, execution and session times)."""
    moment: Callable[[Any], datetime]
    """A time column's value as an aware datetime."""
    stamp: Callable[[datetime], SqlValue]
    """A moment for the registry's timestamp columns (`created_at`, `updated_at`, `applied_at`)."""
    stamp_moment: Callable[[Any], datetime]
    """A registry timestamp column's value as an aware datetime."""
    flag: Callable[[bool], SqlValue]
    """A boolean as a value for a flag column: 0 or 1 on SQLite, which binds an exact int without looking for an
    adapter (a bool is looked up as any other subclass, twice per value); the bool itself on PostgreSQL."""
    types: dict[str, str]
    """Column types by role, substituted into the migrations' `{role}` fields."""
    skip_locked: str = ""
    """What a claim's inner SELECT ends with so replicas claim different rows (its table is aliased `claimed`):
    `FOR UPDATE ... SKIP LOCKED` on PostgreSQL; nothing on SQLite, whose write transactions are one at a time."""
    lock_rows: str = ""
    """What a SELECT inside a write transaction ends with to hold its rows until the transaction ends: `FOR UPDATE`
    on PostgreSQL; nothing on SQLite (its write transaction holds the whole file)."""


def _same(moment: Any) -> datetime:
    value: datetime = moment
    return value


SQLITE: Final = Dialect(
    name="sqlite",
    time=lambda moment: moment.timestamp(),
    moment=lambda seconds: datetime.fromtimestamp(seconds, UTC),
    stamp=lambda moment: moment.isoformat(),
    stamp_moment=lambda text: datetime.fromisoformat(text),
    flag=int,
    types={
        "counter": "INTEGER",
        "small": "INTEGER",
        "flag": "INTEGER",
        "blob": "BLOB",
        "time": "REAL",
        "stamp": "TEXT NOT NULL",
    },
)
"""SQLite: moments as seconds since the epoch (REAL), registry timestamps as ISO 8601 text."""

POSTGRES: Final = Dialect(
    name="postgresql",
    time=_same,
    moment=_same,
    stamp=_same,
    stamp_moment=_same,
    flag=lambda value: value,
    types={
        "counter": "BIGINT",
        "small": "SMALLINT",
        "flag": "BOOLEAN",
        "blob": "BYTEA",
        "time": "TIMESTAMPTZ",
        "stamp": "TIMESTAMPTZ NOT NULL DEFAULT now()",
    },
    skip_locked=" FOR UPDATE OF claimed SKIP LOCKED",
    lock_rows=" FOR UPDATE",
)
"""PostgreSQL: every moment is a TIMESTAMPTZ."""


class Where:
    """A WHERE clause built from fixed fragments; every value is a bound parameter."""

    def __init__(self, clause: str, *values: SqlValue) -> None:
        self.clauses = [clause]
        self.params: list[SqlValue] = list(values)

    def add(self, clause: str, *values: SqlValue) -> None:
        """AND one more condition, its `?` bound to `values` in order."""
        self.clauses.append(clause)
        self.params.extend(values)

    def when(self, clause: str, value: SqlValue, convert: Callable[[datetime], SqlValue] | None = None) -> None:
        """AND `clause` bound to `value` when `value` is given (not None); a moment goes through `convert`."""
        if value is not None:
            self.add(clause, convert(value) if convert is not None and isinstance(value, datetime) else value)

    def select(self, columns: str, table: str, order: str) -> Statement:
        """`SELECT columns FROM table WHERE ... ORDER BY order LIMIT ?` (the limit is the last parameter)."""
        # The clauses are fixed strings chosen by the store; every value is a bound parameter.
        return Statement(
            f"SELECT {columns} FROM {table} WHERE {' AND '.join(self.clauses)} ORDER BY {order} LIMIT ?"  # noqa: S608
        )


def marks(count: int) -> str:
    """`?, ?, ...`: `count` placeholders, for a list of values."""
    return ", ".join("?" * count)


def insert(table: str, columns: str, then: str = "") -> Statement:
    """`INSERT INTO table (columns) VALUES (?, ...)`, a placeholder for each of the columns, followed by `then` (an
    ON CONFLICT clause)."""
    return Statement(f"INSERT INTO {table} ({columns}) VALUES ({marks(columns.count(',') + 1)}){then}")  # noqa: S608


def upsert(table: str, columns: str, key: str) -> Statement:
    """`insert` that, when a row with the same `key` (the columns of a unique index) is there, sets its other
    columns to the new values instead."""
    keys = {name.strip() for name in key.split(",")}
    others = [name for name in (name.strip() for name in columns.split(",")) if name not in keys]
    updated = ", ".join(f"{name} = excluded.{name}" for name in others)
    return insert(table, columns, f" ON CONFLICT ({key}) DO UPDATE SET {updated}")


# -- schema migrations -------------------------------------------------------------------------------------------

SCHEMA_VERSION: Final = Statement("SELECT coalesce(max(version), 0) FROM schema_migrations")
RECORD_MIGRATION: Final = Statement("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)")

# -- product registry --------------------------------------------------------------------------------------------

VERSION_COLUMNS: Final = "product, version, checksum, format, source, document, created_at"
LATEST_VERSION: Final = Statement(
    f"SELECT {VERSION_COLUMNS} FROM product_versions WHERE product = ? ORDER BY version DESC LIMIT 1"  # noqa: S608
)
VERSION: Final = Statement(
    f"SELECT {VERSION_COLUMNS} FROM product_versions WHERE product = ? AND version = ?"  # noqa: S608
)
VERSIONS_BEFORE: Final = Statement(
    f"SELECT {VERSION_COLUMNS} FROM product_versions "  # noqa: S608
    "WHERE product = ? AND version < ? ORDER BY version DESC LIMIT ?"
)
INSERT_VERSION: Final = insert("product_versions", VERSION_COLUMNS)
BUMP_REVISION: Final = Statement(
    "INSERT INTO products (product, revision) VALUES (?, 1) "
    "ON CONFLICT (product) DO UPDATE SET revision = products.revision + 1"
)
PIN: Final = Statement("SELECT version FROM environment_pins WHERE product = ? AND env = ?")
SET_PIN: Final = upsert("environment_pins", "product, env, version, updated_at", "product, env")
PINS: Final = Statement("SELECT env, version FROM environment_pins WHERE product = ?")
REVISIONS: Final = Statement("SELECT product, revision FROM products")

# -- auth tokens and the result cache ----------------------------------------------------------------------------

AUTH_TOKEN: Final = Statement("SELECT token_values FROM auth_tokens WHERE key = ? AND expires_at > ?")
PUT_AUTH_TOKEN: Final = upsert("auth_tokens", "key, token_values, expires_at", "key")
DELETE_AUTH_TOKEN: Final = Statement("DELETE FROM auth_tokens WHERE key = ? AND token_values = ?")
CACHED: Final = Statement("SELECT value FROM cache_entries WHERE key = ? AND expires_at > ?")
PUT_CACHED: Final = upsert("cache_entries", "key, value, expires_at", "key")
PURGE: Final = tuple(
    Statement(f"DELETE FROM {table} WHERE expires_at <= ?")  # noqa: S608 - fixed table names
    for table in ("auth_tokens", "cache_entries", "idempotency_keys")
)

# -- idempotency -------------------------------------------------------------------------------------------------

IDEMPOTENCY_COLUMNS: Final = "key, request_hash, owner, state, response, lease_until, expires_at"
CLAIM: Final = Statement(
    f"INSERT INTO idempotency_keys ({IDEMPOTENCY_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, 'pending', NULL, ?, ?) ON CONFLICT (key) DO UPDATE SET "
    "request_hash = excluded.request_hash, owner = excluded.owner, state = 'pending', response = NULL, "
    "lease_until = excluded.lease_until, expires_at = excluded.expires_at "
    "WHERE idempotency_keys.expires_at <= ? "
    "OR (idempotency_keys.state = 'pending' AND idempotency_keys.lease_until <= ?)"
)
IDEMPOTENCY_KEY: Final = Statement(
    f"SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = ?"  # noqa: S608
)
MARK_SENT: Final = Statement(
    "UPDATE idempotency_keys SET state = 'sent', lease_until = ? "
    "WHERE key = ? AND owner = ? AND state IN ('pending', 'sent')"
)
RENEW: Final = Statement("UPDATE idempotency_keys SET lease_until = ? WHERE key = ? AND owner = ? AND state <> 'done'")
COMPLETE: Final = Statement("UPDATE idempotency_keys SET state = 'done', response = ? WHERE key = ? AND owner = ?")
RELEASE: Final = Statement("DELETE FROM idempotency_keys WHERE key = ? AND owner = ? AND state IN ('pending', 'sent')")

# -- execution log -----------------------------------------------------------------------------------------------

EXECUTION_COLUMNS: Final = (
    "process_id, product, env, version, kind, resource, status, started_at, ended_at, attempts, "
    "upstream_status, error_reason, cached, detail"
)
EXECUTION_ROWS: Final = (256, 64, 16, 4, 1)
"""The row counts of the execution log's multi-row inserts: a batch is sent as the fewest statements of these sizes
(320 records: 256 + 64), so a few statements carry it, and only these five texts are ever prepared."""


@functools.cache
def insert_executions(rows: int) -> Statement:
    """One INSERT of `rows` execution records (one of EXECUTION_ROWS): one statement for many rows instead of one per
    row, because SQLite's `executemany` steps once per row and hands the interpreter lock back and forth each time."""
    one = f"({marks(EXECUTION_COLUMNS.count(',') + 1)})"
    return Statement(
        f"INSERT INTO executions ({EXECUTION_COLUMNS}) VALUES "  # noqa: S608
        + ", ".join([one] * rows)
        + " ON CONFLICT DO NOTHING"
    )


# -- sessions ----------------------------------------------------------------------------------------------------

SESSION_COLUMNS: Final = (
    "session_id, product, env, tag, identifier, generation, started_at, refreshed_at, expires_at, revoked_at"
)
INSERT_SESSION: Final = Statement(
    f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"  # noqa: S608
)
SESSION: Final = Statement(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?")  # noqa: S608
ROTATE_SESSION: Final = Statement(
    "UPDATE sessions SET generation = generation + 1, refreshed_at = ? "  # noqa: S608
    "WHERE session_id = ? AND generation = ? AND revoked_at IS NULL AND expires_at > ? "
    f"RETURNING {SESSION_COLUMNS}"
)
REVOKE_SESSIONS: Final = {
    column: Statement(
        f"UPDATE sessions SET revoked_at = ? WHERE product = ? AND env = ? AND tag = ? AND {column} = ? "  # noqa: S608
        "AND revoked_at IS NULL RETURNING session_id, expires_at"
    )
    for column in ("session_id", "identifier")
}
REVOKED_SINCE: Final = Statement(
    "SELECT session_id, revoked_at, expires_at FROM sessions WHERE revoked_at IS NOT NULL AND revoked_at >= ? "
    "ORDER BY revoked_at"
)
