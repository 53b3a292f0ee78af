"""LogService: the execution log, filtered and paged."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import grpc
from ductape.processor.v1 import log_pb2, log_pb2_grpc
from google.protobuf import timestamp_pb2

from ductape_processor.api.values import timestamp
from ductape_processor.errors import EnvNotFound, InvalidArgument
from ductape_processor.runtime.policies.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from ductape_processor.runtime.registry import Registry
from ductape_processor.store.base import ExecutionFilter, ExecutionRecord, Store

Context = grpc.aio.ServicerContext[Any, Any]


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


def _fingerprint(where: ExecutionFilter) -> str:
    return hashlib.sha256(repr(where).encode()).hexdigest()[:16]


def _encode_token(where: ExecutionFilter, last: ExecutionRecord) -> str:
    raw = json.dumps([_fingerprint(where), last.started_at.timestamp(), last.process_id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(where: ExecutionFilter, token: str) -> tuple[datetime, str]:
    try:
        fingerprint, seconds, process_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if fingerprint != _fingerprint(where):
            raise ValueError
        return datetime.fromtimestamp(float(seconds), UTC), str(process_id)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument.field(
            "page_token", "not a page token of this listing (same filters); pass next_page_token unchanged"
        ) from None


def _moment(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return value.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(
            field, "is not a valid timestamp (years 1 to 9999, nanos between 0 and 999,999,999)"
        ) from None


class LogServicer(log_pb2_grpc.LogServiceServicer):
    """Serves LogService."""

    def __init__(self, registry: Registry, store: Store, flush: Any) -> None:
        self._registry = registry
        self._store = store
        self._flush = flush

    async def ListExecutions(
        self, request: log_pb2.ListExecutionsRequest, context: Context
    ) -> log_pb2.ListExecutionsResponse:
        if not request.product:
            raise InvalidArgument.field("product", "is required: the product's tag")
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        env: str | None = None
        if request.env:
            try:
                env = (await self._registry.environment(request.product, request.env))[0].slug
            except EnvNotFound:
                env = request.env
        where = ExecutionFilter(
            product=request.product,
            env=env,
            resource=request.resource or None,
            status=request.status or None,
            since=_moment(request.start_time, "start_time") if request.HasField("start_time") else None,
            until=_moment(request.end_time, "end_time") if request.HasField("end_time") else None,
        )
        after = _decode_token(where, request.page_token) if request.page_token else None
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        await self._flush()  # what this replica ran so far is listed, even if its batch was not written yet
        records = await self._store.list_executions(where, after=after, limit=size + 1)
        more = len(records) > size
        records = records[:size]
        return log_pb2.ListExecutionsResponse(
            executions=[_execution(r) for r in records],
            next_page_token=_encode_token(where, records[-1]) if more else "",
        )
