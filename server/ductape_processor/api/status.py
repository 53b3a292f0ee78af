"""The one place where errors become gRPC statuses with rich details (AIP-193).

The `google.rpc.Status` is turned into the call's status and trailers by grpcio-status (`rpc_status.to_status`),
so its code, message and `grpc-status-details-bin` trailer always agree.

An error may quote what the caller sent (`no job 'xxx…'`), and a caller may send a value of megabytes. The status
travels in trailing metadata, which gRPC clients refuse past 8 KiB (as a RESOURCE_EXHAUSTED of their own that hides
the error), so every text of a status is clipped here, in bytes: the message, each metadata value, each violation,
and the violations together (`MAX_DETAIL_BYTES`, the budget an INVALID_MANIFEST keeps too).
"""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ductape_processor.errors import MAX_DETAIL_BYTES, ProcessorError
from ductape_processor.reasons import Reason

ERROR_DOMAIN = "processor.ductape.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailer that carries the serialized `google.rpc.Status` (written by `rpc_status.to_status`)."""
REQUEST_ID_KEY = "x-request-id"

Trailers = tuple[tuple[str, str | bytes], ...]

MAX_STATUS_MESSAGE_BYTES: Final = 400
"""UTF-8 bytes kept of a status message. It is sent twice (percent-encoded in `grpc-message`, up to three bytes a
byte, and inside the base64 details), so it is kept short: the details say the rest."""
MAX_METADATA_BYTES: Final = 200
"""UTF-8 bytes kept of one ErrorInfo metadata key or value."""
MAX_VIOLATION_BYTES: Final = 1024
"""UTF-8 bytes kept of one violation's field or description (an INVALID_MANIFEST's are clipped shorter already)."""


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (never inside a character), marked with an ellipsis when cut."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "…"


def _violations(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first violations (each clipped) whose bytes fit `MAX_DETAIL_BYTES`; always the first one."""
    kept: list[tuple[str, str]] = []
    budget = MAX_DETAIL_BYTES
    for field, description in violations:
        shown = (clip(field, MAX_VIOLATION_BYTES), clip(description, MAX_VIOLATION_BYTES))
        budget -= len(shown[0].encode()) + len(shown[1].encode()) + 8
        if budget < 0 and kept:
            break
        kept.append(shown)
    return kept


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
    metadata = {clip(key, MAX_METADATA_BYTES): clip(value, MAX_METADATA_BYTES) for key, value in error.metadata.items()}
    status = rich_status(
        error.code,
        clip(error.message, MAX_STATUS_MESSAGE_BYTES),
        error.reason,
        metadata,
        _violations([(v.field, v.description) for v in error.violations]),
        error.retry_after_s,
    )
    return _abort_arguments(status, request_id)


def internal_trailers(request_id: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """Code, message and trailers for an unexpected failure: no detail leaves the server but the correlation id."""
    message = f"internal error; the server log has the details under correlation id {request_id}"
    status = rich_status(grpc.StatusCode.INTERNAL, message, Reason.INTERNAL, {"correlation_id": request_id}, [])
    return _abort_arguments(status, request_id)
