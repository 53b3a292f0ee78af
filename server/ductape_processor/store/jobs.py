"""The store's jobs and runs: `SqlJobStore` adds them to `SqlStore` with the shared statements (statements.py).

Due jobs and runs are claimed with the statements of store/leases.py: a job is held by the transaction that steps it
past its due occurrence (PostgreSQL locks it with `FOR UPDATE ... SKIP LOCKED`: replicas step different jobs, none
waits for another; SQLite runs one writer at a time), a run is leased while its target is called. Every change
another replica may be waiting for is announced on the "jobs" topic (NOTIFY on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ductape_processor.store import job_statements as sql
from ductape_processor.store.job_records import (
    JOBS_TOPIC,
    JobFilter,
    JobRecord,
    JobStatus,
    JobStep,
    RunEnd,
    RunRecord,
    RunStatus,
)
from ductape_processor.store.sql import Connection, Row, SqlStore, _named, _values
from ductape_processor.store.statements import SqlValue, Where

_JOB_FIELDS = 13
"""The columns of JOB_COLUMNS: a JobRecord's fields before `busy` and `queued`."""
_INSERT_ATTEMPTS = 3
"""How many times a locked Schedule reads who holds a name or key again when an unlocked one took it meanwhile."""


class SqlJobStore(SqlStore):
    """`SqlStore` with the jobs' operations; the back-ends derive from this."""

    # -- row mappers ------------------------------------------------------------------------------------------------

    def _job(self, row: Row) -> JobRecord:
        """A job from its columns (JOB_COLUMNS), and the two counts a claim adds after them."""
        moment = self._dialect.moment
        times = dict.fromkeys(("next_run_at", "created_at"), moment)
        counts = (int(row[-2]), int(row[-1])) if len(row) > _JOB_FIELDS else (0, 0)
        return JobRecord(**_named(JobRecord, (*row[:_JOB_FIELDS], *counts), status=JobStatus, declared=bool, **times))

    def _run(self, row: Row) -> RunRecord:
        moment = self._dialect.moment
        times = dict.fromkeys(("due_at", "attempt_at", "started_at", "ended_at", "lease_until"), moment)
        return RunRecord(**_named(RunRecord, row, status=RunStatus, reclaimed=bool, **times))

    def _run_row(self, run: RunRecord) -> tuple[Any, ...]:
        time = self._dialect.time
        times = dict.fromkeys(("due_at", "attempt_at", "started_at", "ended_at", "lease_until"), time)
        return _values(run, status=int, **times)

    async def _job_changed(self, conn: Connection, product: str) -> None:
        await self._announce(conn, product, JOBS_TOPIC)

    # -- jobs -------------------------------------------------------------------------------------------------------

    async def insert_job(
        self, job: JobRecord, *, replace: bool, now: datetime, announce: bool = True
    ) -> tuple[JobRecord, bool]:
        time = self._dialect.time
        values = _values(job, status=int, next_run_at=time, created_at=time)[:_JOB_FIELDS]
        # Most jobs take a name and a key nobody holds: one statement, and no lock.
        if await self._insert_new_job(job, values, announce=announce):
            return job, True

        async def insert(conn: Connection) -> tuple[JobRecord, bool]:
            for _ in range(_INSERT_ATTEMPTS):
                if job.idempotency_key:
                    row = await conn.fetchrow(sql.JOB_BY_KEY, job.product, job.env, job.idempotency_key)
                    if row is not None:
                        return self._job(row), False
                if job.name:
                    row = await conn.fetchrow(sql.ACTIVE_JOB, job.product, job.env, job.name)
                    if row is not None:
                        holder = self._job(row)
                        if not replace or (job.request_hash and holder.request_hash == job.request_hash):
                            return holder, False  # taken, or (replacing) already the same job
                        await self._cancel(conn, holder, now)
                if await conn.execute(sql.INSERT_NEW_JOB, *values) == 1:
                    await self._job_changed(conn, job.product)
                    return job, True
                # A Schedule that took no lock (the path above) took the name or key after the reads: read again.
            await conn.execute(sql.INSERT_JOB, *values)  # still taken: the unique index's error
            return job, True

        return await self._transaction(insert, lock=f"jobs:{job.product}:{job.env}", retry=False)

    async def _insert_new_job(self, job: JobRecord, values: tuple[Any, ...], *, announce: bool) -> bool:
        """Insert a job's row unless a unique index holds its name or key (then False); announce it if asked."""
        if not announce:
            return await self._write(sql.INSERT_NEW_JOB, *values, retry=False) == 1

        async def insert(conn: Connection) -> bool:
            if await conn.execute(sql.INSERT_NEW_JOB, *values) != 1:
                return False
            await self._job_changed(conn, job.product)
            return True

        return await self._transaction(insert, retry=False)

    async def _cancel(self, conn: Connection, job: JobRecord, now: datetime) -> bool:
        if await conn.execute(sql.CANCEL_JOB, job.job_id, int(job.status)) != 1:
            return False
        await conn.execute(sql.CANCEL_WAITING_RUNS, self._dialect.time(now), job.job_id)
        return True

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._reader.fetchrow(sql.JOB, job_id)
        return self._job(row) if row else None

    async def active_job(self, product: str, env: str, name: str) -> JobRecord | None:
        row = await self._reader.fetchrow(sql.ACTIVE_JOB, product, env, name)
        return self._job(row) if row else None

    async def job_by_key(self, product: str, env: str, idempotency_key: str) -> JobRecord | None:
        if not idempotency_key:
            return None  # the jobs scheduled without a key share the empty one
        row = await self._reader.fetchrow(sql.JOB_BY_KEY, product, env, idempotency_key)
        return self._job(row) if row else None

    async def list_jobs(self, where: JobFilter, *, after: tuple[datetime, str] | None, limit: int) -> list[JobRecord]:
        clause = Where("product = ? AND env = ?", where.product, where.env)
        clause.when("status = ?", where.status)
        clause.when("name = ?", where.name or None)
        clause.when("target_kind = ?", where.target_kind or None)
        clause.when("declared = ?", where.declared)
        rows = await self._newest_first(clause, (sql.JOB_COLUMNS, "jobs"), ("created_at", "job_id"), after, limit)
        return [self._job(row) for row in rows]

    async def set_job_status(
        self, job_id: str, allowed: tuple[JobStatus, ...], status: JobStatus, now: datetime
    ) -> JobRecord | None:
        async def change(conn: Connection) -> JobRecord | None:
            row = await conn.fetchrow(sql.JOB, job_id)
            if row is None:
                return None
            job = self._job(row)
            if job.status not in allowed:
                return None
            if status == JobStatus.CANCELLED:
                changed = await self._cancel(conn, job, now)
            else:
                changed = await conn.execute(sql.SET_JOB_STATUS, int(status), job_id, int(job.status)) == 1
            if not changed:
                return None
            await self._job_changed(conn, job.product)
            after = await conn.fetchrow(sql.JOB, job_id)
            return self._job(after) if after else None

        return await self._transaction(change)

    async def step_due_jobs(self, now: datetime, limit: int, step: Callable[[JobRecord], JobStep]) -> list[JobStep]:
        statement = sql.due_jobs(self._dialect)

        async def advance(conn: Connection) -> list[JobStep]:
            steps = [step(self._job(row)) for row in await conn.fetch(statement, self._dialect.time(now), limit)]
            if steps:
                await self._write_steps(conn, steps)
            return steps

        return await self._transaction(advance, retry=False)

    async def _write_steps(self, conn: Connection, steps: list[JobStep]) -> None:
        """Write the steps of jobs `conn`'s transaction holds: their next occurrences and states, their runs."""
        time = self._dialect.time
        moves: list[tuple[SqlValue, ...]] = [
            (time(s.next_run_at) if s.next_run_at else None, int(s.status), s.started, s.job_id) for s in steps
        ]
        await conn.executemany(sql.ADVANCE_JOB, moves)
        runs = [self._run_row(run) for step in steps for run in step.runs]
        if runs:
            # No announcement: a run inserted RUNNING is this replica's, and a buffered (pending) one is claimed by the
            # replica whose going run ends (it looks again then).
            await conn.executemany(sql.INSERT_RUN, runs)

    async def insert_run(self, run: RunRecord) -> None:
        async def insert(conn: Connection) -> None:
            await conn.execute(sql.INSERT_RUN, *self._run_row(run))
            await self._job_changed(conn, run.product)

        await self._transaction(insert, retry=False)

    async def claim_due_runs(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[RunRecord]:
        time = self._dialect.time
        at = time(now)
        statement = sql.claim_due_runs(self._dialect)
        rows = await self._write_returning(statement, owner, time(lease_until), at, at, at, limit, retry=False)
        return [self._run(row) for row in rows]

    async def renew_runs(self, owner: str, run_ids: list[str], lease_until: datetime) -> set[str]:
        return await self._renewed(sql.renew_runs, owner, run_ids, lease_until)

    async def end_runs(self, owner: str, ends: list[tuple[str, RunEnd]]) -> set[str]:
        ended: set[str] = set()
        for run_id, end in ends:
            if await self._end_run(run_id, owner, end):
                ended.add(run_id)
        return ended

    async def _end_run(self, run_id: str, owner: str, end: RunEnd) -> bool:
        """Record how `owner`'s attempt of the run ended (and its job's new state, if any); False when `owner` no
        longer held the run."""
        time = self._dialect.time
        values = (
            int(end.status),
            time(end.ended_at) if end.status != RunStatus.RETRYING else None,
            time(end.attempt_at) if end.attempt_at is not None else None,
            end.result,
            end.error_reason,
            end.error_message,
            end.process_id,
            run_id,
            owner,
        )
        job_status = end.job_status
        if job_status is None:
            # One statement, not announced: what an end makes due (a buffered run, a retry) is claimed by this
            # replica, which looks again once a run ends.
            return bool(await self._write_returning(sql.END_RUN, *values, retry=False))

        async def finish(conn: Connection) -> bool:
            rows = await conn.fetch(sql.END_RUN, *values)
            if not rows:
                return False
            job_id, product = rows[0]
            await conn.execute(sql.END_JOB, int(job_status), str(job_id))
            await self._job_changed(conn, str(product))
            return True

        return await self._transaction(finish, retry=False)

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._reader.fetchrow(sql.RUN, run_id)
        return self._run(row) if row else None

    async def list_runs(
        self, job_id: str, status: int | None, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[RunRecord]:
        clause = Where("job_id = ?", job_id)
        clause.when("status = ?", status)
        rows = await self._newest_first(clause, (sql.RUN_COLUMNS, "job_runs"), ("due_at", "run_id"), after, limit)
        return [self._run(row) for row in rows]

    async def next_job_moments(self) -> tuple[datetime | None, datetime | None]:
        row = await self._reader.fetchrow(sql.NEXT_JOB_MOMENTS)
        if row is None:
            return None, None
        occurrence, run = row
        moment = self._dialect.moment
        return (moment(occurrence) if occurrence is not None else None, moment(run) if run is not None else None)
