"""The store interface. Both implementations pass the same contract tests (tests/test_store_contract.py)."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from ductape_processor.records import record
from ductape_processor.store.feature_records import FeatureState
from ductape_processor.store.job_records import JobState
from ductape_processor.store.webhook_records import WebhookState


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One stored manifest version."""

    product: str
    version: int
    checksum: str
    format: int
    source: bytes
    document: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ProductRevision:
    """A product's change counter: it grows on every apply that stores a version and on every promote."""

    product: str
    revision: int


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The state of an idempotency key, held by `owner` until `lease_until` (renewed while its call runs).

    `pending`: claimed, nothing sent upstream yet (a dead owner's claim is taken over when its lease ends);
    `sent`: the request may have reached the upstream (never run again; a dead owner leaves the outcome unknown);
    `done`: `response` holds the first answer.
    """

    key: str
    request_hash: str
    owner: str
    state: str  # "pending", "sent" or "done"
    response: bytes | None
    lease_until: datetime
    expires_at: datetime


class ExecutionStatus(IntEnum):
    """How an execution ended; the values are those of the API's `ExecutionStatus` (checked by a test)."""

    SUCCESS = 1
    """The upstream answered 2xx (or the answer came from the cache)."""
    FAIL = 2
    """An error, or an upstream answer outside 2xx (`error_reason` says which)."""


@record
class ExecutionRecord:
    """One run of a resource, as the execution log keeps it."""

    process_id: str
    product: str
    env: str
    version: int
    kind: str
    resource: str
    status: ExecutionStatus
    started_at: datetime
    ended_at: datetime
    attempts: int
    upstream_status: int
    error_reason: str
    cached: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ExecutionFilter:
    """Which executions to list; None means any."""

    product: str
    env: str | None = None
    resource: str | None = None
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """Which sessions to list: one session type of one environment; `identifier` None means any user."""

    product: str
    env: str
    tag: str
    identifier: str | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session (a refresh-token family): who, since when, how far its refresh tokens got, whether revoked."""

    session_id: str
    product: str
    env: str
    tag: str
    identifier: str
    generation: int
    started_at: datetime
    refreshed_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


ChangeListener = Callable[[str], Awaitable[None] | None]


class Store(WebhookState, JobState, FeatureState):
    """Durable state of the processor. Every method is safe to call concurrently, also from several replicas."""

    dialect: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and migrate the schema to the newest version."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The newest migration applied."""

    @abc.abstractmethod
    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        """Store the product's next version, or return the latest one if its checksum is `checksum`.

        Returns the record and whether it was created. Concurrent calls for one product get distinct versions.
        """

    @abc.abstractmethod
    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        """One version, or None."""

    @abc.abstractmethod
    async def latest_version(self, product: str) -> VersionRecord | None:
        """The newest version, or None when the product was never applied."""

    @abc.abstractmethod
    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        """Versions older than `before` (all when None), newest first, at most `limit`."""

    @abc.abstractmethod
    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        """Pin `env` to `version`; return the previous pin. The version must exist."""

    @abc.abstractmethod
    async def pins(self, product: str) -> dict[str, int]:
        """Environment slug to pinned version."""

    @abc.abstractmethod
    async def revisions(self) -> list[ProductRevision]:
        """Every product's change counter, to find products changed by another replica."""

    async def listen(self, listener: ChangeListener, topic: str = "products") -> None:
        """Call `listener(payload)` soon after another replica changes something of `topic`: a product ("products",
        the payload is the product), a job or a webhook delivery ("jobs", "webhooks": the payload is the product;
        for a new job, `product@due` with its first due moment in Unix seconds), a feature run ("features": the
        payload is the run's id, or empty when a replica released its runs). Optional: polling covers it."""

    # -- auth tokens minted by credential flows -------------------------------------------------------------------

    @abc.abstractmethod
    async def get_auth_token(self, key: str, now: datetime) -> str | None:
        """The stored token values (JSON) under `key` when not expired at `now`."""

    @abc.abstractmethod
    async def put_auth_token(self, key: str, values: str, expires_at: datetime) -> None:
        """Store (or replace) token values until `expires_at`."""

    @abc.abstractmethod
    async def delete_auth_token(self, key: str, values: str) -> None:
        """Forget the token under `key` if it still holds `values` (so a newer token is kept)."""

    # -- result cache ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def cache_get(self, key: str, now: datetime) -> bytes | None:
        """A cached value that is fresh at `now`."""

    @abc.abstractmethod
    async def cache_put(self, key: str, value: bytes, expires_at: datetime) -> None:
        """Store (or replace) a cached value until `expires_at`."""

    # -- idempotency ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def idempotency_claim(
        self, key: str, request_hash: str, owner: str, now: datetime, lease_until: datetime, expires_at: datetime
    ) -> IdempotencyRecord:
        """Claim `key` for `owner`, or return who holds it.

        The claim succeeds (the returned record's owner is `owner`) when the key is new, expired at `now`, or
        pending with a lease that ran out (its owner died). Atomic across replicas.
        """

    @abc.abstractmethod
    async def idempotency_mark_sent(self, key: str, owner: str, lease_until: datetime) -> bool:
        """Move `owner`'s claim to `sent` (before the request leaves); False if `owner` no longer holds the key."""

    @abc.abstractmethod
    async def idempotency_renew(self, key: str, owner: str, lease_until: datetime) -> bool:
        """Extend `owner`'s lease on a pending or sent key; False if `owner` no longer holds it."""

    @abc.abstractmethod
    async def idempotency_complete(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord | None = None
    ) -> bool:
        """Record the first response of a claimed key, and `record` (its execution) in the same transaction; False
        if `owner` no longer holds the key. Safe to repeat: the record is kept once."""

    @abc.abstractmethod
    async def idempotency_release(self, key: str, owner: str) -> None:
        """Give up a pending or sent claim (its owner knows the call failed before an answer worth keeping)."""

    @abc.abstractmethod
    async def idempotency_get(self, key: str) -> IdempotencyRecord | None:
        """The key's record, whatever its state."""

    # -- execution log ----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_executions(self, records: list[ExecutionRecord]) -> None:
        """Append execution records (one round trip for the batch)."""

    @abc.abstractmethod
    async def list_executions(
        self, where: ExecutionFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ExecutionRecord]:
        """Records matching `where`, newest first, strictly older than the `after` (started_at, process_id) cursor."""

    # -- sessions ---------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_session(self, record: SessionRecord) -> None:
        """Store a new session (generation 0, not revoked)."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None:
        """A session by id."""

    @abc.abstractmethod
    async def rotate_session(self, session_id: str, generation: int, now: datetime) -> SessionRecord | None:
        """Advance a live session from `generation` to the next one (atomic); None when it is not at `generation`,
        revoked or expired at `now` — `get_session` tells which."""

    @abc.abstractmethod
    async def revoke_sessions(
        self, product: str, env: str, tag: str, *, session_id: str | None, identifier: str | None, now: datetime
    ) -> list[tuple[str, datetime]]:
        """Revoke one session or every session of one identifier; return (id, expiry) of those that were live."""

    @abc.abstractmethod
    async def list_sessions(
        self, where: SessionFilter, now: datetime, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[SessionRecord]:
        """Live sessions (not revoked, not expired at `now`), newest first, older than the `after` cursor."""

    @abc.abstractmethod
    async def revoked_since(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        """(session id, revoked at, expires at) of sessions revoked at or after `since`, oldest first."""

    @abc.abstractmethod
    async def purge_expired(self, now: datetime) -> int:
        """Delete expired cache entries, tokens and idempotency records; return how many."""
