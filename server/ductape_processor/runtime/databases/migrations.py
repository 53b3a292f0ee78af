"""MigrationRunner: applies, rolls back, reports and plans a database's migrations, in the target database itself.

Applied migrations are recorded in `ductape_migrations` (scope = product/database, tag, checksum of the `up`
statements, when, how long, state) in the target database, so every replica, and any tool, sees the same history.
A run holds a database-wide lock for its whole length (`DatabaseSession.locked`: a PostgreSQL session advisory
lock, MySQL `GET_LOCK`, an SQLite write transaction) and reads the record again once it holds it, so two replicas
migrating at once apply each migration exactly once. Each migration runs in a transaction with its record (on
SQLite a savepoint inside the run's write transaction); MySQL commits DDL as it goes, so there a failure part-way
is recorded as `failed`, which blocks later runs until the migration is rolled back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from ductape_processor.adapters.databases.base import DatabaseAdapter, DatabaseFailure, DatabaseSession, Statement
from ductape_processor.errors import FailedPrecondition, InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.databases.errors import database_error
from ductape_processor.runtime.databases.pools import DatabasePools, named_database
from ductape_processor.runtime.databases.sql import Dialect, compile_sql
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.registry.databases import Database, Migration
from ductape_processor.runtime.registry.registry import Registry, Resolved

TABLE: Final = "ductape_migrations"
LOCK_WAIT_S: Final = 60.0
"""The longest a run waits for another replica's run to finish, when the caller set no shorter deadline."""
_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (scope VARCHAR(200) NOT NULL, tag VARCHAR(64) NOT NULL, "
    "checksum VARCHAR(64) NOT NULL, applied_at VARCHAR(40) NOT NULL, duration_ms INTEGER NOT NULL, "
    "state VARCHAR(16) NOT NULL, PRIMARY KEY (scope, tag))"
)
_SELECT = f"SELECT tag, checksum, applied_at, duration_ms, state FROM {TABLE} WHERE scope = :scope"  # noqa: S608
_INSERT = (
    f"INSERT INTO {TABLE} (scope, tag, checksum, applied_at, duration_ms, state) "  # noqa: S608
    "VALUES (:scope, :tag, :checksum, :applied_at, :duration_ms, :state)"
)
_DELETE = f"DELETE FROM {TABLE} WHERE scope = :scope AND tag = :tag"  # noqa: S608
State = Literal["applied", "pending", "drifted", "failed"]


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """A database of a product in one environment (at the pinned version, or `version`)."""

    product: str
    env: str
    database: str
    version: int | None = None


@dataclass(frozen=True, slots=True)
class MigrationRun:
    """A migration that ran."""

    tag: str
    checksum: str
    duration_ms: int
    statements: int


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """Where one migration stands."""

    tag: str
    state: State
    checksum_applied: str = ""
    checksum_now: str = ""
    applied_at: str = ""
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class _Recorded:
    tag: str
    checksum: str
    applied_at: str
    duration_ms: int
    state: str


def checksum(migration: Migration) -> str:
    """SHA-256 (hex) of a migration's `up` statements: a changed text after it was applied is drift."""
    return hashlib.sha256(json.dumps(migration.up, ensure_ascii=False).encode()).hexdigest()


@dataclass(slots=True)
class _Target:
    resolved: Resolved
    database: Database
    dialect: Dialect
    adapter: DatabaseAdapter
    scope: str
    timeout_s: float


class MigrationRunner:
    """Runs migrations. One instance per processor; safe for concurrent calls (the database lock serialises runs)."""

    def __init__(self, registry: Registry, pools: DatabasePools) -> None:
        self._registry = registry
        self._pools = pools

    # -- the calls --------------------------------------------------------------------------------------------

    async def run(self, target: MigrationTarget, tag: str, deadline: Deadline) -> list[MigrationRun]:
        """Apply the pending migrations (up to and including `tag`, when given)."""
        t = await self._target(target)
        wanted = self._up_to(t.database, tag)

        def pending(recorded: dict[str, _Recorded]) -> list[Migration]:
            failed = [r.tag for r in recorded.values() if r.state == "failed"]
            if failed:
                raise FailedPrecondition(
                    f"migration {failed[0]!r} failed part-way earlier: roll it back (or repair the schema and roll "
                    "it back) before running migrations",
                    reason=Reason.MIGRATION_FAILED,
                    metadata={"database": t.database.tag, "migration": failed[0]},
                )
            return [m for m in wanted if m.tag not in recorded]

        return await self._locked(t, deadline, pending, self._apply)

    async def rollback(self, target: MigrationTarget, steps: int, tag: str, deadline: Deadline) -> list[MigrationRun]:
        """Revert the newest applied migrations: `steps` of them, or back to and including `tag`."""
        t = await self._target(target)
        return await self._locked(
            t, deadline, lambda recorded: self._to_revert(t.database, recorded, steps, tag), self._revert
        )

    async def _locked(
        self,
        t: _Target,
        deadline: Deadline,
        chosen: Callable[[dict[str, _Recorded]], list[Migration]],
        step: Callable[[DatabaseSession, _Target, Migration, Deadline], Awaitable[MigrationRun]],
    ) -> list[MigrationRun]:
        """Under the database's lock: read the record, then `step` each migration `chosen` picks from it, stopping at
        the first that fails. The lock's block then ends normally (on SQLite it is the run's transaction), so the
        migrations before the failed one are kept; its error is raised after."""
        done: list[MigrationRun] = []
        failed: ProcessorError | None = None
        try:
            async with (
                t.adapter.session(deadline.remaining()) as session,
                session.locked(t.scope, deadline.bound(LOCK_WAIT_S)),
            ):
                for migration in chosen(await self._recorded(session, t, deadline)):
                    try:
                        done.append(await step(session, t, migration, deadline))
                    except _Failed as exc:
                        failed = exc.error
                        break
        except DatabaseFailure as exc:
            raise database_error(exc, t.database.tag, "migrations") from None
        if failed is not None:
            raise failed
        return done

    async def status(self, target: MigrationTarget, deadline: Deadline) -> list[MigrationStatus]:
        """Every migration of the manifest, then recorded ones it no longer lists."""
        t = await self._target(target)
        recorded = await self._read_record(t, deadline)
        found: list[MigrationStatus] = []
        for migration in t.database.migrations:
            now = checksum(migration)
            record = recorded.pop(migration.tag, None)
            if record is None:
                found.append(MigrationStatus(migration.tag, "pending", checksum_now=now))
                continue
            state: State = "failed" if record.state == "failed" else "applied" if record.checksum == now else "drifted"
            found.append(
                MigrationStatus(migration.tag, state, record.checksum, now, record.applied_at, record.duration_ms)
            )
        for record in recorded.values():
            state = "failed" if record.state == "failed" else "applied"
            found.append(MigrationStatus(record.tag, state, record.checksum, "", record.applied_at, record.duration_ms))
        return found

    async def plan(
        self, target: MigrationTarget, tag: str, rollback: bool, steps: int, deadline: Deadline
    ) -> list[tuple[str, list[str]]]:
        """The migrations a Run (or Rollback) would run now, with their statements; nothing is applied."""
        t = await self._target(target)
        recorded = await self._read_record(t, deadline)
        if rollback:
            return [(m.tag, list(m.down)) for m in self._to_revert(t.database, recorded, steps, tag)]
        return [(m.tag, list(m.up)) for m in self._up_to(t.database, tag) if m.tag not in recorded]

    # -- steps ------------------------------------------------------------------------------------------------

    async def _target(self, target: MigrationTarget) -> _Target:
        resolved = await self._registry.resolve(target.product, target.env, target.version)
        database = named_database(resolved, target.database)
        try:
            adapter = self._pools.adapter(resolved, database)
        except DatabaseFailure as exc:
            raise database_error(exc, database.tag, "migrations") from None
        env = database.envs[resolved.env.slug]
        scope = f"{resolved.product}/{database.tag}"
        return _Target(resolved, database, env.type, adapter, scope, env.statement_timeout.total_seconds())

    @staticmethod
    def _up_to(database: Database, tag: str) -> list[Migration]:
        tags = [m.tag for m in database.migrations]
        if tag and tag not in tags:
            raise NotFound(
                f"database {database.tag!r} has no migration {tag!r}",
                reason=Reason.MIGRATION_NOT_FOUND,
                metadata={"database": database.tag, "migration": tag},
            )
        return list(database.migrations[: tags.index(tag) + 1] if tag else database.migrations)

    @staticmethod
    def _to_revert(database: Database, recorded: dict[str, _Recorded], steps: int, tag: str) -> list[Migration]:
        if steps < 0:
            raise InvalidArgument.field("steps", "must not be negative")
        known = {m.tag: m for m in database.migrations}
        applied = [m for m in database.migrations if m.tag in recorded]
        if tag:
            if tag not in recorded:
                raise NotFound(
                    f"migration {tag!r} is not applied to database {database.tag!r}",
                    reason=Reason.MIGRATION_NOT_FOUND,
                    metadata={"database": database.tag, "migration": tag},
                )
            if tag not in known:
                raise FailedPrecondition(
                    f"migration {tag!r} is recorded but the manifest no longer lists it: its down statements are "
                    "unknown",
                    reason=Reason.MIGRATION_FAILED,
                    metadata={"database": database.tag, "migration": tag},
                )
            chosen = list(reversed(applied[[m.tag for m in applied].index(tag) :]))
        else:
            chosen = list(reversed(applied))[: steps or 1]
        for migration in chosen:
            if not migration.down:
                raise FailedPrecondition(
                    f"migration {migration.tag!r} has no down statements: it cannot be rolled back",
                    reason=Reason.MIGRATION_FAILED,
                    metadata={"database": database.tag, "migration": migration.tag},
                )
        return chosen

    def _statement(self, t: _Target, sql: str, **values: object) -> Statement:
        compiled = compile_sql(sql, t.dialect)
        return Statement(compiled.text, [values[n] for n in compiled.names], compiled.returns_rows, compiled.names)

    async def _read_record(self, t: _Target, deadline: Deadline) -> dict[str, _Recorded]:
        """The record, read without the lock (Status and Plan change nothing)."""
        try:
            async with t.adapter.session(deadline.remaining()) as session:
                return await self._recorded(session, t, deadline)
        except DatabaseFailure as exc:
            raise database_error(exc, t.database.tag, "migrations") from None

    async def _recorded(self, session: DatabaseSession, t: _Target, deadline: Deadline) -> dict[str, _Recorded]:
        await session.run(self._statement(t, _CREATE), deadline.bound(t.timeout_s))
        outcome = await session.run(self._statement(t, _SELECT, scope=t.scope), deadline.bound(t.timeout_s))
        return {
            str(row[0]): _Recorded(str(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4]))
            for row in outcome.rows
        }

    async def _run_all(
        self, session: DatabaseSession, t: _Target, statements: Sequence[str], deadline: Deadline
    ) -> int:
        started = time.monotonic()
        for sql in statements:
            await session.run(self._statement(t, sql), deadline.bound(t.timeout_s))
        return int((time.monotonic() - started) * 1000)

    async def _apply(
        self, session: DatabaseSession, t: _Target, migration: Migration, deadline: Deadline
    ) -> MigrationRun:
        digest = checksum(migration)
        record = {"scope": t.scope, "tag": migration.tag, "checksum": digest}
        try:
            async with session.transaction():
                took = await self._run_all(session, t, migration.up, deadline)
                now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                insert = self._statement(t, _INSERT, **record, applied_at=now, duration_ms=took, state="applied")
                await session.run(insert, deadline.bound(t.timeout_s))
        except DatabaseFailure as exc:
            if t.dialect == "mysql":  # its DDL committed as it went: say so in the record, for Status
                now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                insert = self._statement(t, _INSERT, **record, applied_at=now, duration_ms=0, state="failed")
                await session.run(insert, deadline.bound(t.timeout_s))
            raise self._failed(t, migration, exc) from None
        return MigrationRun(migration.tag, digest, took, len(migration.up))

    async def _revert(
        self, session: DatabaseSession, t: _Target, migration: Migration, deadline: Deadline
    ) -> MigrationRun:
        try:
            async with session.transaction():
                took = await self._run_all(session, t, migration.down, deadline)
                await session.run(
                    self._statement(t, _DELETE, scope=t.scope, tag=migration.tag), deadline.bound(t.timeout_s)
                )
        except DatabaseFailure as exc:
            raise self._failed(t, migration, exc) from None
        return MigrationRun(migration.tag, checksum(migration), took, len(migration.down))

    @staticmethod
    def _failed(t: _Target, migration: Migration, exc: DatabaseFailure) -> _Failed:
        return _Failed(
            FailedPrecondition(
                f"migration {migration.tag!r} failed: {exc}",
                reason=Reason.MIGRATION_FAILED,
                metadata={"database": t.database.tag, "migration": migration.tag},
            )
        )


class _Failed(Exception):
    """One migration failed (and was undone where the database allows): the run stops after it, keeping the others."""

    def __init__(self, error: ProcessorError) -> None:
        super().__init__(error.message)
        self.error = error
