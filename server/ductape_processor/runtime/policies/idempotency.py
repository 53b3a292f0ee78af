"""Idempotency keys, for every resource kind that takes one (actions, broker publishes): the key's limit, the
record it is kept under, and the claim that makes one call of many run.

A key is scoped by the caller's product and environment (and, for a publish, its broker and topic): the same key in
two products names two calls. The record keeps a hash of the request, so a key sent again with another request is
refused (IDEMPOTENCY_KEY_REUSED) instead of answering with the first request's result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from ductape_processor.errors import FailedPrecondition
from ductape_processor.reasons import Reason
from ductape_processor.store.base import IdempotencyRecord, Store

MAX_IDEMPOTENCY_KEY: Final = 256
"""The longest idempotency key, in characters."""


def idempotency_key_problem(key: str) -> str | None:
    """Why `key` cannot be an idempotency key (a field violation's description), or None when it can."""
    return f"is longer than {MAX_IDEMPOTENCY_KEY} characters" if len(key) > MAX_IDEMPOTENCY_KEY else None


def record_key(scope: Sequence[str], key: str) -> str:
    """The store's key for a caller's idempotency `key` within `scope` (product, environment, ...)."""
    return "/".join([*scope, key])


async def claim(
    store: Store,
    key: str,
    request_hash: str,
    owner: str,
    *,
    lease: timedelta,
    retention: timedelta,
    reused: Callable[[], FailedPrecondition],
    wait: Callable[[IdempotencyRecord], Awaitable[None]],
) -> bytes | None:
    """Claim `key` for `owner`: None when the claim is `owner`'s (the caller runs the call), or the recorded
    response of a call that is done (the caller answers it).

    While another call holds the key, `wait(record)` is awaited (it raises to stop waiting) and the claim is tried
    again. A record of another request is refused with `reused()`.
    """
    while True:
        now = datetime.now(UTC)
        record = await store.idempotency_claim(key, request_hash, owner, now, now + lease, now + retention)
        if record.request_hash != request_hash:
            raise reused()
        if record.owner == owner:
            return None
        if record.state == "done" and record.response is not None:
            return record.response
        await wait(record)


def key_reused(what: str, idempotency_key: str) -> FailedPrecondition:
    """The error for an idempotency key sent again with another `what` (request, message) than its first."""
    return FailedPrecondition(
        f"this idempotency key was used for a different {what}",
        reason=Reason.IDEMPOTENCY_KEY_REUSED,
        metadata={"idempotency_key": idempotency_key},
    )
