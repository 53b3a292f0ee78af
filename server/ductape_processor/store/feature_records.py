"""The store's feature runs and operations (written in store/features.py): runs of features, each event's recorded
call and compensation, and the leases runs are claimed with. `Store` derives from `FeatureState`, so the runtime
reaches them through the one store interface."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Final

FEATURES_TOPIC: Final = "features"
"""The change topic of feature runs (`Store.listen`): the payload is a run whose state another replica changed
(cancelled)."""


class FeatureRunStatus(IntEnum):
    """Where a run stands; the values are the API's `FeatureRunStatus` (checked by a test)."""

    RUNNING = 1
    COMPLETED = 2
    FAILED = 3
    ROLLED_BACK = 4
    CANCELLED = 5
    ROLLING_BACK = 6
    """A step failed; the compensations are running (a run taken over in this state goes on rolling back)."""


GOING: Final = (FeatureRunStatus.RUNNING, FeatureRunStatus.ROLLING_BACK)
"""The states of a run that a replica executes (under a lease)."""


class StepStatus(IntEnum):
    """Where one call of a run stands; the values are the API's `FeatureStepStatus` (checked by a test)."""

    PENDING = 1
    """Not called yet, or between two runs of a loop (`iteration` runs done)."""
    RUNNING = 2
    """Called, and possibly in flight: recorded before a call that is not safe to repeat."""
    COMPLETED = 3
    FAILED = 4
    SKIPPED = 5


class Phase(IntEnum):
    """Which call of an event a step record is: the event's own, or its compensation."""

    CALL = 0
    ROLLBACK = 1


@dataclass(frozen=True, slots=True)
class FeatureRunRecord:
    """One run of a feature: what it runs (feature, pinned version, input as JSON, session), where it stands, and
    the replica executing it (`owner`, under a lease until `lease_until`)."""

    run_id: str
    product: str
    env: str
    feature: str
    version: int
    status: FeatureRunStatus
    input: str
    session_tag: str
    session_token: str
    idempotency_key: str
    request_hash: str
    output: str
    error_reason: str
    error_message: str
    failed_step: str
    replay_of: str
    parent_run: str
    takeovers: int
    created_at: datetime
    ended_at: datetime | None
    expires_at: datetime | None
    owner: str | None
    lease_until: datetime | None


@dataclass(frozen=True, slots=True)
class FeatureStepRecord:
    """One call of a run as recorded: an event's (phase CALL) or its compensation's (ROLLBACK). `position` orders
    the completed calls of a run by completion (compensations run in reverse); `output` is JSON."""

    run_id: str
    sequence: str
    event: str
    phase: Phase
    status: StepStatus
    attempts: int
    iteration: int
    position: int
    started_at: datetime | None
    ended_at: datetime | None
    output: str
    error_reason: str
    error_message: str

    @property
    def key(self) -> tuple[str, str, Phase]:
        """Which call of the run it records."""
        return (self.sequence, self.event, self.phase)


@dataclass(frozen=True, slots=True)
class FeatureRunChange:
    """A run's new state: ended (`ended_at`, `expires_at` set: the lease is released), or rolling back."""

    run_id: str
    status: FeatureRunStatus
    output: str = ""
    error_reason: str = ""
    error_message: str = ""
    failed_step: str = ""
    ended_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FeatureWrites:
    """Records of feature runs written together (`FeatureState.write_features`): new runs, calls, run changes."""

    runs: tuple[FeatureRunRecord, ...] = ()
    steps: tuple[FeatureStepRecord, ...] = ()
    changes: tuple[FeatureRunChange, ...] = ()

    @property
    def size(self) -> int:
        """How many records."""
        return len(self.runs) + len(self.steps) + len(self.changes)

    @property
    def touched(self) -> set[str]:
        """The runs whose calls or state these records change: the ones their writer must still hold."""
        return {step.run_id for step in self.steps} | {change.run_id for change in self.changes}

    @classmethod
    def joined(cls, parts: Sequence[FeatureWrites]) -> FeatureWrites:
        """All the records of `parts`, in their order."""
        return cls(
            tuple(run for part in parts for run in part.runs),
            tuple(step for part in parts for step in part.steps),
            tuple(change for part in parts for change in part.changes),
        )


@dataclass(frozen=True, slots=True)
class FeatureRunFilter:
    """Which runs to list; empty (or None) means any."""

    product: str
    env: str
    feature: str = ""
    status: int | None = None


class FeatureState(abc.ABC):
    """The feature operations of the store."""

    @abc.abstractmethod
    async def insert_feature_run(self, run: FeatureRunRecord) -> tuple[FeatureRunRecord, bool]:
        """Store a new run (held by its `owner`); returns it and True. When its idempotency key was used in its
        environment, returns that run and False, storing nothing."""

    @abc.abstractmethod
    async def write_features(self, owner: str, writes: FeatureWrites) -> set[str]:
        """In one transaction: insert the `runs` (new, without idempotency keys), then, for the runs `owner` still
        holds (running or rolling back, its lease), record the `steps` (inserted or replacing the same call's record)
        and the `changes`. Returns the ids of the runs among the steps and changes that `owner` no longer holds
        (cancelled, or taken over by another replica): nothing of theirs was written."""

    @abc.abstractmethod
    async def get_feature_run(self, run_id: str) -> FeatureRunRecord | None:
        """A run by id."""

    @abc.abstractmethod
    async def feature_run_by_key(self, product: str, env: str, idempotency_key: str) -> FeatureRunRecord | None:
        """The run its idempotency key started in the environment."""

    @abc.abstractmethod
    async def feature_steps(self, run_id: str) -> list[FeatureStepRecord]:
        """A run's recorded calls."""

    @abc.abstractmethod
    async def list_feature_runs(
        self, where: FeatureRunFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[FeatureRunRecord]:
        """Runs matching `where`, newest first, strictly older than the `after` (created_at, run_id) cursor."""

    @abc.abstractmethod
    async def claim_feature_runs(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[FeatureRunRecord]:
        """Lease up to `limit` running (or rolling back) runs whose lease ran out at `now` (their replica died or
        stopped) to `owner`, counting a take-over each (`FOR UPDATE SKIP LOCKED` on PostgreSQL)."""

    @abc.abstractmethod
    async def renew_feature_runs(self, owner: str, run_ids: list[str], lease_until: datetime) -> set[str]:
        """Extend `owner`'s leases of going runs; the ids of those it still held."""

    @abc.abstractmethod
    async def release_feature_runs(self, owner: str, now: datetime) -> int:
        """End `owner`'s leases at `now` (it stops; announced on the "features" topic): another replica takes its
        going runs over at once. Returns how many."""

    @abc.abstractmethod
    async def cancel_feature_run(self, run_id: str, now: datetime, expires_at: datetime) -> FeatureRunRecord | None:
        """Cancel a going run (its lease released, announced on the "features" topic); None when it is not going."""

    @abc.abstractmethod
    async def resume_feature_run(
        self, run_id: str, owner: str, lease_until: datetime
    ) -> tuple[FeatureRunRecord, list[FeatureStepRecord]] | None:
        """Make a failed or cancelled run that rolled nothing back going again, held by `owner`: its failed calls'
        records are dropped (they run again). Returns the run and its remaining records; None when it is not in such
        a state."""

    @abc.abstractmethod
    async def next_feature_moment(self) -> datetime | None:
        """The earliest lease of a going run to run out."""
