"""LogService: the execution log, filtered and paged (runtime/logs/queries.py does the listing)."""

from __future__ import annotations

from ductape.processor.v1 import log_pb2, log_pb2_grpc

from ductape_processor.api.calls import Context
from ductape_processor.api.values import moment, timestamp
from ductape_processor.runtime.logs import ExecutionQueries, ExecutionRecord


def _execution(record: ExecutionRecord) -> log_pb2.Execution:
    return log_pb2.Execution(
        process_id=record.process_id,
        product=record.product,
        env=record.env,
        version=record.version,
        kind=record.kind,
        resource=record.resource,
        status=record.status,  # type: ignore[arg-type]
        start_time=timestamp(record.started_at),
        end_time=timestamp(record.ended_at),
        attempts=record.attempts,
        upstream_status=record.upstream_status,
        error_reason=record.error_reason,
        cached=record.cached,
        detail=record.detail,
    )


class LogServicer(log_pb2_grpc.LogServiceServicer):
    """Serves LogService."""

    def __init__(self, queries: ExecutionQueries) -> None:
        self._queries = queries

    async def ListExecutions(
        self, request: log_pb2.ListExecutionsRequest, context: Context
    ) -> log_pb2.ListExecutionsResponse:
        page = await self._queries.list(
            request.product,
            env=request.env or None,
            resource=request.resource or None,
            status=request.status or None,
            since=moment(request.start_time, "start_time") if request.HasField("start_time") else None,
            until=moment(request.end_time, "end_time") if request.HasField("end_time") else None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return log_pb2.ListExecutionsResponse(
            executions=[_execution(r) for r in page.records], next_page_token=page.next_page_token
        )
