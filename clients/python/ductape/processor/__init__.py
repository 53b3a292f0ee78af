"""Python client of the Ductape processor.

`from ductape.processor import Processor` for the async facade; the generated stubs are under
`ductape.processor.v1`; errors are typed exceptions in `ductape.processor.errors`, re-exported here.
"""

from ductape.processor.client import Processor, ProductClient
from ductape.processor.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProcessorError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Processor",
    "ProcessorError",
    "ProductClient",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]
