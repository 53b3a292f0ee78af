"""Versioned schema migrations of the store, per dialect.

Append a migration to the end of a list to change the schema; never edit one that has shipped. Each store applies
the ones it has not applied yet at start, in one transaction each, and records them in `schema_migrations`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: a version number, what it does, and its SQL statements."""

    version: int
    description: str
    statements: tuple[str, ...]


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "product registry: versions, environment pins, change counters",
        (
            """CREATE TABLE products (
                product TEXT PRIMARY KEY,
                revision INTEGER NOT NULL
            )""",
            """CREATE TABLE product_versions (
                product TEXT NOT NULL,
                version INTEGER NOT NULL,
                checksum TEXT NOT NULL,
                format INTEGER NOT NULL,
                source BLOB NOT NULL,
                document TEXT NOT NULL,
                created_at TEXT NOT NULL,
                PRIMARY KEY (product, version)
            )""",
            """CREATE TABLE environment_pins (
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (product, env),
                FOREIGN KEY (product, version) REFERENCES product_versions (product, version)
            )""",
        ),
    ),
)

SQLITE += (
    Migration(
        2,
        "actions: auth tokens, result cache, idempotency keys, execution log",
        (
            """CREATE TABLE auth_tokens (
                key TEXT PRIMARY KEY,
                token_values TEXT NOT NULL,
                expires_at REAL NOT NULL
            )""",
            """CREATE TABLE cache_entries (
                key TEXT PRIMARY KEY,
                value BLOB NOT NULL,
                expires_at REAL NOT NULL
            )""",
            """CREATE TABLE idempotency_keys (
                key TEXT PRIMARY KEY,
                request_hash TEXT NOT NULL,
                owner TEXT NOT NULL,
                state TEXT NOT NULL,
                response BLOB,
                lease_until REAL NOT NULL,
                expires_at REAL NOT NULL
            )""",
            """CREATE TABLE executions (
                process_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                kind TEXT NOT NULL,
                resource TEXT NOT NULL,
                status INTEGER NOT NULL,
                started_at REAL NOT NULL,
                ended_at REAL NOT NULL,
                attempts INTEGER NOT NULL,
                upstream_status INTEGER NOT NULL,
                error_reason TEXT NOT NULL,
                cached INTEGER NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX executions_by_product ON executions (product, started_at DESC, process_id DESC)",
        ),
    ),
)

SQLITE += (
    Migration(
        3,
        "sessions: one row per session (refresh-token family)",
        (
            """CREATE TABLE sessions (
                session_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                tag TEXT NOT NULL,
                identifier TEXT NOT NULL,
                generation INTEGER NOT NULL,
                started_at REAL NOT NULL,
                refreshed_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                revoked_at REAL
            )""",
            "CREATE INDEX sessions_by_identifier ON sessions (product, env, tag, identifier)",
            "CREATE INDEX sessions_by_start ON sessions (product, env, tag, started_at DESC, session_id DESC)",
            "CREATE INDEX sessions_by_revocation ON sessions (revoked_at) WHERE revoked_at IS NOT NULL",
        ),
    ),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "product registry: versions, environment pins, change counters",
        (
            """CREATE TABLE products (
                product TEXT PRIMARY KEY,
                revision BIGINT NOT NULL
            )""",
            """CREATE TABLE product_versions (
                product TEXT NOT NULL,
                version INTEGER NOT NULL,
                checksum TEXT NOT NULL,
                format SMALLINT NOT NULL,
                source BYTEA NOT NULL,
                document TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (product, version)
            )""",
            """CREATE TABLE environment_pins (
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (product, env),
                FOREIGN KEY (product, version) REFERENCES product_versions (product, version)
            )""",
        ),
    ),
)

POSTGRES += (
    Migration(
        2,
        "actions: auth tokens, result cache, idempotency keys, execution log",
        (
            """CREATE TABLE auth_tokens (
                key TEXT PRIMARY KEY,
                token_values TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            """CREATE TABLE cache_entries (
                key TEXT PRIMARY KEY,
                value BYTEA NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            """CREATE TABLE idempotency_keys (
                key TEXT PRIMARY KEY,
                request_hash TEXT NOT NULL,
                owner TEXT NOT NULL,
                state TEXT NOT NULL,
                response BYTEA,
                lease_until TIMESTAMPTZ NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            """CREATE TABLE executions (
                process_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                kind TEXT NOT NULL,
                resource TEXT NOT NULL,
                status SMALLINT NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                ended_at TIMESTAMPTZ NOT NULL,
                attempts INTEGER NOT NULL,
                upstream_status INTEGER NOT NULL,
                error_reason TEXT NOT NULL,
                cached BOOLEAN NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX executions_by_product ON executions (product, started_at DESC, process_id DESC)",
        ),
    ),
)

POSTGRES += (
    Migration(
        3,
        "sessions: one row per session (refresh-token family)",
        (
            """CREATE TABLE sessions (
                session_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                tag TEXT NOT NULL,
                identifier TEXT NOT NULL,
                generation INTEGER NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                refreshed_at TIMESTAMPTZ NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL,
                revoked_at TIMESTAMPTZ
            )""",
            "CREATE INDEX sessions_by_identifier ON sessions (product, env, tag, identifier)",
            "CREATE INDEX sessions_by_start ON sessions (product, env, tag, started_at DESC, session_id DESC)",
            "CREATE INDEX sessions_by_revocation ON sessions (revoked_at) WHERE revoked_at IS NOT NULL",
        ),
    ),
)
