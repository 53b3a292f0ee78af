"""Typed exceptions for gRPC errors, with the processor's rich error details unpacked.

Every failed call raises a `ProcessorError` subclass chosen by the status code. It carries the code, the
message, the `reason` (`PRODUCT_NOT_FOUND`, `INVALID_MANIFEST`, ...), the `domain`, the error metadata, the
field violations of a bad request, the retry delay the server suggests (`google.rpc.RetryInfo`, as
`retry_after_s`), and the request id the server logged the call under.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path (`apps[0].actions[2].path`, `page_size`) and why."""

    field: str
    description: str


class ProcessorError(Exception):
    """A call to the processor failed."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[FieldViolation] | None = None,
        request_id: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {reason + ': ' if reason else ''}{message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.request_id = request_id
        # Seconds to wait before a retry may succeed, when the server said (google.rpc.RetryInfo); else None.
        self.retry_after_s = retry_after_s


class InvalidArgumentError(ProcessorError):
    """INVALID_ARGUMENT: the request (or the manifest in it) is wrong; see `field_violations`."""


class NotFoundError(ProcessorError):
    """NOT_FOUND: the product, environment, version or resource does not exist."""


class AlreadyExistsError(ProcessorError):
    """ALREADY_EXISTS."""


class FailedPreconditionError(ProcessorError):
    """FAILED_PRECONDITION: the system is not in the state the call needs."""


class UnauthenticatedError(ProcessorError):
    """UNAUTHENTICATED: missing or wrong API key, or an invalid session."""


class PermissionDeniedError(ProcessorError):
    """PERMISSION_DENIED."""


class ResourceExhaustedError(ProcessorError):
    """RESOURCE_EXHAUSTED: a size or rate limit was hit."""


class UnavailableError(ProcessorError):
    """UNAVAILABLE: try again, possibly on another replica."""


class DeadlineExceededError(ProcessorError):
    """DEADLINE_EXCEEDED."""


class InternalError(ProcessorError):
    """INTERNAL: the server failed; `metadata['correlation_id']` finds it in the server's log."""


_BY_CODE: dict[grpc.StatusCode, type[ProcessorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> ProcessorError:
    """The typed exception for a failed call, with its rich details unpacked."""
    code = error.code()
    reason = domain = request_id = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    for key, value in error.trailing_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            request_id = value
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    cls = _BY_CODE.get(code, ProcessorError)
    return cls(
        code,
        error.details() or "",
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        request_id=request_id,
        retry_after_s=retry_after_s,
    )
