"""An adapter's failure as the caller sees it: one place maps `adapters.databases.base` errors to gRPC statuses.

The adapters' messages never quote a DSN; they may quote what the database said about the statement (a constraint's
name, an unknown table), which is the manifest author's SQL and the caller's own values.
"""

from __future__ import annotations

from ductape_processor.adapters.databases.base import (
    ConstraintViolation,
    DatabaseFailure,
    DatabaseUnreachable,
    PoolExhausted,
    ResultOverflow,
    StatementTimeout,
    ValueRejected,
)
from ductape_processor.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ProcessorError,
    ResourceExhausted,
    Unavailable,
)
from ductape_processor.reasons import Reason
from ductape_processor.runtime.databases.values import ResultTooLarge


def database_error(exc: DatabaseFailure, database: str, action: str) -> ProcessorError:
    """The ProcessorError for an adapter failure while running `database:action`."""
    metadata = {"database": database, "action": action}
    message = str(exc)
    if isinstance(exc, ConstraintViolation):
        metadata["constraint"] = exc.constraint
        metadata["constraint_kind"] = exc.kind
        kind = AlreadyExists if exc.kind == "unique" else FailedPrecondition
        return kind(message, reason=Reason.DB_CONSTRAINT_VIOLATION, metadata=metadata)
    if isinstance(exc, DatabaseUnreachable):
        return Unavailable(message, reason=Reason.DB_UNREACHABLE, metadata=metadata)
    if isinstance(exc, StatementTimeout):
        return DeadlineExceeded(message, reason=Reason.DB_TIMEOUT, metadata=metadata)
    if isinstance(exc, ResultOverflow):
        setting = "PROCESSOR_DATABASE_MAX_ROWS" if exc.limit == "rows" else "PROCESSOR_DATABASE_MAX_RESULT_BYTES"
        return ResultTooLarge(
            f"{message} ({setting}); page it (page_size) or select less",
            metadata={**metadata, "limit": exc.limit, "maximum": str(exc.maximum)},
        )
    if isinstance(exc, PoolExhausted):
        return ResourceExhausted(message, reason=Reason.DB_POOL_EXHAUSTED, metadata=metadata)
    if isinstance(exc, ValueRejected):
        field = message.split(" ", 1)[0] if message.startswith("params.") else "input"
        return InvalidArgument(
            f"invalid input: {message}",
            reason=Reason.INVALID_INPUT,
            metadata=metadata,
            violations=[FieldViolation(field, message)],
        )
    return FailedPrecondition(message, reason=Reason.DB_QUERY_INVALID, metadata=metadata)
