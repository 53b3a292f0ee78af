"""`record`: the dataclass of a value built on every call (a call's options and answer, an HTTP request, an execution
record), read-only to the type checker and built at the speed of a mutable one.

A frozen dataclass sets each field through `object.__setattr__` in its `__init__`, about ten times the cost of a
plain slot store: 1.6 µs instead of 0.27 µs for fourteen fields, and ActionService.Run built some forty such fields
per call (bench/README.md). `record` classes are slotted dataclasses that `mypy --strict` treats as frozen
(`dataclass_transform(frozen_default=True)`): assigning a field is a type error, as with `frozen=True`, but nothing
enforces it at run time. Unlike frozen ones they are not hashable; nothing hashes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, dataclass_transform, overload

T = TypeVar("T")


@overload
def record(cls: type[T], /) -> type[T]: ...
@overload
def record(*, kw_only: bool = False) -> Callable[[type[T]], type[T]]: ...
@dataclass_transform(frozen_default=True)
def record(cls: type[T] | None = None, /, *, kw_only: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """`@record` or `@record(kw_only=True)` on a class: a slotted dataclass, read-only to the type checker."""
    make = dataclass(slots=True, kw_only=kw_only)
    return make if cls is None else make(cls)
