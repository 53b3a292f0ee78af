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
