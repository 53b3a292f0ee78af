"""Conversions between protobuf Struct/Value and plain Python values (the only place in the server that does them;
reading a Value is the Python client's `from_value`, shared by both sides)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from ductape.processor.values import from_value
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from pydantic import JsonValue

from ductape_processor.errors import InvalidArgument

MAX_JSON_DEPTH: Final = 32
"""The deepest JSON (objects and arrays inside each other) handed on as a `google.protobuf.Value`.

Protobuf parsers refuse messages nested more than 100 levels (Python, C++, Java by default), and each JSON object
level is three (Value, Struct, map entry) inside the response: deeper JSON would reach the caller as a response its
client cannot read, or fail here on recursion. Deeper JSON is returned as bytes instead.
"""


def value_to_python(value: struct_pb2.Value) -> JsonValue:
    """A `google.protobuf.Value` as JSON-like Python, whole numbers as ints (JSON has one number type): the Python
    client's `from_value` (`clients/python/ductape/processor/values.py`), so both sides of the API read a Value
    alike."""
    python: JsonValue = from_value(value)
    return python


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, JsonValue]:
    """A `google.protobuf.Struct` as a dict."""
    # The map's own iteration and lookup run in C; `.items()` is `collections.abc`'s view, iterated in Python.
    fields = struct.fields
    return {key: from_value(fields[key]) for key in fields}


def python_to_value(data: object, value: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """A JSON-like Python value as a `google.protobuf.Value` (filled in place when `value` is given)."""
    target = value if value is not None else struct_pb2.Value()
    if data is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        target.bool_value = data
    elif isinstance(data, (int, float)):
        target.number_value = data
    elif isinstance(data, str):
        target.string_value = data
    elif isinstance(data, dict):
        target.struct_value.update(data)
    elif isinstance(data, list):
        target.list_value.extend(data)
    else:
        target.string_value = str(data)
    return target


class _TooDeep(Exception):
    """A JSON document nests deeper than MAX_JSON_DEPTH."""


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999
        raise ValueError(f"{text[:20]} is past a double's range")
    return number


def json_to_value(body: bytes, target: struct_pb2.Value, *, finite: bool = True) -> bool:
    """Fill `target` with the JSON document `body`, in one pass; False when `body` is not JSON, nests deeper than
    `MAX_JSON_DEPTH`, holds a string no protobuf string can (JSON may escape a lone surrogate, "\\ud800"), or a
    number no double can: an integer past its range, and, when `finite`, NaN, Infinity and 1e999, which Python's
    parser takes (a `Value` holding one would not be JSON again; a caller with the bytes to answer instead refuses
    them, one whose document the processor wrote itself, from values that held them, keeps them).

    On False, `target` may be partly filled: the caller answers with the bytes instead. An empty object or array at
    the top leaves `target` unset, as an empty document has no value to carry.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses what Python's json takes (integers past 64 bits, NaN and Infinity, lone surrogates, very
        # deep nesting): the standard parser decides, so a document reads the same as it always has, but for the
        # numbers no double holds (NaN, the infinities and what overflows to them are not JSON: refused).
        try:
            data = json.loads(body, parse_constant=_not_a_number, parse_float=_finite) if finite else json.loads(body)
        except (ValueError, RecursionError):
            return False
    if isinstance(data, dict | list) and not data:
        return True
    try:
        _fill(target, data, 0)
    except (_TooDeep, UnicodeEncodeError, OverflowError):  # OverflowError: an integer past a double
        return False
    return True


def _fill(target: struct_pb2.Value, data: object, depth: int) -> None:
    if isinstance(data, str):
        target.string_value = data
    elif data is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        target.bool_value = data
    elif isinstance(data, int | float):
        target.number_value = data
    elif isinstance(data, dict | list):
        if depth >= MAX_JSON_DEPTH:
            raise _TooDeep
        if not data:  # an empty object or array is still a value: mark it present
            (target.struct_value if isinstance(data, dict) else target.list_value).SetInParent()
        elif isinstance(data, dict):
            fields = target.struct_value.fields
            for key, item in data.items():
                # A string, a number or a flag (what most members are) set here, without a call; the rest by `_fill`.
                kind = type(item)
                if kind is str:
                    fields[key].string_value = item
                elif kind is int or kind is float:
                    fields[key].number_value = item
                elif kind is bool:
                    fields[key].bool_value = item
                else:
                    _fill(fields[key], item, depth + 1)
        else:
            items = target.list_value.values
            for item in data:
                kind = type(item)
                if kind is str:
                    items.add().string_value = item
                elif kind is int or kind is float:
                    items.add().number_value = item
                else:
                    _fill(items.add(), item, depth + 1)
    else:
        target.string_value = str(data)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A `google.protobuf.Timestamp` for an aware datetime (microsecond precision, in integers: no float rounding
    and none of protobuf's slow path). A naive one is taken as local time, as `datetime.timestamp` takes it."""
    return set_timestamp(timestamp_pb2.Timestamp(), moment)


def set_timestamp(target: timestamp_pb2.Timestamp, moment: datetime) -> timestamp_pb2.Timestamp:
    """`target` (a Timestamp field, filled in place) set to `moment`, as `timestamp` converts it."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    since = moment - _EPOCH
    target.seconds = since.days * 86_400 + since.seconds
    target.nanos = since.microseconds * 1000
    return target


def seconds(duration: duration_pb2.Duration) -> float:
    """A `google.protobuf.Duration` in seconds."""
    return duration.seconds + duration.nanos / 1e9


MAX_DURATION_SECONDS: Final = 315_576_000_000
"""The longest `google.protobuf.Duration` (about 10,000 years either way), as protobuf defines it."""


def moment(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request's `google.protobuf.Timestamp` as an aware datetime; INVALID_ARGUMENT on `field` outside what a
    datetime holds (years 1 to 9999) or with nanos out of range."""
    try:
        return value.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(
            field, "is not a valid timestamp (years 1 to 9999, nanos between 0 and 999,999,999)"
        ) from None


def delta(value: duration_pb2.Duration, field: str) -> timedelta:
    """A request's `google.protobuf.Duration` as a timedelta; INVALID_ARGUMENT on `field` outside protobuf's range
    (±10,000 years, nanos of the seconds' sign)."""
    whole, nanos = value.seconds, value.nanos
    if abs(whole) > MAX_DURATION_SECONDS or abs(nanos) > 999_999_999 or whole * nanos < 0:
        raise InvalidArgument.field(
            field, "is not a valid duration (at most 10,000 years either way, nanos of the seconds' sign)"
        )
    return timedelta(seconds=whole, microseconds=nanos // 1000 if nanos >= 0 else -(-nanos // 1000))


def required(value: str, field: str, what: str) -> str:
    """`value`, or INVALID_ARGUMENT on `field` when it is empty (`what` says what it should be)."""
    if not value:
        raise InvalidArgument.field(field, f"is required: {what}")
    return value


def session_pair(request: Any) -> tuple[str, str] | None:
    """The (tag, token) of a request's `session` field, None when it has none; both are required when it has one."""
    if not request.HasField("session"):
        return None
    if not request.session.tag or not request.session.token:
        raise InvalidArgument.field("session", "needs both tag and token")
    return (request.session.tag, request.session.token)


def pinned_version(version: int) -> int | None:
    """A request's `version`: None (the environment's) for 0, INVALID_ARGUMENT when negative."""
    if version < 0:
        raise InvalidArgument.field("version", "must be 1 or more (or 0 for the environment's version)")
    return version or None
