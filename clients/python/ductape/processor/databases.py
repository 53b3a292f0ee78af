"""Database actions from Python: `processor.database.execute(...)` and `processor.database.batch(...)`.

    result = await processor.database.execute(
        product="shop", env="dev", database="main", action="find_user", input={"filter": {"email": "ada@example.com"}}
    )
    result.rows  # [{"id": 1, "email": "ada@example.com"}]

Rows come back as plain Python: whole numbers as ints (integers beyond 2^53 and decimals are strings, as sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NotRequired, TypedDict, Unpack

from ductape.processor.calls import CallMetadata, ResourceClient, RunOptions
from ductape.processor.v1 import database_pb2, database_pb2_grpc, migration_pb2, migration_pb2_grpc
from ductape.processor.values import SessionLike, plain, record_from, session_ref
from google.protobuf import json_format, struct_pb2


def _input(given: Mapping[str, Mapping[str, Any]] | None) -> database_pb2.DatabaseInput:
    message = database_pb2.DatabaseInput()
    for part in ("data", "filter"):
        values = (given or {}).get(part)
        if values is not None:
            struct = struct_pb2.Struct()
            struct.update(dict(values))
            getattr(message, part).CopyFrom(struct)
    return message


@dataclass(frozen=True, slots=True)
class DatabaseResult:
    """What a database action answered."""

    rows: list[dict[str, Any]]
    affected_rows: int = 0
    count: int = 0
    last_insert_id: int = 0
    process_id: str = ""
    cached: bool = False
    version: int = 0
    next_page_token: str = ""


def _result(
    step: database_pb2.ExecuteResponse | database_pb2.StepResult,
    call: database_pb2.ExecuteResponse | database_pb2.BatchResponse,
) -> DatabaseResult:
    """One action's rows and counts (`step`), with the process id and version of the call that ran it."""
    return DatabaseResult(
        rows=[plain(json_format.MessageToDict(row)) for row in step.rows],
        affected_rows=step.affected_rows,
        count=step.count,
        last_insert_id=step.last_insert_id,
        process_id=call.process_id,
        version=call.version,
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One action of a batch: its tag, its input and the name later steps read its result by."""

    action: str
    input: Mapping[str, Mapping[str, Any]] | None = None
    tag: str = ""


class DatabaseClient(ResourceClient):
    """`processor.database`: run a database's actions."""

    _stub: database_pb2_grpc.DatabaseServiceAsyncStub

    async def execute(
        self,
        *,
        product: str,
        env: str,
        database: str,
        action: str,
        input: Mapping[str, Mapping[str, Any]] | None = None,
        session: SessionLike | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **options: Unpack[RunOptions],
    ) -> DatabaseResult:
        """Run one action. `input` has the parts `data` and `filter`."""
        request = database_pb2.ExecuteRequest(
            product=product,
            env=env,
            database=database,
            action=action,
            input=_input(input),
            session=session_ref(session),
            page_size=page_size,
            page_token=page_token,
            **options,
        )
        response = await self._call(self._stub.Execute, request, timeout, metadata)
        return replace(_result(response, response), cached=response.cached, next_page_token=response.next_page_token)

    run = execute
    """Ductape's name for `execute`: `processor.db.run(...)`."""

    async def batch(
        self,
        *,
        product: str,
        env: str,
        database: str,
        steps: Sequence[Step],
        session: SessionLike | None = None,
        version: int = 0,
        idempotency_key: str = "",
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
    ) -> list[DatabaseResult]:
        """Run `steps` in one transaction; one result per step (all committed), or an error (none)."""
        request = database_pb2.BatchRequest(
            product=product,
            env=env,
            database=database,
            steps=[database_pb2.BatchStep(action=s.action, input=_input(s.input), tag=s.tag) for s in steps],
            session=session_ref(session),
            version=version,
            idempotency_key=idempotency_key,
        )
        response = await self._call(self._stub.Batch, request, timeout, metadata)
        return [_result(result, response) for result in response.results]


MigrationRun = migration_pb2.MigrationRun
"""A migration that ran (applied or rolled back): `tag`, `checksum`, `duration_ms`, `statements`; the API's message
as it is, since it holds nothing to convert."""


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """Where one migration stands: `applied`, `pending`, `drifted` or `failed`."""

    tag: str
    state: str
    checksum_applied: str
    checksum_now: str
    applied_at: str
    duration_ms: int

    @classmethod
    def from_proto(cls, status: migration_pb2.MigrationStatus) -> MigrationStatus:
        """From the API's MigrationStatus; a state this client does not know is `unknown`."""
        return record_from(cls, status, state=_STATES.get(status.state, "unknown"))


class DatabaseTarget(TypedDict):
    """A database of a product in one environment, at the version pinned for it (or `version`, when not 0)."""

    product: str
    env: str
    database: str
    version: NotRequired[int]


_STATES = {
    migration_pb2.MIGRATION_STATE_APPLIED: "applied",
    migration_pb2.MIGRATION_STATE_PENDING: "pending",
    migration_pb2.MIGRATION_STATE_DRIFTED: "drifted",
    migration_pb2.MIGRATION_STATE_FAILED: "failed",
}


class MigrationClient(ResourceClient):
    """`processor.migration`: run, roll back, report and plan a database's migrations."""

    _stub: migration_pb2_grpc.MigrationServiceAsyncStub

    async def run(
        self,
        *,
        tag: str = "",
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **target: Unpack[DatabaseTarget],
    ) -> list[MigrationRun]:
        """Apply the pending migrations (up to and including `tag`); the ones applied by this call."""
        request = migration_pb2.MigrationServiceRunRequest(target=migration_pb2.MigrationTarget(**target), tag=tag)
        response = await self._call(self._stub.Run, request, timeout, metadata)
        return list(response.applied)

    async def rollback(
        self,
        *,
        steps: int = 0,
        tag: str = "",
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **target: Unpack[DatabaseTarget],
    ) -> list[MigrationRun]:
        """Revert the newest applied migrations (`steps`, default 1, or back to and including `tag`)."""
        request = migration_pb2.MigrationServiceRollbackRequest(
            target=migration_pb2.MigrationTarget(**target), steps=steps, tag=tag
        )
        response = await self._call(self._stub.Rollback, request, timeout, metadata)
        return list(response.rolled_back)

    async def status(
        self, *, timeout: float | None = None, metadata: CallMetadata | None = None, **target: Unpack[DatabaseTarget]
    ) -> list[MigrationStatus]:
        """Every migration's state."""
        request = migration_pb2.MigrationServiceStatusRequest(target=migration_pb2.MigrationTarget(**target))
        response = await self._call(self._stub.Status, request, timeout, metadata, safe=True)
        return [MigrationStatus.from_proto(status) for status in response.migrations]

    async def plan(
        self,
        *,
        tag: str = "",
        rollback: bool = False,
        steps: int = 0,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **target: Unpack[DatabaseTarget],
    ) -> list[tuple[str, list[str]]]:
        """(tag, statements) of what Run (or Rollback) would run now; nothing is applied."""
        request = migration_pb2.MigrationServicePlanRequest(
            target=migration_pb2.MigrationTarget(**target), tag=tag, rollback=rollback, steps=steps
        )
        response = await self._call(self._stub.Plan, request, timeout, metadata, safe=True)
        return [(m.tag, list(m.statements)) for m in response.migrations]
