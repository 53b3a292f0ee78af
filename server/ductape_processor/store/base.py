"""The store interface. Both implementations pass the same contract tests (tests/test_store_contract.py)."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum

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


@dataclass(frozen=True, slots=True)
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


def new_job_payload(product: str, due: datetime | None) -> str:
    """The "jobs" change payload announcing a new job of `product` first due at `due`."""
    return f"{product}@{due.timestamp()}" if due is not None else product


def announced_due(payload: str) -> datetime | None:
    """The first due moment a "jobs" change payload announces (a new job's), if it names one."""
    _, at, seconds = payload.rpartition("@")
    try:
        return datetime.fromtimestamp(float(seconds), UTC) if at else None
    except (ValueError, OverflowError):
        return None


class JobStatus(IntEnum):
    """A job's state; the values are the API's `JobStatus` (checked by a test)."""

    SCHEDULED = 1
    """Waiting for its next occurrence (or running it)."""
    PAUSED = 2
    CANCELLED = 3
    COMPLETED = 4
    """No occurrence is left."""
    FAILED = 5
    """A one-off job whose run failed after its retries."""


class RunStatus(IntEnum):
    """A run's state; the values are the API's `RunStatus` (checked by a test)."""

    PENDING = 1
    """Due: at `attempt_at` (a TriggerNow), or, without one, as soon as no run of its job is going (buffered)."""
    RUNNING = 2
    RETRYING = 3
    """Waiting for `attempt_at`, its next attempt."""
    SUCCEEDED = 4
    FAILED = 5
    SKIPPED = 6
    CANCELLED = 7


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job: where it belongs, what it runs (`spec`, JSON the jobs runtime reads), its state and next occurrence.

    `lease_owner`/`lease_until`: the replica advancing the job's schedule (held for moments, between a claim and
    `advance_jobs`). `busy` and `queued` (filled by `claim_due_jobs` only): its runs going or waiting for a retry, and
    its runs pending.
    """

    job_id: str
    product: str
    env: str
    name: str
    target_kind: str
    spec: str
    status: JobStatus
    next_run_at: datetime | None
    runs: int
    declared: bool
    idempotency_key: str
    request_hash: str
    created_at: datetime
    lease_owner: str | None = None
    lease_until: datetime | None = None
    busy: int = 0
    queued: int = 0


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run of a job: due at `due_at`, attempted by `owner` under a lease that it renews while the target runs."""

    run_id: str
    job_id: str
    product: str
    env: str
    trigger: int
    status: RunStatus
    due_at: datetime
    attempt_at: datetime | None
    attempts: int
    started_at: datetime | None
    ended_at: datetime | None
    owner: str | None
    lease_until: datetime | None
    reclaimed: bool
    result: str
    error_reason: str
    error_message: str
    process_id: str


@dataclass(frozen=True, slots=True)
class JobStep:
    """A leased job moved past an occurrence (`Store.advance_jobs`): its next occurrence (None: no more) and status,
    how many runs started, and the runs to insert."""

    job_id: str
    next_run_at: datetime | None
    status: JobStatus
    started: int
    runs: list[RunRecord]


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs to list; None (or empty) means any."""

    product: str
    env: str
    status: int | None = None
    name: str = ""
    target_kind: str = ""
    declared: bool | None = None


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How an attempt ended: the run's next state (ended, or RETRYING at `attempt_at`) and what the target said.

    `job_status`: the job's state once the run ended, if it changes (a one-off job whose run failed)."""

    status: RunStatus
    ended_at: datetime
    attempt_at: datetime | None = None
    result: str = ""
    error_reason: str = ""
    error_message: str = ""
    process_id: str = ""
    job_status: JobStatus | None = None


class Store(WebhookState):
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
        for a new job, `product@due` with its first due moment in Unix seconds). Optional: polling covers it."""

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

    # -- jobs (written in store/jobs.py) ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_job(
        self, job: JobRecord, *, replace: bool, now: datetime, announce: bool = True
    ) -> tuple[JobRecord, bool]:
        """Store a new job; returns it and True. When the job's idempotency key is already used in its environment,
        or its name is held by an active job and `replace` is False, returns that other job and False instead; with
        `replace`, the job holding the name is cancelled first, unless it has the same (non-empty) request hash: it
        is returned as it is. `announce`: tell the other replicas' schedulers (Store.listen "jobs") of the new job;
        not needed when it falls due after their fallback poll looks again anyway."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobRecord | None:
        """A job by id."""

    @abc.abstractmethod
    async def active_job(self, product: str, env: str, name: str) -> JobRecord | None:
        """The active (scheduled or paused) job of that name."""

    @abc.abstractmethod
    async def list_jobs(self, where: JobFilter, *, after: tuple[datetime, str] | None, limit: int) -> list[JobRecord]:
        """Jobs matching `where`, newest first, strictly older than the `after` (created_at, job_id) cursor."""

    @abc.abstractmethod
    async def set_job_status(
        self, job_id: str, allowed: tuple[JobStatus, ...], status: JobStatus, now: datetime
    ) -> JobRecord | None:
        """Move a job in one of the `allowed` states to `status` (atomic); None when it is in another state.
        Cancelling also clears its next occurrence and cancels its runs that wait (pending or retrying)."""

    @abc.abstractmethod
    async def claim_due_jobs(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[JobRecord]:
        """Lease up to `limit` scheduled jobs whose next occurrence is due at `now` and that no live lease holds
        (`FOR UPDATE SKIP LOCKED` on PostgreSQL: replicas claim different jobs), with their `busy`/`queued` counts."""

    @abc.abstractmethod
    async def advance_jobs(self, owner: str, steps: list[JobStep]) -> set[str]:
        """`owner`'s steps of leased jobs, all in one transaction: each job's next occurrence and status, its
        `started` more runs counted, its `runs` inserted, its lease released. Returns the ids of the jobs stepped;
        a job `owner` no longer holds the lease of, or that is no longer scheduled, is left as it is (its runs are
        not inserted)."""

    @abc.abstractmethod
    async def insert_run(self, run: RunRecord) -> None:
        """Store a run (a TriggerNow's)."""

    @abc.abstractmethod
    async def claim_due_runs(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[RunRecord]:
        """Start up to `limit` runs due at `now` as `owner`'s (RUNNING, one more attempt, leased until
        `lease_until`): pending or retrying ones whose `attempt_at` came, buffered ones whose job has no run going,
        and running ones whose lease ran out (their runner died: `reclaimed` is set). Runs of paused or cancelled
        jobs wait."""

    @abc.abstractmethod
    async def renew_runs(self, owner: str, run_ids: list[str], lease_until: datetime) -> set[str]:
        """Extend `owner`'s leases of running runs; the ids of those it still held (and now holds until
        `lease_until`)."""

    @abc.abstractmethod
    async def end_run(self, run_id: str, owner: str, end: RunEnd) -> RunRecord | None:
        """Record how `owner`'s attempt ended (and the job's new state, if any); None when `owner` no longer holds
        the run (another replica reclaimed it)."""

    @abc.abstractmethod
    async def end_runs(self, owner: str, ends: list[tuple[str, RunEnd]]) -> dict[str, RunRecord]:
        """`end_run` for many runs (by id) at once; the ended runs by id (a run `owner` no longer held is absent)."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """A run by id."""

    @abc.abstractmethod
    async def list_runs(
        self, job_id: str, status: int | None, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[RunRecord]:
        """A job's runs, newest due first, strictly older than the `after` (due_at, run_id) cursor."""

    @abc.abstractmethod
    async def next_job_moment(self) -> datetime | None:
        """The earliest moment something of the jobs may fall due: a next occurrence, a retry, a lease's end."""

    @abc.abstractmethod
    async def purge_expired(self, now: datetime) -> int:
        """Delete expired cache entries, tokens and idempotency records; return how many."""
