"""Durations in manifests: `200ms`, `5s`, `15m`, `1h`, `30d`, `2w`, or an integer count of milliseconds."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h|d|w)$"
MAX_DURATION = timedelta(days=36_525)
"""The longest duration a manifest may give, 100 years: a longer one is no real setting, and added to a moment it would
overflow the calendar (or, with enough digits, Python's own timedelta)."""
_MAX_MS = int(MAX_DURATION.total_seconds() * 1000)
_TOO_LONG = "is longer than 100 years (36525d), the longest duration a manifest may give"


def parse_duration(value: object) -> timedelta:
    """Read a manifest duration; raise ValueError with the accepted forms when it is not one."""
    if isinstance(value, timedelta):
        if value > MAX_DURATION:
            raise ValueError(f"{value} {_TOO_LONG}")
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '200ms', '5s', '15m', '1h', '30d' or '2w'")
    if isinstance(value, int) and value >= 0:
        if value > _MAX_MS:
            raise ValueError(f"{value} milliseconds {_TOO_LONG}")
        return timedelta(milliseconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]  # inf for a number of 309 digits and more
            if not seconds <= MAX_DURATION.total_seconds():
                raise ValueError(f"{value[:40]!r} {_TOO_LONG}")
            return timedelta(seconds=seconds)
    raise ValueError(
        f"{value!r} is not a duration: use a number and a unit (ms, s, m, h, d, w) such as '200ms', '15m' or '30d'"
    )


def format_duration(value: timedelta) -> str:
    """The shortest exact manifest form of a duration (`90s`, `15m`, `250ms`)."""
    ms = round(value.total_seconds() * 1000)
    for unit, seconds in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if ms % (seconds * 1000) == 0 and ms:
            return f"{ms // (seconds * 1000)}{unit}"
    return f"{ms}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN, "examples": ["200ms", "15m", "30d"]},
                {"type": "integer", "minimum": 0, "maximum": _MAX_MS, "description": "milliseconds"},
            ]
        }
    ),
]


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
