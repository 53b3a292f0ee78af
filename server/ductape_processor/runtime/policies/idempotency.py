"""Idempotency keys, for every resource kind that takes one (actions, broker publishes): the key's limit, the
record it is kept under, and the claim that makes one call of many run.

A key is scoped by the caller's product and environment (and, for a publish, its broker and topic): the same key in
two products names two calls. The record keeps a hash of the request, so a key sent again with another request is
refused (IDEMPOTENCY_KEY_REUSED) instead of answering with the first request's result.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from ductape_processor.errors import FailedPrecondition, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.store.base import IdempotencyRecord, Store

MAX_IDEMPOTENCY_KEY: Final = 256
"""The longest idempotency key, in characters."""
WAIT_STEP_S: Final = 0.05
"""How often a call waiting for another holding its key looks again."""
T = TypeVar("T")


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


async def run_once(
    store: Store,
    key: str,
    request_hash: str,
    *,
    idempotency_key: str,
    lease: timedelta,
    retention: timedelta,
    deadline: Deadline,
    work: Callable[[], Awaitable[T]],
    encode: Callable[[T], bytes],
    decode: Callable[[bytes], T],
    mark_sent: bool = False,
) -> T:
    """`work()` run once per `key`: the first call runs it and records `encode(result)`; a repeat with the same
    request (`request_hash`) gets `decode(recorded)`, waiting while the first one runs (until `deadline`:
    IDEMPOTENCY_KEY_IN_USE). With `mark_sent`, the claim is marked sent before `work` starts, so a repeat after the
    owner died answers IDEMPOTENCY_OUTCOME_UNKNOWN instead of running `work` again (for work that cannot be undone,
    such as a message sent). A `work` that raises gives the key up."""
    owner = os.urandom(8).hex()

    async def wait(record: IdempotencyRecord) -> None:
        if record.state == "sent" and record.lease_until <= datetime.now(UTC):
            raise Unavailable(
                "the call holding this idempotency key ended without recording its outcome (its replica stopped or "
                "the store failed); what it sent is not sent again",
                reason=Reason.IDEMPOTENCY_OUTCOME_UNKNOWN,
                metadata={"idempotency_key": idempotency_key},
            )
        left = deadline.remaining()
        if left is not None and left <= WAIT_STEP_S:
            raise FailedPrecondition(
                "a call with this idempotency key is still running", reason=Reason.IDEMPOTENCY_KEY_IN_USE
            )
        await asyncio.sleep(WAIT_STEP_S)

    while True:
        answer = await claim(
            store,
            key,
            request_hash,
            owner,
            lease=lease,
            retention=retention,
            reused=lambda: key_reused("request", idempotency_key),
            wait=wait,
        )
        if answer is not None:
            return decode(answer)
        if not mark_sent or await store.idempotency_mark_sent(key, owner, datetime.now(UTC) + lease):
            break
    try:
        result = await work()
    except BaseException:
        await store.idempotency_release(key, owner)
        raise
    await store.idempotency_complete(key, owner, encode(result))
    return result
