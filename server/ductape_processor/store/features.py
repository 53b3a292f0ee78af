"""The store's feature runs: `SqlFeatureStore` adds them to the webhooks' store (and so to `SqlStore`) with the
statements of feature_statements.py; the back-ends derive from it.

A run's writes are fenced by its lease: the calls and state changes of a batch are recorded only for the runs the
writer still holds (locked while the batch is written, `FOR UPDATE` on PostgreSQL), so a replica that stalled past
its lease, or whose run was cancelled, writes nothing more of it. Runs whose lease ran out are claimed with the
shared claim statement (store/leases.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ductape_processor.store import feature_statements as sql
from ductape_processor.store.feature_records import (
    FEATURES_TOPIC,
    GOING,
    FeatureRunChange,
    FeatureRunFilter,
    FeatureRunRecord,
    FeatureRunStatus,
    FeatureStepRecord,
    FeatureWrites,
    Phase,
    StepStatus,
)
from ductape_processor.store.sql import IDS_PER_STATEMENT, Connection, Row, _named, _values
from ductape_processor.store.statements import SqlValue, Where
from ductape_processor.store.webhooks import SqlWebhookStore


class SqlFeatureStore(SqlWebhookStore):
    """`SqlWebhookStore` with the feature runs' operations."""

    # -- row mappers ------------------------------------------------------------------------------------------------

    def _feature_run(self, row: Row) -> FeatureRunRecord:
        times = dict.fromkeys(("created_at", "ended_at", "expires_at", "lease_until"), self._dialect.moment)
        return FeatureRunRecord(**_named(FeatureRunRecord, row, status=FeatureRunStatus, **times))

    def _feature_run_row(self, run: FeatureRunRecord) -> tuple[Any, ...]:
        times = dict.fromkeys(("created_at", "ended_at", "expires_at", "lease_until"), self._dialect.time)
        return _values(run, status=int, **times)

    def _feature_step(self, row: Row) -> FeatureStepRecord:
        times = dict.fromkeys(("started_at", "ended_at"), self._dialect.moment)
        return FeatureStepRecord(**_named(FeatureStepRecord, row, phase=Phase, status=StepStatus, **times))

    def _feature_step_row(self, step: FeatureStepRecord) -> tuple[SqlValue, ...]:
        times = dict.fromkeys(("started_at", "ended_at"), self._dialect.time)
        return _values(step, phase=int, status=int, **times)

    def _change_row(self, owner: str, change: FeatureRunChange) -> tuple[SqlValue, ...]:
        time = self._dialect.time
        ended = change.status not in GOING
        return (
            int(change.status),
            change.output,
            change.error_reason,
            change.error_message,
            change.failed_step,
            time(change.ended_at) if change.ended_at is not None else None,
            time(change.expires_at) if change.expires_at is not None else None,
            ended,
            ended,
            change.run_id,
            owner,
        )

    # -- writing ----------------------------------------------------------------------------------------------------

    async def insert_feature_run(self, run: FeatureRunRecord) -> tuple[FeatureRunRecord, bool]:
        values = self._feature_run_row(run)
        if not run.idempotency_key:
            await self._write(sql.INSERT_RUN, *values, retry=False)
            return run, True

        async def insert(conn: Connection) -> tuple[FeatureRunRecord, bool]:
            if await conn.execute(sql.INSERT_NEW_RUN, *values) == 1:
                return run, True
            row = await conn.fetchrow(sql.RUN_BY_KEY, run.product, run.env, run.idempotency_key)
            if row is None:  # the conflict was not the key's: the insert's own error
                await conn.execute(sql.INSERT_RUN, *values)
                return run, True
            return self._feature_run(row), False

        lock = f"features:{run.product}:{run.env}:{run.idempotency_key}"
        return await self._transaction(insert, lock=lock, retry=False)

    async def write_features(self, owner: str, writes: FeatureWrites) -> set[str]:
        touched = sorted(writes.touched)
        inserted = [self._feature_run_row(run) for run in writes.runs]

        async def write(conn: Connection) -> set[str]:
            if inserted:
                await conn.executemany(sql.INSERT_NEW_RUN, inserted)  # sent again after a lost commit: no-op
            held: set[str] = set()
            for start in range(0, len(touched), IDS_PER_STATEMENT):
                chunk = touched[start : start + IDS_PER_STATEMENT]
                statement = sql.held_runs(self._dialect.lock_rows, len(chunk))
                held.update(str(row[0]) for row in await conn.fetch(statement, owner, *chunk))
            rows = [self._feature_step_row(step) for step in writes.steps if step.run_id in held]
            if rows:
                await conn.executemany(sql.PUT_STEP, rows)
            ends = [self._change_row(owner, change) for change in writes.changes if change.run_id in held]
            if ends:
                await conn.executemany(sql.CHANGE_RUN, ends)
            return set(touched) - held

        return await self._transaction(write, retry=False)

    # -- reading ----------------------------------------------------------------------------------------------------

    async def get_feature_run(self, run_id: str) -> FeatureRunRecord | None:
        row = await self._reader.fetchrow(sql.RUN, run_id)
        return self._feature_run(row) if row else None

    async def feature_run_by_key(self, product: str, env: str, idempotency_key: str) -> FeatureRunRecord | None:
        row = await self._reader.fetchrow(sql.RUN_BY_KEY, product, env, idempotency_key)
        return self._feature_run(row) if row else None

    async def feature_steps(self, run_id: str) -> list[FeatureStepRecord]:
        return [self._feature_step(row) for row in await self._reader.fetch(sql.STEPS, run_id)]

    async def list_feature_runs(
        self, where: FeatureRunFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[FeatureRunRecord]:
        clause = Where("product = ? AND env = ?", where.product, where.env)
        clause.when("feature = ?", where.feature or None)
        clause.when("status = ?", where.status)
        rows = await self._newest_first(
            clause, (sql.RUN_COLUMNS, "feature_runs"), ("created_at", "run_id"), after, limit
        )
        return [self._feature_run(row) for row in rows]

    # -- leases -----------------------------------------------------------------------------------------------------

    async def claim_feature_runs(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[FeatureRunRecord]:
        time = self._dialect.time
        statement = sql.claim_runs(self._dialect)
        rows = await self._write_returning(statement, owner, time(lease_until), time(now), limit, retry=False)
        return [self._feature_run(row) for row in rows]

    async def renew_feature_runs(self, owner: str, run_ids: list[str], lease_until: datetime) -> set[str]:
        return await self._renewed(sql.renew_runs, owner, run_ids, lease_until)

    async def release_feature_runs(self, owner: str, now: datetime) -> int:
        async def release(conn: Connection) -> int:
            released = await conn.execute(sql.RELEASE_RUNS, self._dialect.time(now), owner)
            if released:
                await self._announce(conn, "", FEATURES_TOPIC)
            return released

        return await self._transaction(release)

    async def cancel_feature_run(self, run_id: str, now: datetime, expires_at: datetime) -> FeatureRunRecord | None:
        time = self._dialect.time

        async def cancel(conn: Connection) -> FeatureRunRecord | None:
            rows = await conn.fetch(sql.CANCEL_RUN, time(now), time(expires_at), run_id)
            if not rows:
                return None
            run = self._feature_run(rows[0])
            await self._announce(conn, run_id, FEATURES_TOPIC)
            return run

        return await self._transaction(cancel, retry=False)

    async def resume_feature_run(
        self, run_id: str, owner: str, lease_until: datetime
    ) -> tuple[FeatureRunRecord, list[FeatureStepRecord]] | None:
        async def resume(conn: Connection) -> tuple[FeatureRunRecord, list[FeatureStepRecord]] | None:
            rows = await conn.fetch(sql.RESUME_RUN, owner, self._dialect.time(lease_until), run_id)
            if not rows:
                return None
            await conn.execute(sql.DROP_FAILED_STEPS, run_id)
            steps = [self._feature_step(row) for row in await conn.fetch(sql.STEPS, run_id)]
            return self._feature_run(rows[0]), steps

        return await self._transaction(resume, retry=False)

    async def next_feature_moment(self) -> datetime | None:
        return await self._first_moment(sql.NEXT_MOMENT)

    async def purge_expired(self, now: datetime) -> int:
        at = self._dialect.time(now)
        purged = await super().purge_expired(now)
        await self._write(sql.PURGE_STEPS, at)
        return purged + await self._write(sql.PURGE_RUNS, at)
