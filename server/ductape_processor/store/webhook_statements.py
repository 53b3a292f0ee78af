"""The store's webhook SQL (store/webhooks.py), written once for both back-ends, as statements.py is."""

from __future__ import annotations

from typing import Final

from ductape_processor.store.leases import claim_statement
from ductape_processor.store.statements import Dialect, Statement, insert, marks

MESSAGE_COLUMNS: Final = "message_id, product, env, webhook, event, body, idempotency_key, request_hash, created_at"
DELIVERY_COLUMNS: Final = (
    "delivery_id, message_id, product, env, webhook, event, endpoint, status, attempts, next_attempt_at, created_at, "
    "last_code, lease_owner, lease_until"
)
ATTEMPT_COLUMNS: Final = "delivery_id, number, started_at, duration_ms, response_code, excerpt, error, success"
RECEIVED_COLUMNS: Final = (
    "received_id, product, env, webhook, webhook_id, received_at, content_type, headers, body, dispatch_status, "
    "dispatch_attempts, dispatch_at, dispatch_result, lease_owner, lease_until"
)

INSERT_MESSAGE: Final = insert("webhook_messages", MESSAGE_COLUMNS)
MESSAGE_BY_KEY: Final = Statement(
    f"SELECT {MESSAGE_COLUMNS} FROM webhook_messages "  # noqa: S608
    "WHERE product = ? AND env = ? AND idempotency_key = ?"
)
DELIVERY_IDS_OF: Final = Statement(
    "SELECT delivery_id FROM webhook_deliveries WHERE message_id = ? ORDER BY delivery_id"
)
DISABLED_ENDPOINTS: Final = Statement(
    "SELECT endpoint FROM webhook_endpoints WHERE product = ? AND env = ? AND webhook = ? AND disabled_at IS NOT NULL"
)
INSERT_DELIVERY: Final = insert("webhook_deliveries", DELIVERY_COLUMNS)
DELIVERY: Final = Statement(
    f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries "  # noqa: S608
    "WHERE product = ? AND env = ? AND delivery_id = ?"
)
MESSAGE_BODY: Final = Statement("SELECT body FROM webhook_messages WHERE message_id = ?")
ATTEMPTS: Final = Statement(
    f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE delivery_id = ? ORDER BY number"  # noqa: S608
)
END_DELIVERY: Final = Statement(
    "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, last_code = ?, lease_owner = NULL, "
    "lease_until = NULL WHERE delivery_id = ? AND lease_owner = ? AND status = 1"
)
DEFER_DELIVERY: Final = Statement(
    "UPDATE webhook_deliveries SET next_attempt_at = ?, attempts = attempts - 1, lease_owner = NULL, "
    "lease_until = NULL WHERE delivery_id = ? AND lease_owner = ? AND status = 1"
)
ENDPOINT_RECOVERED: Final = Statement(
    "UPDATE webhook_endpoints SET failing_since = NULL "
    "WHERE product = ? AND env = ? AND webhook = ? AND endpoint = ? AND failing_since IS NOT NULL"
)
ENDPOINT_FAILING: Final = Statement(
    "INSERT INTO webhook_endpoints (product, env, webhook, endpoint, failing_since, disabled_at) "
    "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (product, env, webhook, endpoint) DO UPDATE SET "
    "failing_since = coalesce(webhook_endpoints.failing_since, excluded.failing_since) "
    "RETURNING failing_since, disabled_at"
)
"""The endpoint failed an attempt: failing since then, unless it was failing already. Its row stays locked to the
end of the transaction, so the ends of its deliveries and its disabling take turns across replicas."""
DISABLE_ENDPOINT: Final = Statement(
    "UPDATE webhook_endpoints SET disabled_at = ? WHERE product = ? AND env = ? AND webhook = ? AND endpoint = ? "
    "AND disabled_at IS NULL"
)
DISABLE_DELIVERIES: Final = Statement(
    "UPDATE webhook_deliveries SET status = 4, next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL "
    "WHERE product = ? AND env = ? AND webhook = ? AND endpoint = ? AND status = 1 "
    "AND (lease_until IS NULL OR lease_until <= ?)"
)
"""The pending deliveries of a disabled endpoint, but those whose attempt is under way (a live lease): the end of
that attempt records it, then disables the delivery (an attempt made is never lost from its delivery's record)."""
ENABLE_ENDPOINT: Final = Statement(
    "UPDATE webhook_endpoints SET disabled_at = NULL, failing_since = NULL "
    "WHERE product = ? AND env = ? AND webhook = ? AND endpoint = ?"
)
REDELIVER: Final = Statement(
    "UPDATE webhook_deliveries SET status = 1, attempts = 0, next_attempt_at = ?, lease_owner = NULL, "  # noqa: S608
    f"lease_until = NULL WHERE product = ? AND env = ? AND delivery_id = ? RETURNING {DELIVERY_COLUMNS}"
)
NEXT_DELIVERY_MOMENT: Final = Statement(
    "SELECT min(CASE WHEN lease_until > next_attempt_at THEN lease_until ELSE next_attempt_at END) "
    "FROM webhook_deliveries WHERE status = 1"
)
INSERT_RECEIVED: Final = insert(
    "webhooks_received", RECEIVED_COLUMNS, " ON CONFLICT (product, env, webhook, webhook_id) DO NOTHING"
)
END_DISPATCH: Final = Statement(
    "UPDATE webhooks_received SET dispatch_status = ?, dispatch_at = ?, dispatch_result = ?, lease_owner = NULL, "
    "lease_until = NULL WHERE received_id = ? AND lease_owner = ? AND dispatch_status = 1"
)
NEXT_DISPATCH_MOMENT: Final = Statement(
    "SELECT min(CASE WHEN lease_until > dispatch_at THEN lease_until ELSE dispatch_at END) "
    "FROM webhooks_received WHERE dispatch_status = 1"
)


def claim_deliveries(dialect: Dialect) -> Statement:
    """Lease the pending deliveries due at a moment: owner, lease end, moment, moment, limit."""
    return claim_statement(
        dialect,
        "webhook_deliveries",
        "delivery_id",
        "lease_owner = ?, lease_until = ?, attempts = attempts + 1",
        "claimed.status = 1 AND claimed.next_attempt_at <= ? "
        "AND (claimed.lease_until IS NULL OR claimed.lease_until <= ?)",
        "claimed.next_attempt_at",
        DELIVERY_COLUMNS,
    )


def claim_dispatches(dialect: Dialect) -> Statement:
    """Lease the pending dispatches of received webhooks due at a moment: owner, lease end, moment, moment, limit."""
    return claim_statement(
        dialect,
        "webhooks_received",
        "received_id",
        "lease_owner = ?, lease_until = ?, dispatch_attempts = dispatch_attempts + 1",
        "claimed.dispatch_status = 1 AND claimed.dispatch_at <= ? "
        "AND (claimed.lease_until IS NULL OR claimed.lease_until <= ?)",
        "claimed.dispatch_at",
        RECEIVED_COLUMNS,
    )


def insert_attempt_if_held(dialect: Dialect) -> Statement:
    """Record an attempt unless another owner holds its delivery now: the attempt's columns, then the delivery id
    and the owner that made it (run before the delivery's end clears the lease). The values are cast to the
    columns' types, as PostgreSQL cannot infer a SELECT list's parameters. The attempt's number follows the
    delivery's recorded attempts (its second parameter is the delivery id again): a Redeliver starts the schedule
    over (`attempts` = 0) but not the numbering."""
    kinds = ("TEXT", "", dialect.types["time"], "INTEGER", "INTEGER", "TEXT", "TEXT", dialect.types["flag"])
    number = "(SELECT COALESCE(MAX(number), 0) + 1 FROM webhook_attempts WHERE delivery_id = CAST(? AS TEXT))"
    values = ", ".join(f"CAST(? AS {kind})" if kind else number for kind in kinds)
    return Statement(
        f"INSERT INTO webhook_attempts ({ATTEMPT_COLUMNS}) SELECT {values} WHERE EXISTS ("  # noqa: S608
        "SELECT 1 FROM webhook_deliveries WHERE delivery_id = ? AND lease_owner = ? AND status = 1)"
    )


def message_bodies(count: int) -> Statement:
    """The bodies of `count` messages by id."""
    return Statement(f"SELECT message_id, body FROM webhook_messages WHERE message_id IN ({marks(count)})")  # noqa: S608


EXPIRED_MESSAGES: Final = Statement(
    "SELECT m.message_id FROM webhook_messages m WHERE m.created_at < ? AND NOT EXISTS ("
    "SELECT 1 FROM webhook_deliveries d WHERE d.message_id = m.message_id AND d.status = 1) "
    "ORDER BY m.created_at LIMIT ?"
)
"""Messages emitted before a moment none of whose deliveries is pending: moment, limit."""
EXPIRED_RECEIVED: Final = Statement(
    "DELETE FROM webhooks_received WHERE received_id IN (SELECT received_id FROM webhooks_received "
    "WHERE received_at < ? AND dispatch_status <> 1 ORDER BY received_at LIMIT ?)"
)
"""Delete the webhooks received before a moment whose dispatch is not pending: moment, limit."""


def ended_deliveries_of(count: int) -> Statement:
    """Delete the deliveries of `count` messages that are not pending (a Redeliver may have made one pending since
    its message was picked: it stays), returning their ids."""
    return Statement(
        f"DELETE FROM webhook_deliveries WHERE message_id IN ({marks(count)}) AND status <> 1 "  # noqa: S608
        "RETURNING delivery_id"
    )


def attempts_of(count: int) -> Statement:
    """Delete the attempts of `count` deliveries."""
    return Statement(f"DELETE FROM webhook_attempts WHERE delivery_id IN ({marks(count)})")  # noqa: S608


def messages_without_deliveries(count: int) -> Statement:
    """Delete those of `count` messages that have no delivery left."""
    return Statement(
        f"DELETE FROM webhook_messages WHERE message_id IN ({marks(count)}) AND NOT EXISTS ("  # noqa: S608
        "SELECT 1 FROM webhook_deliveries d WHERE d.message_id = webhook_messages.message_id)"
    )
