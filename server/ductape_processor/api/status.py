"""The one place where errors become gRPC statuses with rich details (AIP-193)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ductape_processor.errors import ProcessorError

ERROR_DOMAIN = "processor.ductape.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    violations: list[tuple[str, str]],
) -> status_pb2.Status:
    """A `google.rpc.Status` with one ErrorInfo and, when fields are bad, a BadRequest."""
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
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def error_trailers(
    error: ProcessorError, request_id: str
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """Code, message and trailing metadata (status details and request id) for a domain error."""
    status = rich_status(
        error.code,
        error.message,
        error.reason,
        error.metadata,
        [(v.field, v.description) for v in error.violations],
    )
    return (
        error.code,
        error.message,
        (
            (STATUS_DETAILS_KEY, status.SerializeToString()),
            (REQUEST_ID_KEY, request_id),
        ),
    )


def internal_trailers(request_id: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """Code, message and trailers for an unexpected failure: no detail leaves the server but the correlation id."""
    message = f"internal error; the server log has the details under correlation id {request_id}"
    status = rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", {"correlation_id": request_id}, [])
    assert status.code == code_pb2.INTERNAL
    return (
        grpc.StatusCode.INTERNAL,
        message,
        (
            (STATUS_DETAILS_KEY, status.SerializeToString()),
            (REQUEST_ID_KEY, request_id),
        ),
    )
