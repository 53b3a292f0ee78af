"""What a render reads (`Scope`) and what one render keeps track of (`RenderState`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ductape_processor.runtime.templates.taint import Taint
from ductape_processor.runtime.templates.values import BadValue

MAX_RENDERED_LENGTH: Final = 1_048_576
"""Characters one render may produce (interpolated text, operator results); values passed through are not counted."""


class _NoDefault:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Final[Any] = _NoDefault()
"""`Scope.default` when the field being rendered has no default value: `$Default` then fails."""


def _no_secrets(name: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Scope:
    """What selectors read during one render. Rendering never mutates it."""

    input: Mapping[str, Any] = field(default_factory=dict)
    """The caller's input; for actions `{"query": {...}, "params": {...}, "body": {...}, "headers": {...}}`."""
    variables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """App tag → key → value, for the environment of the call."""
    constants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """App tag → key → value."""
    auth: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Auth tag → `{"headers": {...}, "query": {...}, "body": {...}}` of the stored credential."""
    secrets: Callable[[str], str | None] = _no_secrets
    """Secret name → value, or None when the secret is not defined."""
    session: Mapping[str, Any] | None = None
    """The verified session's data, or None when the call carries no session."""
    sequence: Mapping[str, Any] = field(default_factory=dict)
    """Step results of a feature: sequence tag → event tag → output."""
    response: Mapping[str, Any] | None = None
    """In an auth flow, the login response `{"status": int, "headers": {...}, "body": ...}`."""
    default: Any = NO_DEFAULT
    """The value of `$Default` (the field's default), or NO_DEFAULT."""
    taint: Taint | None = None
    """Where renders with this scope record their sensitive values, when the caller needs to know them."""


class RenderState:
    """The state of one render: characters it may still produce, secret selectors it has read so far."""

    __slots__ = ("left", "sources")

    def __init__(self) -> None:
        self.left = MAX_RENDERED_LENGTH
        self.sources: list[str] = []
        """The secret selectors read, as written; an expression is secret when its evaluation made this longer."""

    def taint(self, scope: Scope, source: str, value: Any) -> None:
        """`value`, read through `source`, derives from a secret."""
        self.sources.append(source)
        if scope.taint is not None:
            scope.taint.add(value)

    def spend(self, amount: int) -> None:
        """Count `amount` characters produced; BadValue past `MAX_RENDERED_LENGTH`."""
        self.left -= amount
        if self.left < 0:
            raise BadValue(f"the rendered value would exceed the limit of {MAX_RENDERED_LENGTH} characters")

    def produced(self, text: str) -> str:
        """`text`, a new string the render produces, once counted."""
        self.spend(len(text))
        return text
