"""MigrationService: proto in, MigrationRunner call, proto out."""

from __future__ import annotations

from ductape.processor.v1 import migration_pb2, migration_pb2_grpc

from ductape_processor.api.calls import Context, deadline
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.databases.migrations import MigrationRun, MigrationRunner, MigrationTarget

_STATES = {
    "applied": migration_pb2.MIGRATION_STATE_APPLIED,
    "pending": migration_pb2.MIGRATION_STATE_PENDING,
    "drifted": migration_pb2.MIGRATION_STATE_DRIFTED,
    "failed": migration_pb2.MIGRATION_STATE_FAILED,
}


def _target(given: migration_pb2.MigrationTarget) -> MigrationTarget:
    for name, what in (("product", "the product's tag"), ("env", "the environment"), ("database", "its tag")):
        if not getattr(given, name):
            raise InvalidArgument.field(f"target.{name}", f"is required: {what}")
    if given.version < 0:
        raise InvalidArgument.field("target.version", "must be 1 or more (or 0 for the environment's version)")
    return MigrationTarget(given.product, given.env, given.database, given.version or None)


def _runs(runs: list[MigrationRun]) -> list[migration_pb2.MigrationRun]:
    return [
        migration_pb2.MigrationRun(tag=r.tag, checksum=r.checksum, duration_ms=r.duration_ms, statements=r.statements)
        for r in runs
    ]


class MigrationServicer(migration_pb2_grpc.MigrationServiceServicer):
    """Serves MigrationService."""

    def __init__(self, runner: MigrationRunner) -> None:
        self._runner = runner

    async def Run(
        self, request: migration_pb2.MigrationServiceRunRequest, context: Context
    ) -> migration_pb2.MigrationServiceRunResponse:
        applied = await self._runner.run(_target(request.target), request.tag, deadline(context))
        return migration_pb2.MigrationServiceRunResponse(applied=_runs(applied))

    async def Rollback(
        self, request: migration_pb2.MigrationServiceRollbackRequest, context: Context
    ) -> migration_pb2.MigrationServiceRollbackResponse:
        reverted = await self._runner.rollback(_target(request.target), request.steps, request.tag, deadline(context))
        return migration_pb2.MigrationServiceRollbackResponse(rolled_back=_runs(reverted))

    async def Status(
        self, request: migration_pb2.MigrationServiceStatusRequest, context: Context
    ) -> migration_pb2.MigrationServiceStatusResponse:
        found = await self._runner.status(_target(request.target), deadline(context))
        return migration_pb2.MigrationServiceStatusResponse(
            migrations=[
                migration_pb2.MigrationStatus(
                    tag=s.tag,
                    state=_STATES[s.state],
                    checksum_applied=s.checksum_applied,
                    checksum_now=s.checksum_now,
                    applied_at=s.applied_at,
                    duration_ms=s.duration_ms,
                )
                for s in found
            ]
        )

    async def Plan(
        self, request: migration_pb2.MigrationServicePlanRequest, context: Context
    ) -> migration_pb2.MigrationServicePlanResponse:
        planned = await self._runner.plan(
            _target(request.target), request.tag, request.rollback, request.steps, deadline(context)
        )
        return migration_pb2.MigrationServicePlanResponse(
            migrations=[migration_pb2.PlannedMigration(tag=tag, statements=sql) for tag, sql in planned]
        )
