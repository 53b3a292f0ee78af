"""Python client of the Ductape processor.

`from ductape.processor import Processor` for the async facade; the generated stubs are under
`ductape.processor.v1`; errors are typed exceptions in `ductape.processor.errors`, re-exported here.

The facade and the errors are imported when first named, not with the package: the processor's server imports the
generated stubs under `ductape.processor.v1` (which runs this file) and none of the facade, whose modules would
otherwise sit in every idle server's memory (about 1 MB).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_FROM_CLIENT = frozenset({"Processor", "ProductClient"})
"""The names of `__all__` that `client` defines; `errors` defines the others."""


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = "client" if name in _FROM_CLIENT else "errors"
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
