"""The selector and operator template engine shared by every resource kind.

A template is any JSON value whose strings may hold selectors (`$Input{body}{email}`, `$Secret{KEY}`, ...) and
operators (`$Uppercase($Trim($Input{name}))`). `compile_template` parses it once, when a manifest is applied, into a
small tree of nodes; `Template.render` evaluates that tree for each call against a `Scope`, without parsing again and
without regular expressions. Everything a template can say is checked at compile time (syntax, names of selectors
and operators, their arity, literal-only operator calls), so a call can only fail on data: a missing value or a bad
operator input, reported as a `RenderError` that names the selector. `docs/templates.md` is the user's reference.

Rendered values may share structure with the template and with the scope (a static template renders to the very
value it was compiled from; `$Input{body}` renders to the caller's object itself): treat them as read-only.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, cast

from pydantic import JsonValue

MAX_TEMPLATE_LENGTH: Final = 65_536
"""Characters in one template string."""
MAX_TEMPLATE_TOTAL_LENGTH: Final = 1_048_576
"""Characters in all the strings of one compiled value."""
MAX_NESTING: Final = 32
"""Levels of operators and array literals inside one another."""
MAX_VALUE_DEPTH: Final = 64
"""Levels of objects and arrays in a compiled value."""
MAX_RENDERED_LENGTH: Final = 1_048_576
"""Characters one render may produce (interpolated text, operator results); values passed through are not counted."""

SELECTOR_KINDS: Final = frozenset(
    {"Input", "Secret", "Session", "Auth", "Variable", "Constant", "Sequence", "Default", "Response"}
)
AUTH_PARTS: Final = frozenset({"headers", "query", "body", "params"})
RESPONSE_PARTS: Final = frozenset({"status", "headers", "body"})
COMPARISONS: Final = frozenset({">", "<", ">=", "<=", "==", "!="})
SECRET_KINDS: Final = frozenset({"Secret", "Auth", "Response"})
"""Selectors whose values are secret: secrets, auth values (minted tokens included), a login response. Errors
about them, or about anything computed from them, withhold what went wrong."""
SENSITIVE_KINDS: Final = SECRET_KINDS | {"Session"}
"""Selectors whose values are redacted from what is recorded about a call: the secret ones and the session's data
(which the caller may show in its own errors, but the processor never records)."""

_SELECTOR_NAMES = SELECTOR_KINDS | {"Token"}
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_NAME_CHARS = _ASCII_LETTERS | _DIGITS | {"_"}
_SPACE = frozenset(" \t\r\n")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_MAX_NUMBER_LENGTH = 400
_MAX_INDEX_DIGITS = 9
_MAX_EXACT_FLOAT = 2**53


# ---------------------------------------------------------------------------------------------------------------
# Errors


class TemplateError(ValueError):
    """A template that cannot be compiled: bad syntax, an unknown selector or operator, a wrong number of arguments.

    `path` is where the template sits in the manifest (given by the caller of `compile_template`), `position` the
    offset of the offending text in the template string, `reason` the problem alone.
    """

    def __init__(self, reason: str, *, path: str = "", position: int | None = None, text: str = "") -> None:
        self.reason = reason
        self.path = path
        self.position = position
        self.text = text
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.path}: " if self.path else ""
        if self.position is None:
            return f"{where}{self.reason}"
        return f"{where}{self.reason} (at position {self.position} of {_snippet(self.text, self.position)})"


class RenderError(Exception):
    """A template that cannot be rendered for this call: a selector found nothing, or an operator got bad input.

    `selector` is the selector or operator expression as written (`$Input{body}{email}`), `message` says why, and
    `path` is where the template sits in the manifest. Messages name keys and types, never values.
    """

    def __init__(self, selector: str, message: str, path: str = "") -> None:
        super().__init__(selector, message)
        self.selector = selector
        self.message = message
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        selector = self.selector if len(self.selector) <= 200 else self.selector[:199] + "…"
        return f"{where}{selector}: {self.message}"


class _Bad(Exception):
    """Raised by operators and value conversions; the node that knows its own text turns it into a RenderError."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _snippet(text: str, position: int) -> str:
    start = max(0, position - 30)
    end = min(len(text), position + 30)
    return ("…" if start else "") + repr(text[start:end]) + ("…" if end < len(text) else "")


# ---------------------------------------------------------------------------------------------------------------
# Taint


class Taint:
    """The texts of a call's rendered values that derive from sensitive selectors (`SENSITIVE_KINDS`).

    Give one to the renders of a call through `Scope.taint`: each render adds the text of every value it read from
    a sensitive selector, of every operator result computed from one, and of every text with one inside. What is
    recorded about the call (its URL, query, headers) is then redacted by what it was built from, not by patterns:
    any part that contains a tainted text is shown as `[redacted]`. A value the caller's input holds is tainted too
    when it is a tainted text (a credential auth's login input, rendered from secrets, is its login action's input).
    """

    __slots__ = ("texts",)

    def __init__(self) -> None:
        self.texts: set[str] = set()

    def add(self, value: Any) -> None:
        """Taint the text of `value`, or of each of its leaves for an object or an array."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, Mapping):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
            elif isinstance(item, str):
                if item:
                    self.texts.add(item)
                    if '"' in item or "\\" in item or not item.isprintable():
                        # As it reads inside JSON text (an object sent as one parameter).
                        self.texts.add(json.dumps(item, ensure_ascii=False)[1:-1])
            elif isinstance(item, int | float) and not isinstance(item, bool):
                with contextlib.suppress(_Bad, ValueError):
                    self.texts.add(_to_text(item))

    def touches(self, text: str) -> bool:
        """True when `text` contains a tainted text."""
        return any(tainted in text for tainted in self.texts)


# ---------------------------------------------------------------------------------------------------------------
# Scope


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


# ---------------------------------------------------------------------------------------------------------------
# Values: type names, text, numbers


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


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(type(value).__name__)


def _float_text(value: float) -> str:
    if not math.isfinite(value):
        raise _Bad("a number is not finite")
    if value.is_integer() and abs(value) < _MAX_EXACT_FLOAT:
        return str(int(value))
    return repr(value)


def _to_text(value: Any) -> str:
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
            raise _Bad("a number has too many digits to be written") from None
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Mapping | list | tuple):
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
        except (TypeError, ValueError):
            raise _Bad(f"{json_kind(value)} holds a value that is not JSON") from None
        except RecursionError:
            raise _Bad(f"{json_kind(value)} is nested too deeply to be written") from None
    raise _Bad(f"{json_kind(value)} is not a JSON value")


def _scan_number(text: str, start: int) -> int:
    """End of the JSON-style number starting at `start` (`-12`, `3.5`, `1e9`), or `start` when there is none."""
    n = len(text)
    i = start
    if i < n and text[i] == "-":
        i += 1
    digits = i
    while i < n and text[i] in _DIGITS:
        i += 1
    if i == digits:
        return start
    if i < n and text[i] == ".":
        j = i + 1
        while j < n and text[j] in _DIGITS:
            j += 1
        if j == i + 1:
            return start
        i = j
    if i < n and text[i] in "eE":
        j = i + 1
        if j < n and text[j] in "+-":
            j += 1
        exponent = j
        while j < n and text[j] in _DIGITS:
            j += 1
        if j == exponent:
            return start
        i = j
    return i


def _number_value(literal: str) -> int | float | None:
    """The number a complete numeric literal denotes, or None when it is too long or out of range."""
    if len(literal) > _MAX_NUMBER_LENGTH:
        return None
    if any(c in ".eE" for c in literal):
        value = float(literal)
        return value if math.isfinite(value) else None
    return int(literal)


def _parse_number_text(text: str) -> int | float | None:
    if not text or len(text) > _MAX_NUMBER_LENGTH or _scan_number(text, 0) != len(text):
        return None
    return _number_value(text)


def _number(value: Any, what: str) -> int | float:
    """A number operand: a JSON number, or a string holding one (`"12"`)."""
    if isinstance(value, bool) or value is None:
        raise _Bad(f"{what} is {json_kind(value)}, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(f"{what} is not a finite number")
        return value
    if isinstance(value, str):
        parsed = _parse_number_text(value)
        if parsed is None:
            raise _Bad(f"{what} is a string that is not a number")
        return parsed
    raise _Bad(f"{what} is {json_kind(value)}, not a number")


def _index(value: Any, what: str) -> int:
    """A position: a whole number ≥ 0 (`2`, `2.0` or `"2"`)."""
    number = _number(value, what)
    if isinstance(number, float):
        if not number.is_integer():
            raise _Bad(f"{what} is not a whole number")
        number = int(number)
    if number < 0:
        raise _Bad(f"{what} is negative")
    return number


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is {json_kind(value)}, not a string")
    return value


def _array(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _Bad(f"{what} is {json_kind(value)}, not an array")
    return value


def _checked(result: int | float) -> int | float:
    if isinstance(result, float) and not math.isfinite(result):
        raise _Bad("the result is out of range")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Render budget


class _Render:
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
        self.left -= amount
        if self.left < 0:
            raise _Bad(f"the rendered value would exceed the limit of {MAX_RENDERED_LENGTH} characters")


# ---------------------------------------------------------------------------------------------------------------
# Operators: each takes its evaluated arguments and the budget; arity is checked at compile time.

_OperatorFn = Callable[[list[Any], _Render], Any]


def _op_add(args: list[Any], budget: _Render) -> Any:
    try:
        total: int | float = 0
        for position, arg in enumerate(args, start=1):
            total = total + _number(arg, f"argument {position}")
        return _checked(total)
    except OverflowError:
        raise _Bad("the result is out of range") from None


def _op_subtract(args: list[Any], budget: _Render) -> Any:
    try:
        total = _number(args[0], "argument 1")
        for position, arg in enumerate(args[1:], start=2):
            total = total - _number(arg, f"argument {position}")
        return _checked(total)
    except OverflowError:
        raise _Bad("the result is out of range") from None


def _joined(array: Any, sep: Any, budget: _Render) -> str:
    items = _array(array, "the first argument")
    separator = _string(sep, "the separator")
    pieces: list[str] = []
    for item in items:
        text = _to_text(item)
        budget.spend(len(text) + len(separator))
        pieces.append(text)
    return separator.join(pieces)


def _op_concat(args: list[Any], budget: _Render) -> Any:
    return _joined(args[0], args[1] if len(args) > 1 else "", budget)


def _op_join(args: list[Any], budget: _Render) -> Any:
    return _joined(args[0], args[1], budget)


def _op_substring(args: list[Any], budget: _Render) -> Any:
    text = _string(args[0], "the first argument")
    start = _index(args[1], "the start")
    end = _index(args[2], "the end") if len(args) > 2 else len(text)
    if start > len(text):
        raise _Bad(f"the start {start} is past the end of the string ({len(text)} characters)")
    if end < start:
        raise _Bad(f"the end {end} is before the start {start}")
    result = text[start:end]
    budget.spend(len(result))
    return result


def _op_trim(args: list[Any], budget: _Render) -> Any:
    result = _string(args[0], "the argument").strip()
    budget.spend(len(result))
    return result


def _op_split(args: list[Any], budget: _Render) -> Any:
    text = _string(args[0], "the first argument")
    separator = _string(args[1], "the separator")
    if not separator:
        raise _Bad("the separator is empty")
    budget.spend(len(text) + text.count(separator) + 1)
    return text.split(separator)


def _op_pick(args: list[Any], budget: _Render) -> Any:
    value, key = args
    if isinstance(value, Mapping):
        if not isinstance(key, str):
            raise _Bad(f"an object is picked by a string key, not by {json_kind(key)}")
        if key not in value:
            raise _Bad(f"the object has no key {key!r}")
        return value[key]
    if isinstance(value, list | tuple | str):
        index = _index(key, "the index")
        if index >= len(value):
            unit = "character" if isinstance(value, str) else "item"
            raise _Bad(f"index {index} is out of range ({_count(len(value), unit)})")
        return value[index]
    raise _Bad(f"the first argument is {json_kind(value)}; only an array, a string or an object can be picked from")


def _op_uppercase(args: list[Any], budget: _Render) -> Any:
    result = _string(args[0], "the argument").upper()
    budget.spend(len(result))
    return result


def _op_lowercase(args: list[Any], budget: _Render) -> Any:
    result = _string(args[0], "the argument").lower()
    budget.spend(len(result))
    return result


def _op_replace(args: list[Any], budget: _Render) -> Any:
    text = _string(args[0], "the first argument")
    find = _string(args[1], "the text to find")
    replacement = _string(args[2], "the replacement")
    if not find:
        raise _Bad("the text to find is empty")
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
            raise _Bad("the date is a string that is not an ISO 8601 date or date-time") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise _Bad("the date is a number that is not a valid unix time in seconds") from None
    raise _Bad(f"the date is {json_kind(value)}, not an ISO 8601 string or a unix time")


_DATE_FIELDS: dict[str, Callable[[datetime], str]] = {
    "YYYY": lambda moment: f"{moment.year:04d}",
    "YY": lambda moment: f"{moment.year % 100:02d}",
    "MM": lambda moment: f"{moment.month:02d}",
    "DD": lambda moment: f"{moment.day:02d}",
    "HH": lambda moment: f"{moment.hour:02d}",
    "mm": lambda moment: f"{moment.minute:02d}",
    "ss": lambda moment: f"{moment.second:02d}",
}


def _op_dateformat(args: list[Any], budget: _Render) -> Any:
    moment = _to_datetime(args[0])
    pattern = _string(args[1], "the format")
    budget.spend(len(pattern))
    return "".join(_DATE_FIELDS[text](moment) if is_token else text for is_token, text in _date_format(pattern))


def _same(a: Any, b: Any) -> bool:
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
        return len(a) == len(b) and all(key in b and _same(value, b[key]) for key, value in a.items())
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def _compare(subject: Any, op: str, value: Any) -> bool:
    if op == "==":
        return _same(subject, value)
    if op == "!=":
        return not _same(subject, value)
    numbers = (
        isinstance(subject, int | float)
        and isinstance(value, int | float)
        and not isinstance(subject, bool)
        and not isinstance(value, bool)
    )
    if not numbers and not (isinstance(subject, str) and isinstance(value, str)):
        raise _Bad(f"cannot compare {json_kind(subject)} with {json_kind(value)} using {op}")
    if op == ">":
        return bool(subject > value)
    if op == "<":
        return bool(subject < value)
    if op == ">=":
        return bool(subject >= value)
    return bool(subject <= value)


def _matches(args: list[Any]) -> Iterator[Any]:
    """The items of `$Filter`/`$Find`'s array that satisfy the condition, lazily, in order."""
    items = _array(args[0], "the first argument")
    key: str | None = None
    if len(args) == 4:
        key = _string(args[1], "the key")
    op, value = args[-2], args[-1]
    if not isinstance(op, str) or op not in COMPARISONS:
        raise _Bad("the comparison is not one of > < >= <= == !=")
    for position, item in enumerate(items):
        subject = item
        if key is not None:
            if not isinstance(item, Mapping):
                raise _Bad(f"item [{position}] is {json_kind(item)}, not an object with key {key!r}")
            if key not in item:
                continue
            subject = item[key]
        if _compare(subject, op, value):
            yield item


def _op_filter(args: list[Any], budget: _Render) -> Any:
    return list(_matches(args))


def _op_find(args: list[Any], budget: _Render) -> Any:
    for item in _matches(args):
        return item
    raise _Bad("no item matches")


_OPERATORS: dict[str, tuple[_OperatorFn, int, int | None]] = {
    "Add": (_op_add, 2, None),
    "Subtract": (_op_subtract, 2, None),
    "Concat": (_op_concat, 1, 2),
    "Substring": (_op_substring, 2, 3),
    "Trim": (_op_trim, 1, 1),
    "Split": (_op_split, 2, 2),
    "Pick": (_op_pick, 2, 2),
    "Join": (_op_join, 2, 2),
    "Uppercase": (_op_uppercase, 1, 1),
    "Lowercase": (_op_lowercase, 1, 1),
    "Dateformat": (_op_dateformat, 2, 2),
    "Replace": (_op_replace, 3, 3),
    "Filter": (_op_filter, 3, 4),
    "Find": (_op_find, 3, 4),
}
OPERATOR_NAMES: Final = frozenset(_OPERATORS)
_KNOWN_NAMES = _SELECTOR_NAMES | OPERATOR_NAMES
_BY_LOWER_NAME = {name.lower(): name for name in _KNOWN_NAMES}


def _arity(low: int, high: int | None) -> str:
    if high is None:
        return f"{low} or more arguments"
    if low == high:
        return f"{low} argument{'s' if low != 1 else ''}"
    if high == low + 1:
        return f"{low} or {high} arguments"
    return f"{low} to {high} arguments"


# ---------------------------------------------------------------------------------------------------------------
# Expression nodes


class _Node(abc.ABC):
    """One expression; `text` is the expression as written, for error messages."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @abc.abstractmethod
    def eval(self, scope: Scope, budget: _Render) -> Any:
        """The expression's value for this scope."""


class _Literal(_Node):
    __slots__ = ("value",)

    def __init__(self, text: str, value: Any) -> None:
        super().__init__(text)
        self.value = value

    def eval(self, scope: Scope, budget: _Render) -> Any:
        return self.value


class _ArrayLiteral(_Node):
    __slots__ = ("items",)

    def __init__(self, text: str, items: tuple[_Node, ...]) -> None:
        super().__init__(text)
        self.items = items

    def eval(self, scope: Scope, budget: _Render) -> Any:
        return [item.eval(scope, budget) for item in self.items]


def _root_input(scope: Scope) -> Any:
    return scope.input


def _root_variables(scope: Scope) -> Any:
    return scope.variables


def _root_constants(scope: Scope) -> Any:
    return scope.constants


def _root_auth(scope: Scope) -> Any:
    return scope.auth


def _root_sequence(scope: Scope) -> Any:
    return scope.sequence


def _root_session(scope: Scope) -> Any:
    if scope.session is None:
        raise _Bad("the call carries no session")
    return scope.session


def _root_response(scope: Scope) -> Any:
    if scope.response is None:
        raise _Bad("there is no login response here ($Response is read by an auth's headers, query and body)")
    return scope.response


def _root_default(scope: Scope) -> Any:
    if scope.default is NO_DEFAULT:
        raise _Bad("this field has no default value")
    return scope.default


_ROOTS: dict[str, Callable[[Scope], Any]] = {
    "Input": _root_input,
    "Variable": _root_variables,
    "Constant": _root_constants,
    "Auth": _root_auth,
    "Sequence": _root_sequence,
    "Session": _root_session,
    "Response": _root_response,
    "Default": _root_default,
}


def _key_text(key: str | int) -> str:
    return f"{{[{key}]}}" if isinstance(key, int) else f"{{{key}}}"


class _Selector(_Node):
    __slots__ = ("keys", "name", "root", "secret", "sensitive")

    def __init__(self, text: str, name: str, keys: tuple[str | int, ...]) -> None:
        super().__init__(text)
        self.name = name
        self.keys = keys
        self.root = _ROOTS[name]
        self.secret = name in SECRET_KINDS
        self.sensitive = name in SENSITIVE_KINDS

    def _prefix(self, count: int) -> str:
        return "$" + self.name + "".join(_key_text(key) for key in self.keys[:count])

    def eval(self, scope: Scope, budget: _Render) -> Any:
        try:
            value = self.root(scope)
        except _Bad as exc:
            raise RenderError(self.text, exc.message) from None
        for count, key in enumerate(self.keys):
            # Fast paths for the JSON shapes of nearly every call; the checks below say what went wrong.
            kind = type(value)
            if (kind is dict and type(key) is str and key in value) or (
                kind is list and type(key) is int and key < len(value)
            ):
                value = value[key]
            else:
                value = self._step(value, count, key)
        if self.secret or (scope.taint is not None and type(value) is str and value in scope.taint.texts):
            budget.taint(scope, self.text, value)
        elif self.sensitive and scope.taint is not None:
            scope.taint.add(value)
        return value

    def _step(self, value: Any, count: int, key: str | int) -> Any:
        if isinstance(key, int):
            if not isinstance(value, list | tuple):
                raise RenderError(
                    self.text, f"{self._prefix(count)} is {json_kind(value)}, not an array: [{key}] cannot index it"
                )
            if key >= len(value):
                # The length of a sensitive array (a token's parts) is withheld like its values.
                size = "fewer items" if self.secret else _count(len(value), "item")
                raise RenderError(self.text, f"{self._prefix(count)} has {size}: [{key}] is out of range")
            return value[key]
        if not isinstance(value, Mapping):
            raise RenderError(self.text, f"{self._prefix(count)} is {json_kind(value)}, not an object")
        if key not in value:
            raise RenderError(self.text, f"{self._prefix(count)} has no key {key!r}")
        return value[key]


class _Secret(_Node):
    __slots__ = ("secret",)

    def __init__(self, text: str, secret: str) -> None:
        super().__init__(text)
        self.secret = secret

    def eval(self, scope: Scope, budget: _Render) -> Any:
        value = scope.secrets(self.secret)
        if value is None:
            raise RenderError(self.text, f"secret {self.secret} is not defined")
        budget.taint(scope, self.text, value)
        return value


def _withheld(operator: str, sources: list[str]) -> str:
    """An operator's error about a sensitive value: which operator and which selectors, never what went wrong."""
    read = ", ".join(dict.fromkeys(sources))
    return f"{operator} cannot use the value of {read} (the reason is withheld: it could reveal the value)"


class _Operator(_Node):
    __slots__ = ("args", "fn")

    def __init__(self, text: str, fn: _OperatorFn, args: tuple[_Node, ...]) -> None:
        super().__init__(text)
        self.fn = fn
        self.args = args

    def eval(self, scope: Scope, budget: _Render) -> Any:
        read = len(budget.sources)
        args = [arg.eval(scope, budget) for arg in self.args]
        try:
            result = self.fn(args, budget)
        except _Bad as exc:
            if len(budget.sources) > read:
                raise RenderError(self.text, _withheld(self.name, budget.sources[read:])) from None
            raise RenderError(self.text, exc.message) from None
        except RecursionError:
            raise RenderError(self.text, "a value is nested too deeply") from None
        if len(budget.sources) > read and scope.taint is not None:
            scope.taint.add(result)
        return result

    @property
    def name(self) -> str:
        """The operator as written, `$Substring`."""
        return self.text[: self.text.index("(")]


# ---------------------------------------------------------------------------------------------------------------
# Renderers: the compiled shape of a JSON value


class _Renderer(abc.ABC):
    __slots__ = ()

    @abc.abstractmethod
    def render(self, scope: Scope, budget: _Render) -> Any:
        """The compiled value for this scope."""


class _Constant(_Renderer):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def render(self, scope: Scope, budget: _Render) -> Any:
        return self.value


class _Whole(_Renderer):
    """A string that is exactly one expression: renders to that expression's own value and type."""

    __slots__ = ("node", "path")

    def __init__(self, node: _Node, path: str) -> None:
        self.node = node
        self.path = path

    def render(self, scope: Scope, budget: _Render) -> Any:
        try:
            return self.node.eval(scope, budget)
        except RenderError as exc:
            exc.path = exc.path or self.path
            raise


class _Text(_Renderer):
    """Text with expressions inside: each expression's value is written as text."""

    __slots__ = ("fixed", "parts", "path")

    def __init__(self, parts: tuple[str | _Node, ...], path: str) -> None:
        self.parts = parts
        self.path = path
        self.fixed = sum(len(part) for part in parts if isinstance(part, str))

    def render(self, scope: Scope, budget: _Render) -> Any:
        out: list[str] = []
        current: _Node | None = None
        read = len(budget.sources)
        try:
            budget.spend(self.fixed)
            for part in self.parts:
                if isinstance(part, str):
                    out.append(part)
                    continue
                current = part
                before = len(budget.sources)
                value = part.eval(scope, budget)
                if len(budget.sources) > before:
                    try:
                        text = _to_text(value)
                    except _Bad:
                        raise RenderError(
                            part.text, "cannot be written as text (the reason is withheld: it could reveal the value)"
                        ) from None
                else:
                    text = _to_text(value)
                budget.spend(len(text))
                out.append(text)
        except _Bad as exc:
            node = current or next(part for part in self.parts if isinstance(part, _Node))
            raise RenderError(node.text, exc.message, self.path) from None
        except RenderError as exc:
            exc.path = exc.path or self.path
            raise
        rendered = "".join(out)
        if len(budget.sources) > read and scope.taint is not None:
            scope.taint.add(rendered)
        return rendered


class _Object(_Renderer):
    __slots__ = ("items",)

    def __init__(self, items: tuple[tuple[str, _Renderer], ...]) -> None:
        self.items = items

    def render(self, scope: Scope, budget: _Render) -> Any:
        return {key: renderer.render(scope, budget) for key, renderer in self.items}


class _Array(_Renderer):
    __slots__ = ("items",)

    def __init__(self, items: tuple[_Renderer, ...]) -> None:
        self.items = items

    def render(self, scope: Scope, budget: _Render) -> Any:
        return [renderer.render(scope, budget) for renderer in self.items]


# ---------------------------------------------------------------------------------------------------------------
# Compiled templates


@dataclass(frozen=True, slots=True)
class Reference:
    """One selector used by a template, for checks at apply time (does that auth, constant or step exist?)."""

    kind: str
    """The selector kind (`Input`, `Secret`, ...); `$Token` is reported as `Secret`."""
    keys: tuple[str | int, ...]
    """The keys after the selector name; an `{[n]}` index is an int."""
    text: str
    """The selector as written."""
    path: str
    """Where the template string sits in the manifest."""


class Template:
    """A compiled template: render it once per call with `render(scope)`."""

    __slots__ = ("_renderer", "_value", "path", "references", "secret_names", "selectors")

    def __init__(self, renderer: _Renderer, path: str, references: tuple[Reference, ...]) -> None:
        self._renderer: _Renderer | None = None if isinstance(renderer, _Constant) else renderer
        self._value: Any = renderer.value if isinstance(renderer, _Constant) else None
        self.path = path
        self.references = references
        self.selectors: frozenset[str] = frozenset(ref.kind for ref in references)
        self.secret_names: frozenset[str] = frozenset(str(ref.keys[0]) for ref in references if ref.kind == "Secret")

    @property
    def is_static(self) -> bool:
        """True when the template reads nothing: `render` returns the same value every time, without work."""
        return self._renderer is None

    def render(self, scope: Scope) -> JsonValue:
        """The template's value for this scope; raises `RenderError` when a selector or an operator fails."""
        if self._renderer is None:
            return cast(JsonValue, self._value)
        return cast(JsonValue, self._renderer.render(scope, _Render()))

    def __repr__(self) -> str:
        return f"Template(path={self.path!r}, selectors={sorted(self.selectors)!r})"


def compile_template(value: JsonValue, path: str = "") -> Template:
    """Parse a JSON value whose strings may hold selectors and operators; `path` locates it in the manifest.

    Raises `TemplateError` for anything that cannot be right whatever the call's data.
    """
    compiler = _Compiler()
    renderer = compiler.value(value, path, 0)
    return Template(renderer, path, tuple(compiler.references))


def _child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Compiler:
    """Walks a JSON value, parsing its strings; collects the references and the total length."""

    def __init__(self) -> None:
        self.references: list[Reference] = []
        self.length = 0

    def value(self, value: Any, path: str, depth: int) -> _Renderer:
        if isinstance(value, str):
            return self.string(value, path)
        if value is None or isinstance(value, bool | int | float):
            return _Constant(value)
        if depth >= MAX_VALUE_DEPTH:
            raise TemplateError(f"objects and arrays are nested more than {MAX_VALUE_DEPTH} levels deep", path=path)
        if isinstance(value, dict):
            items: list[tuple[str, _Renderer]] = []
            for key, child in value.items():
                if not isinstance(key, str):
                    raise TemplateError(f"an object key must be a string, not {json_kind(key)}", path=path)
                items.append((key, self.value(child, _child_path(path, key), depth + 1)))
            if all(isinstance(renderer, _Constant) for _, renderer in items):
                rendered = {key: cast(_Constant, renderer).value for key, renderer in items}
                same = all(rendered[key] is original for key, original in value.items())
                return _Constant(value if same else rendered)
            return _Object(tuple(items))
        if isinstance(value, list):
            renderers = [self.value(child, _child_path(path, index), depth + 1) for index, child in enumerate(value)]
            if all(isinstance(renderer, _Constant) for renderer in renderers):
                values = [cast(_Constant, renderer).value for renderer in renderers]
                same = all(new is old for new, old in zip(values, value, strict=True))
                return _Constant(value if same else values)
            return _Array(tuple(renderers))
        raise TemplateError(f"{json_kind(value)} is not a JSON value", path=path)

    def string(self, text: str, path: str) -> _Renderer:
        if len(text) > MAX_TEMPLATE_LENGTH:
            raise TemplateError(f"a template string is longer than {MAX_TEMPLATE_LENGTH} characters", path=path)
        self.length += len(text)
        if self.length > MAX_TEMPLATE_TOTAL_LENGTH:
            raise TemplateError(f"the template is longer than {MAX_TEMPLATE_TOTAL_LENGTH} characters", path=path)
        if "$" not in text:
            return _Constant(text)
        parts = _Parser(text, path, self.references).parse()
        if len(parts) == 1 and isinstance(parts[0], _Node):
            node = parts[0]
            return _Constant(node.value) if isinstance(node, _Literal) else _Whole(node, path)
        merged: list[str | _Node] = []
        for part in parts:
            if isinstance(part, _Literal):
                literal = part
                try:
                    part = _to_text(literal.value)
                except _Bad as exc:
                    raise TemplateError(f"{literal.text}: {exc.message}", path=path) from None
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            elif part != "":
                merged.append(part)
        if not merged:
            return _Constant("")
        if len(merged) == 1 and isinstance(merged[0], str):
            return _Constant(merged[0])
        return _Text(tuple(merged), path)


_FOLD_SCOPE = Scope()


def _is_secret_name(name: str) -> bool:
    # The same rule as manifest.SECRET_NAME, without importing the manifest (which may come to import this module).
    return (
        0 < len(name) <= 128 and (name[0] in _ASCII_LETTERS or name[0] == "_") and all(c in _NAME_CHARS for c in name)
    )


class _Parser:
    """Parses one template string into literal text and expression nodes."""

    def __init__(self, text: str, path: str, references: list[Reference]) -> None:
        self.s = text
        self.n = len(text)
        self.path = path
        self.references = references

    def error(self, reason: str, position: int) -> TemplateError:
        return TemplateError(reason, path=self.path, position=position, text=self.s)

    def parse(self) -> list[str | _Node]:
        s, n = self.s, self.n
        parts: list[str | _Node] = []
        text: list[str] = []
        i = 0
        while True:
            j = s.find("$", i)
            if j < 0:
                text.append(s[i:])
                break
            text.append(s[i:j])
            if j + 1 < n and s[j + 1] == "$":
                text.append("$")
                i = j + 2
                continue
            end = self.name_end(j + 1)
            name = s[j + 1 : end]
            if name in _KNOWN_NAMES:
                node, i = self.expression(j, name, end, 0)
                parts.append("".join(text))
                text = []
                parts.append(node)
                continue
            if name and end < n and s[end] in "{(":
                self.unknown(name, j, s[end])
            text.append(s[j:end] if name else "$")
            i = end if name else j + 1
        parts.append("".join(text))
        return [part for part in parts if part != ""]

    def name_end(self, i: int) -> int:
        s, n = self.s, self.n
        if i < n and s[i] in _ASCII_LETTERS:
            i += 1
            while i < n and s[i] in _NAME_CHARS:
                i += 1
        return i

    def unknown(self, name: str, position: int, bracket: str) -> None:
        """Refuse `$Name{` / `$Name(` with an unknown name; a lowercase name with no near match is plain text."""
        kind = "selector" if bracket == "{" else "operator"
        near = _BY_LOWER_NAME.get(name.lower())
        if near is not None:
            raise self.error(f"unknown {kind} ${name} (names are case-sensitive: did you mean ${near}?)", position)
        if name[0].isupper():
            known = ", ".join(
                f"${known}" for known in sorted(_SELECTOR_NAMES if kind == "selector" else OPERATOR_NAMES)
            )
            raise self.error(f"unknown {kind} ${name} (known: {known}; write $$ for a literal $)", position)

    def skip_space(self, i: int) -> int:
        while i < self.n and self.s[i] in _SPACE:
            i += 1
        return i

    def expression(self, start: int, name: str, end: int, depth: int) -> tuple[_Node, int]:
        if name in _OPERATORS:
            return self.operator(start, name, end, depth)
        return self.selector(start, name, end)

    def selector(self, start: int, name: str, i: int) -> tuple[_Node, int]:
        s, n = self.s, self.n
        keys: list[str | int] = []
        while i < n and s[i] == "{":
            close = s.find("}", i + 1)
            if close < 0:
                raise self.error(f"${name}: '{{' is never closed", i)
            key = s[i + 1 : close]
            if "{" in key:
                raise self.error(f"${name}: a key may not contain '{{'", i + 1 + key.index("{"))
            if not key:
                raise self.error(f"${name}: empty key {{}}", i)
            if key[0] == "[":
                digits = key[1:-1] if key[-1] == "]" else ""
                if not digits or len(digits) > _MAX_INDEX_DIGITS or any(c not in _DIGITS for c in digits):
                    raise self.error(f"${name}: {{{key}}} is not an array index such as {{[0]}}", i)
                keys.append(int(digits))
            else:
                keys.append(key)
            i = close + 1
        text = s[start:i]
        kind = "Secret" if name == "Token" else name
        self.check_selector(kind, name, keys, start)
        node: _Node = _Secret(text, str(keys[0])) if kind == "Secret" else _Selector(text, name, tuple(keys))
        self.references.append(Reference(kind, tuple(keys), text, self.path))
        return node, i

    def check_selector(self, kind: str, name: str, keys: list[str | int], position: int) -> None:
        names = [key for key in keys[:2] if isinstance(key, str)]
        if kind == "Default":
            if keys:
                raise self.error("$Default takes no keys", position)
        elif kind == "Secret":
            if len(keys) != 1 or not isinstance(keys[0], str) or not _is_secret_name(keys[0]):
                raise self.error(
                    f"${name}{{NAME}} names one secret: letters, digits and '_', not starting with a digit, "
                    "at most 128 characters",
                    position,
                )
        elif kind in ("Variable", "Constant"):
            if len(names) < 2:
                raise self.error(f"${name} needs an app tag and a key: ${name}{{app}}{{key}}", position)
        elif kind == "Auth":
            if len(names) < 2 or names[1] not in AUTH_PARTS:
                raise self.error(
                    "$Auth needs an auth tag and a part (headers, query, body or params): $Auth{tag}{headers}{key}",
                    position,
                )
        elif kind == "Sequence":
            if len(names) < 2:
                raise self.error("$Sequence needs a sequence and an event tag: $Sequence{seq}{event}{key}", position)
        elif kind == "Response" and keys and keys[0] not in RESPONSE_PARTS:
            raise self.error("$Response reads {status}, {headers} or {body} of the login response", position)

    def operator(self, start: int, name: str, i: int, depth: int) -> tuple[_Node, int]:
        if depth >= MAX_NESTING:
            raise self.error(f"operators and arrays are nested more than {MAX_NESTING} levels deep", start)
        if i >= self.n or self.s[i] != "(":
            raise self.error(f"${name} is an operator: write ${name}(…)", start)
        args, end = self.arguments(i + 1, depth + 1, ")", i)
        fn, low, high = _OPERATORS[name]
        if len(args) < low or (high is not None and len(args) > high):
            raise self.error(f"${name} takes {_arity(low, high)}, not {len(args)}", start)
        if name in ("Filter", "Find"):
            op = args[-2]
            if isinstance(op, _Literal) and (not isinstance(op.value, str) or op.value not in COMPARISONS):
                raise self.error(f"${name}: the comparison must be one of > < >= <= == !=, not {op.text}", start)
        node = _Operator(self.s[start:end], fn, tuple(args))
        if all(isinstance(arg, _Literal) for arg in args):
            return self.fold(node, start), end
        return node, end

    def fold(self, node: _Node, position: int) -> _Literal:
        """Evaluate an expression of literals now: its errors become compile errors, its renders cost nothing."""
        try:
            return _Literal(node.text, node.eval(_FOLD_SCOPE, _Render()))
        except RenderError as exc:
            raise self.error(f"{exc.selector}: {exc.message}", position) from None

    def arguments(self, i: int, depth: int, close: str, opened: int) -> tuple[list[_Node], int]:
        items: list[_Node] = []
        i = self.skip_space(i)
        if i < self.n and self.s[i] == close:
            return items, i + 1
        while True:
            node, i = self.argument(i, depth)
            items.append(node)
            i = self.skip_space(i)
            if i >= self.n:
                raise self.error(f"'{'(' if close == ')' else '['}' is never closed by '{close}'", opened)
            c = self.s[i]
            if c == ",":
                i = self.skip_space(i + 1)
                continue
            if c == close:
                return items, i + 1
            raise self.error(f"expected ',' or '{close}', found {c!r}", i)

    def argument(self, i: int, depth: int) -> tuple[_Node, int]:
        s, n = self.s, self.n
        if i >= n:
            raise self.error("expected a value, found the end of the text", i)
        c = s[i]
        if c == "$":
            end = self.name_end(i + 1)
            name = s[i + 1 : end]
            if name in _KNOWN_NAMES:
                return self.expression(i, name, end, depth)
            if name and end < n and s[end] in "{(":
                self.unknown(name, i, s[end])
            raise self.error(f'{s[i:end]!r} is not a selector or an operator (quote text as "…")', i)
        if c in "\"'":
            return self.string_literal(i)
        if c == "[":
            if depth >= MAX_NESTING:
                raise self.error(f"operators and arrays are nested more than {MAX_NESTING} levels deep", i)
            items, end = self.arguments(i + 1, depth + 1, "]", i)
            node: _Node = _ArrayLiteral(s[i:end], tuple(items))
            if all(isinstance(item, _Literal) for item in items):
                node = self.fold(node, i)
            return node, end
        if c == "-" or c in _DIGITS:
            end = _scan_number(s, i)
            if end == i:
                raise self.error(f"malformed number starting with {c!r}", i)
            value = _number_value(s[i:end])
            if value is None:
                raise self.error(f"the number {s[i:end][:40]!r} is too long or out of range", i)
            return _Literal(s[i:end], value), end
        end = self.name_end(i)
        word = s[i:end]
        if word in ("true", "false", "null"):
            return _Literal(word, {"true": True, "false": False, "null": None}[word]), end
        found = repr(word) if word else repr(c)
        raise self.error(
            f"expected a value (a selector, an operator, a quoted string, a number, true, false, null or [...]), "
            f'found {found}; quote text as "…"',
            i,
        )

    def string_literal(self, start: int) -> tuple[_Node, int]:
        s, n = self.s, self.n
        quote = s[start]
        out: list[str] = []
        i = start + 1
        while i < n:
            c = s[i]
            if c == quote:
                return _Literal(s[start : i + 1], "".join(out)), i + 1
            if c == "\\":
                if i + 1 >= n:
                    break
                escaped = _ESCAPES.get(s[i + 1])
                if escaped is None:
                    raise self.error(f"unknown escape \\{s[i + 1]} (use \\\\ \\\" \\' \\n \\t or \\r)", i)
                out.append(escaped)
                i += 2
                continue
            out.append(c)
            i += 1
        raise self.error("a string is never closed", start)
