"""Python client of the Ductape processor.

`from ductape.processor import Processor` for the async facade; the generated stubs are under
`ductape.processor.v1`; errors are typed exceptions in `ductape.processor.errors`.
"""

from ductape.processor.client import Processor, ProductClient
from ductape.processor.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ProcessorError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "Processor",
    "ProcessorError",
    "ProductClient",
    "UnauthenticatedError",
    "UnavailableError",
]
