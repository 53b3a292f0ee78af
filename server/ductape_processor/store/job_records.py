"""The store's job records and operations (written in store/jobs.py): scheduled jobs, their runs, and what a step
or an end of them writes. `Store` derives from `JobState`, so the runtime reaches them through the one store
interface."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Final

JOBS_TOPIC: Final = "jobs"
"""The change topic of jobs (`Store.listen`): a new, changed or finished job or run."""


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

    `busy` and `queued` (filled for `step_due_jobs`'s step only): its runs going or waiting for a retry, and its runs
    pending.
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
    """A due job moved past an occurrence (`Store.step_due_jobs`): its next occurrence (None: no more) and status,
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

    def ended(self, run: RunRecord) -> RunRecord:
        """`run` (as its owner held it) once this end is recorded (`Store.end_runs`): no longer leased."""
        # Built field by field: dataclasses.replace reads the fields anew on every call, for every run that ends.
        return RunRecord(
            run_id=run.run_id,
            job_id=run.job_id,
            product=run.product,
            env=run.env,
            trigger=run.trigger,
            status=self.status,
            due_at=run.due_at,
            attempt_at=self.attempt_at,
            attempts=run.attempts,
            started_at=run.started_at,
            ended_at=self.ended_at if self.status != RunStatus.RETRYING else None,
            owner=None,
            lease_until=None,
            reclaimed=run.reclaimed,
            result=self.result,
            error_reason=self.error_reason,
            error_message=self.error_message,
            process_id=self.process_id,
        )


class JobState(abc.ABC):
    """The job operations of the store."""

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
    async def job_by_key(self, product: str, env: str, idempotency_key: str) -> JobRecord | None:
        """The job its idempotency key scheduled in the environment; None for the empty key (no key)."""

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
    async def step_due_jobs(self, now: datetime, limit: int, step: Callable[[JobRecord], JobStep]) -> list[JobStep]:
        """Step up to `limit` scheduled jobs whose next occurrence is due at `now` past it, in one transaction: the
        jobs are taken with their `busy`/`queued` counts and held until it ends (`FOR UPDATE SKIP LOCKED` on
        PostgreSQL: replicas step different jobs, and a replica that dies midway ends its transaction, which frees
        them), `step(job)` (no waiting in it) says each one's next occurrence, status, `started` more runs counted
        and the runs to insert, and all that is written. Returns the steps written, in the order of the jobs' due
        moments."""

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
    async def end_runs(self, owner: str, ends: list[tuple[str, RunEnd]]) -> set[str]:
        """Record how `owner`'s attempts of runs (by id) ended (as `RunEnd.ended` says), and their jobs' new states if
        any; the ids of the runs ended (one `owner` no longer held, another replica having reclaimed it, is left as
        it is)."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """A run by id."""

    @abc.abstractmethod
    async def list_runs(
        self, job_id: str, status: int | None, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[RunRecord]:
        """A job's runs, newest due first, strictly older than the `after` (due_at, run_id) cursor."""

    @abc.abstractmethod
    async def next_job_moments(self) -> tuple[datetime | None, datetime | None]:
        """The earliest moments something of the jobs falls due: a scheduled job's next occurrence, and a run's
        (a pending or retrying attempt of an active job, a running run's lease's end)."""
