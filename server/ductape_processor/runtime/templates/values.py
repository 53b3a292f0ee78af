"""What templates do with JSON values: name their types, write them as text, read numbers, coerce operands.

Everything here raises `BadValue` for a value it cannot use; the node evaluating it knows its own text and turns
that into a `RenderError` naming the selector or operator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

DIGITS: Final = frozenset("0123456789")
_MAX_NUMBER_LENGTH: Final = 400
_MAX_EXACT_FLOAT: Final = 2**53


class BadValue(Exception):
    """A value an operator or a conversion cannot use; `message` says why, naming types, never values."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def json_kind(value: Any) -> str:
    """How an error message names a JSON value's type: `a string`, `an object`, `null`..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def counted(number: int, noun: str) -> str:
    """`1 item`, `3 items`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(type(value).__name__)


def _float_text(value: float) -> str:
    if not math.isfinite(value):
        raise BadValue("a number is not finite")
    if value.is_integer() and abs(value) < _MAX_EXACT_FLOAT:
        return str(int(value))
    return repr(value)


def to_text(value: Any) -> str:
    """How a value reads inside text: strings as they are, null as nothing, numbers and objects as JSON."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(int(value))
        except ValueError:
            raise BadValue("a number has too many digits to be written") from None
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Mapping | list | tuple):
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
        except (TypeError, ValueError):
            raise BadValue(f"{json_kind(value)} holds a value that is not JSON") from None
        except RecursionError:
            raise BadValue(f"{json_kind(value)} is nested too deeply to be written") from None
    raise BadValue(f"{json_kind(value)} is not a JSON value")


def _digits_end(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in DIGITS:
        i += 1
    return i


def scan_number(text: str, start: int) -> int:
    """End of the JSON-style number starting at `start` (`-12`, `3.5`, `1e9`), or `start` when there is none."""
    i = start + 1 if text.startswith("-", start) else start
    end = _digits_end(text, i)
    if end == i:
        return start
    if text.startswith(".", end):
        i = end + 1
        end = _digits_end(text, i)
        if end == i:
            return start
    if text.startswith(("e", "E"), end):
        i = end + 2 if text.startswith(("+", "-"), end + 1) else end + 1
        end = _digits_end(text, i)
        if end == i:
            return start
    return end


def number_value(literal: str) -> int | float | None:
    """The number a complete numeric literal denotes, or None when it is too long or out of range."""
    if len(literal) > _MAX_NUMBER_LENGTH:
        return None
    if any(c in ".eE" for c in literal):
        value = float(literal)
        return value if math.isfinite(value) else None
    return int(literal)


def _parse_number_text(text: str) -> int | float | None:
    if not text or len(text) > _MAX_NUMBER_LENGTH or scan_number(text, 0) != len(text):
        return None
    return number_value(text)


def as_number(value: Any, what: str) -> int | float:
    """A number operand: a JSON number, or a string holding one (`"12"`)."""
    if isinstance(value, bool) or value is None:
        raise BadValue(f"{what} is {json_kind(value)}, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadValue(f"{what} is not a finite number")
        return value
    if isinstance(value, str):
        parsed = _parse_number_text(value)
        if parsed is None:
            raise BadValue(f"{what} is a string that is not a number")
        return parsed
    raise BadValue(f"{what} is {json_kind(value)}, not a number")


def as_index(value: Any, what: str) -> int:
    """A position: a whole number ≥ 0 (`2`, `2.0` or `"2"`)."""
    number = as_number(value, what)
    if isinstance(number, float):
        if not number.is_integer():
            raise BadValue(f"{what} is not a whole number")
        number = int(number)
    if number < 0:
        raise BadValue(f"{what} is negative")
    return number


def as_string(value: Any, what: str) -> str:
    """A string operand, as it is."""
    if not isinstance(value, str):
        raise BadValue(f"{what} is {json_kind(value)}, not a string")
    return value


def as_array(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    """An array operand, as it is."""
    if not isinstance(value, list | tuple):
        raise BadValue(f"{what} is {json_kind(value)}, not an array")
    return value


def same(a: Any, b: Any) -> bool:
    """JSON equality: `1 == 1.0`, but `true` is not `1` and `"1"` is not `1`."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return len(a) == len(b) and all(key in b and same(value, b[key]) for key, value in a.items())
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return False
