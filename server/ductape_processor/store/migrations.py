"""Versioned schema migrations of the store, written once for both dialects.

Append a migration to the end of the list to change the schema; never edit one that has shipped. Column types that
differ between the dialects are `{role}` fields, filled from `Dialect.types` (statements.py). Each store applies the
ones it has not applied yet at start, in one transaction each, and records them in `schema_migrations`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ductape_processor.store import statements
from ductape_processor.store.statements import Dialect, Statement


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: a version number, what it does, and its SQL statements."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {stamp})"
)
"""The table that records which migrations were applied (created before the first one runs)."""

_TEMPLATES: tuple[Migration, ...] = (
    Migration(
        1,
        "product registry: versions, environment pins, change counters",
        (
            """CREATE TABLE products (
                product TEXT PRIMARY KEY,
                revision {counter} NOT NULL
            )""",
            """CREATE TABLE product_versions (
                product TEXT NOT NULL,
                version INTEGER NOT NULL,
                checksum TEXT NOT NULL,
                format {small} NOT NULL,
                source {blob} NOT NULL,
                document TEXT NOT NULL,
                created_at {stamp},
                PRIMARY KEY (product, version)
            )""",
            """CREATE TABLE environment_pins (
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                updated_at {stamp},
                PRIMARY KEY (product, env),
                FOREIGN KEY (product, version) REFERENCES product_versions (product, version)
            )""",
        ),
    ),
    Migration(
        2,
        "actions: auth tokens, result cache, idempotency keys, execution log",
        (
            """CREATE TABLE auth_tokens (
                key TEXT PRIMARY KEY,
                token_values TEXT NOT NULL,
                expires_at {time} NOT NULL
            )""",
            """CREATE TABLE cache_entries (
                key TEXT PRIMARY KEY,
                value {blob} NOT NULL,
                expires_at {time} NOT NULL
            )""",
            """CREATE TABLE idempotency_keys (
                key TEXT PRIMARY KEY,
                request_hash TEXT NOT NULL,
                owner TEXT NOT NULL,
                state TEXT NOT NULL,
                response {blob},
                lease_until {time} NOT NULL,
                expires_at {time} NOT NULL
            )""",
            """CREATE TABLE executions (
                process_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                version INTEGER NOT NULL,
                kind TEXT NOT NULL,
                resource TEXT NOT NULL,
                status {small} NOT NULL,
                started_at {time} NOT NULL,
                ended_at {time} NOT NULL,
                attempts INTEGER NOT NULL,
                upstream_status INTEGER NOT NULL,
                error_reason TEXT NOT NULL,
                cached {flag} NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX executions_by_product ON executions (product, started_at DESC, process_id DESC)",
        ),
    ),
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
                started_at {time} NOT NULL,
                refreshed_at {time} NOT NULL,
                expires_at {time} NOT NULL,
                revoked_at {time}
            )""",
            "CREATE INDEX sessions_by_identifier ON sessions (product, env, tag, identifier)",
            "CREATE INDEX sessions_by_start ON sessions (product, env, tag, started_at DESC, session_id DESC)",
            "CREATE INDEX sessions_by_revocation ON sessions (revoked_at) WHERE revoked_at IS NOT NULL",
        ),
    ),
    Migration(
        4,
        "jobs: scheduled jobs and their runs",
        (
            """CREATE TABLE jobs (
                job_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                name TEXT NOT NULL,
                target_kind TEXT NOT NULL,
                spec TEXT NOT NULL,
                status {small} NOT NULL,
                next_run_at {time},
                runs {counter} NOT NULL,
                declared {flag} NOT NULL,
                idempotency_key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                created_at {time} NOT NULL,
                lease_owner TEXT,
                lease_until {time}
            )""",
            "CREATE UNIQUE INDEX jobs_active_name ON jobs (product, env, name) WHERE name <> '' AND status IN (1, 2)",
            "CREATE UNIQUE INDEX jobs_by_key ON jobs (product, env, idempotency_key) WHERE idempotency_key <> ''",
            "CREATE INDEX jobs_due ON jobs (next_run_at) WHERE status = 1",
            "CREATE INDEX jobs_by_product ON jobs (product, env, created_at DESC, job_id DESC)",
            """CREATE TABLE job_runs (
                run_id TEXT PRIMARY KEY,
                job_id TEXT NOT NULL REFERENCES jobs (job_id),
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                trigger {small} NOT NULL,
                status {small} NOT NULL,
                due_at {time} NOT NULL,
                attempt_at {time},
                attempts INTEGER NOT NULL,
                started_at {time},
                ended_at {time},
                owner TEXT,
                lease_until {time},
                reclaimed {flag} NOT NULL,
                result TEXT NOT NULL,
                error_reason TEXT NOT NULL,
                error_message TEXT NOT NULL,
                process_id TEXT NOT NULL
            )""",
            "CREATE INDEX job_runs_by_job ON job_runs (job_id, due_at DESC, run_id DESC)",
            "CREATE INDEX job_runs_open ON job_runs (status, attempt_at) WHERE status IN (1, 2, 3)",
        ),
    ),
    Migration(
        5,
        "webhooks: emitted messages, their deliveries and attempts, endpoints' health, received webhooks",
        (
            """CREATE TABLE webhook_messages (
                message_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                webhook TEXT NOT NULL,
                event TEXT NOT NULL,
                body TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                created_at {time} NOT NULL
            )""",
            "CREATE UNIQUE INDEX webhook_messages_by_key ON webhook_messages (product, env, idempotency_key) "
            "WHERE idempotency_key <> ''",
            """CREATE TABLE webhook_deliveries (
                delivery_id TEXT PRIMARY KEY,
                message_id TEXT NOT NULL REFERENCES webhook_messages (message_id),
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                webhook TEXT NOT NULL,
                event TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                status {small} NOT NULL,
                attempts INTEGER NOT NULL,
                next_attempt_at {time},
                created_at {time} NOT NULL,
                last_code INTEGER NOT NULL,
                lease_owner TEXT,
                lease_until {time}
            )""",
            "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 1",
            "CREATE INDEX webhook_deliveries_listed ON webhook_deliveries "
            "(product, env, created_at DESC, delivery_id DESC)",
            "CREATE INDEX webhook_deliveries_by_message ON webhook_deliveries (message_id)",
            "CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (product, env, webhook, endpoint) "
            "WHERE status = 1",
            """CREATE TABLE webhook_attempts (
                delivery_id TEXT NOT NULL,
                number INTEGER NOT NULL,
                started_at {time} NOT NULL,
                duration_ms INTEGER NOT NULL,
                response_code INTEGER NOT NULL,
                excerpt TEXT NOT NULL,
                error TEXT NOT NULL,
                success {flag} NOT NULL,
                PRIMARY KEY (delivery_id, number)
            )""",
            """CREATE TABLE webhook_endpoints (
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                webhook TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                failing_since {time},
                disabled_at {time},
                PRIMARY KEY (product, env, webhook, endpoint)
            )""",
            """CREATE TABLE webhooks_received (
                received_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                webhook TEXT NOT NULL,
                webhook_id TEXT NOT NULL,
                received_at {time} NOT NULL,
                content_type TEXT NOT NULL,
                headers TEXT NOT NULL,
                body {blob} NOT NULL
            )""",
            "CREATE UNIQUE INDEX webhooks_received_once ON webhooks_received (product, env, webhook, webhook_id)",
            "CREATE INDEX webhooks_received_listed ON webhooks_received "
            "(product, env, received_at DESC, received_id DESC)",
        ),
    ),
    Migration(
        6,
        "webhooks: a received webhook's dispatch, claimed under a lease and retried until it is done",
        (
            "ALTER TABLE webhooks_received ADD COLUMN dispatch_status {small} NOT NULL DEFAULT 0",
            "ALTER TABLE webhooks_received ADD COLUMN dispatch_attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE webhooks_received ADD COLUMN dispatch_at {time}",
            "ALTER TABLE webhooks_received ADD COLUMN dispatch_result TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE webhooks_received ADD COLUMN lease_owner TEXT",
            "ALTER TABLE webhooks_received ADD COLUMN lease_until {time}",
            "CREATE INDEX webhooks_received_dispatch_due ON webhooks_received (dispatch_at) WHERE dispatch_status = 1",
        ),
    ),
    Migration(
        7,
        "webhooks: retention, by the time a message was emitted and a webhook received",
        (
            "CREATE INDEX webhook_messages_by_time ON webhook_messages (created_at)",
            "CREATE INDEX webhooks_received_by_time ON webhooks_received (received_at)",
        ),
    ),
    Migration(
        8,
        "features: runs of features and each call they made",
        (
            """CREATE TABLE feature_runs (
                run_id TEXT PRIMARY KEY,
                product TEXT NOT NULL,
                env TEXT NOT NULL,
                feature TEXT NOT NULL,
                version INTEGER NOT NULL,
                status {small} NOT NULL,
                input TEXT NOT NULL,
                session_tag TEXT NOT NULL,
                session_token TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                output TEXT NOT NULL,
                error_reason TEXT NOT NULL,
                error_message TEXT NOT NULL,
                failed_step TEXT NOT NULL,
                replay_of TEXT NOT NULL,
                parent_run TEXT NOT NULL,
                takeovers INTEGER NOT NULL,
                created_at {time} NOT NULL,
                ended_at {time},
                expires_at {time},
                owner TEXT,
                lease_until {time}
            )""",
            "CREATE UNIQUE INDEX feature_runs_by_key ON feature_runs (product, env, idempotency_key) "
            "WHERE idempotency_key <> ''",
            "CREATE INDEX feature_runs_going ON feature_runs (lease_until) WHERE status IN (1, 6)",
            "CREATE INDEX feature_runs_listed ON feature_runs (product, env, created_at DESC, run_id DESC)",
            "CREATE INDEX feature_runs_expiry ON feature_runs (expires_at) WHERE expires_at IS NOT NULL",
            """CREATE TABLE feature_steps (
                run_id TEXT NOT NULL,
                sequence TEXT NOT NULL,
                event TEXT NOT NULL,
                phase {small} NOT NULL,
                status {small} NOT NULL,
                attempts INTEGER NOT NULL,
                iteration INTEGER NOT NULL,
                position INTEGER NOT NULL,
                started_at {time},
                ended_at {time},
                output TEXT NOT NULL,
                error_reason TEXT NOT NULL,
                error_message TEXT NOT NULL,
                PRIMARY KEY (run_id, sequence, event, phase)
            )""",
        ),
    ),
    Migration(
        9,
        "jobs: due jobs held by the transaction that steps them (no lease on the job), open runs indexed by job",
        (
            # A job is stepped in the transaction that claims it (store/leases.py, hold_statement): its lease columns
            # were written twice per occurrence and read by no one else.
            "ALTER TABLE jobs DROP COLUMN lease_owner",
            "ALTER TABLE jobs DROP COLUMN lease_until",
            # The open runs by job: a claim counts a job's runs going and pending on it, not on all its runs.
            "DROP INDEX job_runs_open",
            "CREATE INDEX job_runs_open ON job_runs (job_id, status) WHERE status IN (1, 2, 3)",
        ),
    ),
)


def render(dialect: Dialect) -> tuple[Migration, ...]:
    """The migrations with `dialect`'s column types."""
    return tuple(
        Migration(m.version, m.description, tuple(text.format(**dialect.types) for text in m.statements))
        for m in _TEMPLATES
    )


def migrations_table(dialect: Dialect) -> Statement:
    """The `schema_migrations` table in `dialect`."""
    return Statement(MIGRATIONS_TABLE.format(**dialect.types))


SQLITE: Final = render(statements.SQLITE)
POSTGRES: Final = render(statements.POSTGRES)
