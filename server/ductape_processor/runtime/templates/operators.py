"""The operators (`$Uppercase`, `$Filter`, ...): each takes its evaluated arguments and the render's state.

Arity is checked at compile time (`OPERATORS` holds each operator's bounds); an operator raises `BadValue` for an
argument it cannot use, and counts what it produces against the render's budget.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, Final

from ductape_processor.runtime.templates.scope import RenderState
from ductape_processor.runtime.templates.values import (
    BadValue,
    as_array,
    as_index,
    as_number,
    as_string,
    counted,
    json_kind,
    same,
    to_text,
)

COMPARISONS: Final = frozenset({">", "<", ">=", "<=", "==", "!="})

OperatorFn = Callable[[list[Any], RenderState], Any]


def _combined(
    numbers: Iterable[Any], combine: Callable[[Any, Any], Any], total: int | float, first: int
) -> int | float:
    """`total` combined with each number in turn; `first` is the argument position of the first one."""
    try:
        for position, arg in enumerate(numbers, start=first):
            total = combine(total, as_number(arg, f"argument {position}"))
    except OverflowError:
        raise BadValue("the result is out of range") from None
    if isinstance(total, float) and not math.isfinite(total):
        raise BadValue("the result is out of range")
    return total


def _op_add(args: list[Any], budget: RenderState) -> Any:
    return _combined(args, operator.add, 0, 1)


def _op_subtract(args: list[Any], budget: RenderState) -> Any:
    return _combined(args[1:], operator.sub, as_number(args[0], "argument 1"), 2)


def _joined(array: Any, sep: Any, budget: RenderState) -> str:
    items = as_array(array, "the first argument")
    separator = as_string(sep, "the separator")
    pieces: list[str] = []
    for item in items:
        text = to_text(item)
        budget.spend(len(text) + len(separator))
        pieces.append(text)
    return separator.join(pieces)


def _op_concat(args: list[Any], budget: RenderState) -> Any:
    return _joined(args[0], args[1] if len(args) > 1 else "", budget)


def _op_join(args: list[Any], budget: RenderState) -> Any:
    return _joined(args[0], args[1], budget)


def _op_substring(args: list[Any], budget: RenderState) -> Any:
    text = as_string(args[0], "the first argument")
    start = as_index(args[1], "the start")
    end = as_index(args[2], "the end") if len(args) > 2 else len(text)
    if start > len(text):
        raise BadValue(f"the start {start} is past the end of the string ({len(text)} characters)")
    if end < start:
        raise BadValue(f"the end {end} is before the start {start}")
    return budget.produced(text[start:end])


def _text_method(method: Callable[[str], str], args: list[Any], budget: RenderState) -> Any:
    """An operator of one string argument that returns `method(argument)` (bound with `partial`)."""
    return budget.produced(method(as_string(args[0], "the argument")))


def _op_split(args: list[Any], budget: RenderState) -> Any:
    text = as_string(args[0], "the first argument")
    separator = as_string(args[1], "the separator")
    if not separator:
        raise BadValue("the separator is empty")
    budget.spend(len(text) + text.count(separator) + 1)
    return text.split(separator)


def _op_pick(args: list[Any], budget: RenderState) -> Any:
    value, key = args
    if isinstance(value, Mapping):
        if not isinstance(key, str):
            raise BadValue(f"an object is picked by a string key, not by {json_kind(key)}")
        if key not in value:
            raise BadValue(f"the object has no key {key!r}")
        return value[key]
    if isinstance(value, list | tuple | str):
        index = as_index(key, "the index")
        if index >= len(value):
            unit = "character" if isinstance(value, str) else "item"
            raise BadValue(f"index {index} is out of range ({counted(len(value), unit)})")
        return value[index]
    raise BadValue(f"the first argument is {json_kind(value)}; only an array, a string or an object can be picked from")


def _op_replace(args: list[Any], budget: RenderState) -> Any:
    text = as_string(args[0], "the first argument")
    find = as_string(args[1], "the text to find")
    replacement = as_string(args[2], "the replacement")
    if not find:
        raise BadValue("the text to find is empty")
    budget.spend(len(text) + text.count(find) * (len(replacement) - len(find)))
    return text.replace(find, replacement)


_DATE_TOKENS = ("YYYY", "YY", "MM", "DD", "HH", "mm", "ss")  # longest first: YYYY before YY


@lru_cache(maxsize=256)
def _date_format(pattern: str) -> tuple[tuple[bool, str], ...]:
    """The pattern as (is_token, text) pieces; anything that is not a token is literal text."""
    pieces: list[tuple[bool, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(pattern):
        token = next((t for t in _DATE_TOKENS if pattern.startswith(t, i)), None)
        if token is None:
            literal.append(pattern[i])
            i += 1
            continue
        if literal:
            pieces.append((False, "".join(literal)))
            literal = []
        pieces.append((True, token))
        i += len(token)
    if literal:
        pieces.append((False, "".join(literal)))
    return tuple(pieces)


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise BadValue("the date is a string that is not an ISO 8601 date or date-time") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise BadValue("the date is a number that is not a valid unix time in seconds") from None
    raise BadValue(f"the date is {json_kind(value)}, not an ISO 8601 string or a unix time")


_DATE_FIELDS: dict[str, Callable[[datetime], str]] = {
    "YYYY": lambda moment: f"{moment.year:04d}",
    "YY": lambda moment: f"{moment.year % 100:02d}",
    "MM": lambda moment: f"{moment.month:02d}",
    "DD": lambda moment: f"{moment.day:02d}",
    "HH": lambda moment: f"{moment.hour:02d}",
    "mm": lambda moment: f"{moment.minute:02d}",
    "ss": lambda moment: f"{moment.second:02d}",
}


def _op_dateformat(args: list[Any], budget: RenderState) -> Any:
    moment = _to_datetime(args[0])
    pattern = as_string(args[1], "the format")
    budget.spend(len(pattern))
    return "".join(_DATE_FIELDS[text](moment) if is_token else text for is_token, text in _date_format(pattern))


_ORDERINGS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


def compare(subject: Any, op: str, value: Any) -> bool:
    """`subject op value` with one of COMPARISONS ($Filter, $Find, and the conditions of features' events):
    `==`/`!=` compare JSON values exactly, the others two numbers or two strings (else BadValue)."""
    if op == "==":
        return same(subject, value)
    if op == "!=":
        return not same(subject, value)
    numbers = (
        isinstance(subject, int | float)
        and isinstance(value, int | float)
        and not isinstance(subject, bool)
        and not isinstance(value, bool)
    )
    if not numbers and not (isinstance(subject, str) and isinstance(value, str)):
        raise BadValue(f"cannot compare {json_kind(subject)} with {json_kind(value)} using {op}")
    return bool(_ORDERINGS[op](subject, value))


def _matches(args: list[Any]) -> Iterator[Any]:
    """The items of `$Filter`/`$Find`'s array that satisfy the condition, lazily, in order."""
    items = as_array(args[0], "the first argument")
    key: str | None = None
    if len(args) == 4:
        key = as_string(args[1], "the key")
    op, value = args[-2], args[-1]
    if not isinstance(op, str) or op not in COMPARISONS:
        raise BadValue("the comparison is not one of > < >= <= == !=")
    for position, item in enumerate(items):
        subject = item
        if key is not None:
            if not isinstance(item, Mapping):
                raise BadValue(f"item [{position}] is {json_kind(item)}, not an object with key {key!r}")
            if key not in item:
                continue
            subject = item[key]
        if compare(subject, op, value):
            yield item


def _op_filter(args: list[Any], budget: RenderState) -> Any:
    return list(_matches(args))


def _op_find(args: list[Any], budget: RenderState) -> Any:
    for item in _matches(args):
        return item
    raise BadValue("no item matches")


OPERATORS: Final[dict[str, tuple[OperatorFn, int, int | None]]] = {
    "Add": (_op_add, 2, None),
    "Subtract": (_op_subtract, 2, None),
    "Concat": (_op_concat, 1, 2),
    "Substring": (_op_substring, 2, 3),
    "Trim": (partial(_text_method, str.strip), 1, 1),
    "Split": (_op_split, 2, 2),
    "Pick": (_op_pick, 2, 2),
    "Join": (_op_join, 2, 2),
    "Uppercase": (partial(_text_method, str.upper), 1, 1),
    "Lowercase": (partial(_text_method, str.lower), 1, 1),
    "Dateformat": (_op_dateformat, 2, 2),
    "Replace": (_op_replace, 3, 3),
    "Filter": (_op_filter, 3, 4),
    "Find": (_op_find, 3, 4),
}
"""Operator name → (function, fewest arguments, most arguments or None for no limit)."""
OPERATOR_NAMES: Final = frozenset(OPERATORS)


def arity_text(low: int, high: int | None) -> str:
    """How many arguments an operator takes, in words: `2 or more arguments`, `1 or 2 arguments`."""
    if high is None:
        return f"{low} or more arguments"
    if low == high:
        return f"{low} argument{'s' if low != 1 else ''}"
    if high == low + 1:
        return f"{low} or {high} arguments"
    return f"{low} to {high} arguments"
