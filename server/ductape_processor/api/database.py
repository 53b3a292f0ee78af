"""DatabaseService: proto in, DatabaseRunner call, proto out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ductape.processor.v1 import database_pb2, database_pb2_grpc
from google.protobuf import struct_pb2

from ductape_processor.api.calls import Context, call_options, deadline, product_env
from ductape_processor.api.values import required, struct_to_dict
from ductape_processor.runtime.databases.runner import BatchStep, DatabaseCall, DatabaseRunner
from ductape_processor.runtime.databases.statements import StepResult


def _input(given: database_pb2.DatabaseInput) -> dict[str, Any]:
    return {part: struct_to_dict(getattr(given, part)) for part in ("data", "filter") if given.HasField(part)}


def _rows(result: StepResult) -> list[struct_pb2.Struct]:
    rows = []
    for row in result.rows:
        struct = struct_pb2.Struct()
        struct.update(row)
        rows.append(struct)
    return rows


class DatabaseServicer(database_pb2_grpc.DatabaseServiceServicer):
    """Serves DatabaseService."""

    def __init__(self, runner: DatabaseRunner) -> None:
        self._runner = runner

    @staticmethod
    def _call(request: database_pb2.ExecuteRequest | database_pb2.BatchRequest) -> DatabaseCall:
        """What Execute and Batch requests share."""
        return DatabaseCall(
            **product_env(request),
            database=required(request.database, "database", "the database's tag"),
            action="",
            **call_options(request),
        )

    async def Execute(self, request: database_pb2.ExecuteRequest, context: Context) -> database_pb2.ExecuteResponse:
        call = replace(
            self._call(request),
            action=required(request.action, "action", "the action's tag"),
            input=_input(request.input) if request.HasField("input") else {},
            cache=request.cache,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        result = await self._runner.execute(call, deadline(context))
        step = result.steps[0]
        return database_pb2.ExecuteResponse(
            rows=_rows(step),
            affected_rows=step.affected_rows,
            count=step.count or 0,
            last_insert_id=step.last_insert_id or 0,
            process_id=result.process_id,
            cached=result.cached,
            version=result.version,
            next_page_token=result.next_page_token,
        )

    async def Batch(self, request: database_pb2.BatchRequest, context: Context) -> database_pb2.BatchResponse:
        call = self._call(request)
        steps = [
            BatchStep(
                action=required(step.action, f"steps[{i}].action", "the action's tag"),
                input=_input(step.input) if step.HasField("input") else {},
                tag=step.tag,
            )
            for i, step in enumerate(request.steps)
        ]
        result = await self._runner.batch(call, steps, deadline(context))
        return database_pb2.BatchResponse(
            results=[
                database_pb2.StepResult(
                    rows=_rows(step),
                    affected_rows=step.affected_rows,
                    count=step.count or 0,
                    last_insert_id=step.last_insert_id or 0,
                )
                for step in result.steps
            ],
            process_id=result.process_id,
            version=result.version,
        )
