"""The values of jobs: what a caller schedules (`JobSpec`: target, timing, repeat, retries, overlap), and the states
of jobs and runs. The store keeps them (`JobRecord`, `RunRecord` in store/base.py); this module says what they mean."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Any, Final

from ductape_processor.runtime.policies.retry import Backoff

# Re-exported: the API layer reads the states and records through the runtime, never from the store.
from ductape_processor.store.job_records import JobRecord as JobRecord
from ductape_processor.store.job_records import JobStatus as JobStatus
from ductape_processor.store.job_records import RunRecord as RunRecord
from ductape_processor.store.job_records import RunStatus as RunStatus

DEFAULT_CATCH_UP: Final = timedelta(minutes=1)
"""How late an occurrence may still start when the schedule asks for no window: one due earlier is skipped."""
MIN_EVERY: Final = timedelta(seconds=1)
"""The shortest `every` interval."""
MAX_SPAN: Final = timedelta(days=36_525)
"""The longest of a job's spans, 100 years: how far from now its start is (`start_at`, `delay`), and its `every`,
retry delays and catch-up window. A job's times are sums of these, and a datetime ends in year 9999: a job of
10,000-year spans would fail the scheduler's arithmetic, not the caller's call."""
MAX_RETRIES: Final = 100
"""The most retries a job's run makes (as the manifest's `retry.max_retries`)."""


class TargetKind(StrEnum):
    """The kinds of resource a job runs; the values are what the store and the manifest say."""

    ACTION = "action"
    DATABASE_ACTION = "database_action"
    NOTIFICATION = "notification"
    STORAGE = "storage"
    PUBLISH = "publish"
    FEATURE = "feature"


class Overlap(StrEnum):
    """What an occurrence does while a run of its job is going (or waiting for a retry)."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    ALLOW = "allow"


ACTIVE: Final = (JobStatus.SCHEDULED, JobStatus.PAUSED)
"""The states in which a job holds its name and may still run."""


ENDED: Final = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.SKIPPED, RunStatus.CANCELLED)
"""The states a run does not leave."""


class RunTrigger(IntEnum):
    """Why a run exists; the values are the API's `RunTrigger`."""

    SCHEDULE = 1
    MANUAL = 2


@dataclass(frozen=True, slots=True)
class Target:
    """What a job runs: a resource of the product, its input, and the session its runs present."""

    kind: TargetKind
    address: str
    input: dict[str, Any] = field(default_factory=dict)
    session: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Repeat:
    """A job's repeat: a cron expression (in `timezone`) or a fixed interval, bounded by `limit` and `end_at`."""

    cron: str = ""
    every: timedelta | None = None
    timezone: str = "UTC"
    limit: int = 0
    end_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class JobRetry:
    """How a failed run is tried again (Ductape's defaults: no retry, 1 s first delay, x2, 5 min cap, jitter)."""

    max_retries: int = 0
    initial_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(minutes=5)
    jitter: bool = True

    @property
    def backoff(self) -> Backoff:
        """The pauses between attempts, as every other retry of the processor computes them."""
        return Backoff(self.initial_delay.total_seconds(), self.max_delay.total_seconds(), jitter=self.jitter)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything a job is scheduled with, as kept with it (JSON in the store)."""

    target: Target
    repeat: Repeat | None = None
    retry: JobRetry = JobRetry()
    overlap: Overlap = Overlap.SKIP
    catch_up: timedelta = DEFAULT_CATCH_UP


@dataclass(frozen=True, slots=True)
class ScheduleCall:
    """What a caller asks JobService.Schedule for."""

    product: str
    env: str
    spec: JobSpec
    name: str = ""
    start_at: datetime | None = None
    delay: timedelta | None = None
    replace: bool = False
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs JobService.List returns; None (or empty) means any."""

    product: str
    env: str
    status: JobStatus | None = None
    name: str = ""
    kind: TargetKind | None = None
