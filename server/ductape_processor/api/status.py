"""The one place where errors become gRPC statuses with rich details (AIP-193).

The `google.rpc.Status` is turned into the call's status and trailers by grpcio-status (`rpc_status.to_status`),
so its code, message and `grpc-status-details-bin` trailer always agree.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ductape_processor.errors import ProcessorError
from ductape_processor.reasons import Reason

ERROR_DOMAIN = "processor.ductape.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailer that carries the serialized `google.rpc.Status` (written by `rpc_status.to_status`)."""
REQUEST_ID_KEY = "x-request-id"

Trailers = tuple[tuple[str, str | bytes], ...]


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    violations: list[tuple[str, str]],
    retry_after_s: float | None = None,
) -> status_pb2.Status:
    """A `google.rpc.Status` with one ErrorInfo, a BadRequest when fields are bad, a RetryInfo when a retry may work."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))]
    if violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                        for field, description in violations
                    ]
                )
            )
        )
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(retry_after_s, 0.0) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def _abort_arguments(status: status_pb2.Status, request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    converted = rpc_status.to_status(status)
    return converted.code, converted.details, (*converted.trailing_metadata, (REQUEST_ID_KEY, request_id))


def error_trailers(error: ProcessorError, request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """Code, message and trailing metadata (status details and request id) for a domain error."""
    status = rich_status(
        error.code,
        error.message,
        error.reason,
        error.metadata,
        [(v.field, v.description) for v in error.violations],
        error.retry_after_s,
    )
    return _abort_arguments(status, request_id)


def internal_trailers(request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """Code, message and trailers for an unexpected failure: no detail leaves the server but the correlation id."""
    message = f"internal error; the server log has the details under correlation id {request_id}"
    status = rich_status(grpc.StatusCode.INTERNAL, message, Reason.INTERNAL, {"correlation_id": request_id}, [])
    return _abort_arguments(status, request_id)
