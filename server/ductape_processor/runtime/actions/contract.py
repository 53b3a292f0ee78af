"""Input contracts: a caller's input checked against the fields a manifest declares, before any template renders.

A field is absent when its key is missing or its value is null; `0`, `""` and `false` are values (the old SDK
treated them as missing: a bug we do not keep). Absent fields take their default; present ones are type-checked,
length-checked and decorated. Fields the contract does not declare pass through unchanged: a contract says what must
be right, not everything a caller may send, and an upstream API often accepts more than the manifest describes.
Every bad field is reported at once, as one `InvalidArgument` whose violations name `input.<part>.<field>`.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.registry.manifest import ActionInput, FieldSpec
from ductape_processor.runtime.templates import json_kind

ACTION_PARTS: Final = ("params", "query", "body", "headers")

_UUID_HYPHENS = frozenset({8, 13, 18, 23})
_HEX = frozenset("0123456789abcdefABCDEF")


def check_input(
    schema: Mapping[str, FieldSpec], values: Mapping[str, Any] | None, where: str, *, root: str = "input"
) -> dict[str, Any]:
    """The values to use for one part of an input (`where`: `body`, `query`, ...), or `InvalidArgument`.

    Violations name `<root>.<where>.<field>`; an empty `root` names `<where>.<field>` (e.g. a session's `data`).
    """
    violations: list[FieldViolation] = []
    result = _check_part(schema, values, f"{root}.{where}" if root else where, violations)
    if violations:
        raise _invalid(violations)
    return result


def check_action_input(action_input: ActionInput, value: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """All four parts of an action's input checked together; one `InvalidArgument` lists every bad field.

    Header names are matched without regard to case (`authorization` fills a declared `Authorization`) and are
    renamed to the declared spelling. A part other than params, query, body and headers is refused.
    """
    given = value or {}
    violations: list[FieldViolation] = []
    for part in given:
        if part not in ACTION_PARTS:
            violations.append(
                FieldViolation(f"input.{part}", "is not a part of an action's input (params, query, body, headers)")
            )
    result: dict[str, dict[str, Any]] = {}
    for part in ACTION_PARTS:
        schema: Mapping[str, FieldSpec] = getattr(action_input, part)
        values = given.get(part)
        if values is None and not schema:
            result[part] = {}  # nothing declared, nothing given: what `_check_part` would make of it, without the call
            continue
        if part == "headers" and isinstance(values, Mapping):
            values = _declared_header_names(schema, values, violations)
        result[part] = _check_part(schema, values, f"input.{part}", violations)
    if violations:
        raise _invalid(violations)
    return result


def _invalid(violations: list[FieldViolation]) -> InvalidArgument:
    first = violations[0]
    others = len(violations) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return InvalidArgument(
        f"invalid input: {first.field}: {first.description}{more}", reason=Reason.INVALID_INPUT, violations=violations
    )


def _declared_header_names(
    schema: Mapping[str, FieldSpec], values: Mapping[str, Any], violations: list[FieldViolation]
) -> dict[str, Any]:
    declared = {name.lower(): name for name in schema}
    renamed: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, item in values.items():
        name = declared.get(key.lower(), key) if isinstance(key, str) else key
        if name in renamed:
            violations.append(
                FieldViolation(
                    f"input.headers.{name}",
                    f"is given twice ({given_as[name]!r} and {key!r}); header names ignore case",
                )
            )
            continue
        renamed[name] = item
        given_as[name] = key
    return renamed


def _check_part(
    schema: Mapping[str, FieldSpec], values: Mapping[str, Any] | None, where: str, violations: list[FieldViolation]
) -> dict[str, Any]:
    if values is None:
        values = {}
    elif not isinstance(values, Mapping):
        violations.append(FieldViolation(where, f"must be an object, not {json_kind(values)}"))
        values = {}
    result = dict(values)
    for name, spec in schema.items():
        given = values.get(name)
        if given is None:
            if spec.default is not None:
                result[name] = _decorate(spec, copy.deepcopy(spec.default))
            elif spec.required:
                violations.append(FieldViolation(f"{where}.{name}", "is required"))
            continue
        problems = _problems(spec, given)
        if problems:
            violations.append(FieldViolation(f"{where}.{name}", "; ".join(problems)))
            continue
        # gRPC Struct numbers are doubles: a caller's 3 arrives as 3.0, and an integer field hands on 3.
        if spec.type == "integer" and isinstance(given, float):
            given = int(given)
        result[name] = given if spec.decorator is None else _decorate(spec, given)
    return result


def _decorate(spec: FieldSpec, value: Any) -> Any:
    if spec.decorator is None or not isinstance(value, str):
        return value
    if spec.decorator.position == "prepend":
        return spec.decorator.text + value
    return value + spec.decorator.text


def _problems(spec: FieldSpec, value: Any) -> list[str]:
    """What is wrong with a present value, if anything (a list, not a generator: one call a field, most often with
    nothing to say)."""
    kind = spec.type
    found: list[str] = []
    if kind in ("string", "email", "uuid", "date"):
        if not isinstance(value, str):
            found.append(f"must be a string, not {json_kind(value)}")
            return found
        if kind == "email" and not is_email(value):
            found.append("is not an email address")
        elif kind == "uuid" and not is_uuid(value):
            found.append("is not a UUID (8-4-4-4-12 hexadecimal digits)")
        elif kind == "date" and not is_iso_date(value):
            found.append("is not an ISO 8601 date or date-time")
        if spec.min_length is not None or spec.max_length is not None:
            _length_problems(spec, len(value), "character", found)
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            found.append(f"must be a number, not {json_kind(value)}")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append("must be a finite number")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            found.append(f"must be an integer, not {json_kind(value)}")
        elif isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            found.append("must be an integer, not a fractional number")
    elif kind == "boolean":
        if not isinstance(value, bool):
            found.append(f"must be a boolean, not {json_kind(value)}")
    elif kind == "array":
        if not isinstance(value, list | tuple):
            found.append(f"must be an array, not {json_kind(value)}")
            return found
        _length_problems(spec, len(value), "item", found)
    elif kind == "object" and not isinstance(value, Mapping):
        found.append(f"must be an object, not {json_kind(value)}")
    return found


def _length_problems(spec: FieldSpec, length: int, unit: str, found: list[str]) -> None:
    if spec.min_length is not None and length < spec.min_length:
        found.append(f"must have at least {_count(spec.min_length, unit)}, has {length}")
    if spec.max_length is not None and length > spec.max_length:
        found.append(f"must have at most {_count(spec.max_length, unit)}, has {length}")


def _count(number: int, unit: str) -> str:
    return f"{number} {unit}{'' if number == 1 else 's'}"


def is_email(text: str) -> bool:
    """A practical address check: one `@`, a local part, a dotted domain without empty labels, no spaces."""
    if len(text) > 254 or any(c.isspace() for c in text) or text.count("@") != 1:
        return False
    local, domain = text.split("@")
    labels = domain.split(".")
    return 0 < len(local) <= 64 and len(labels) >= 2 and all(labels)


def is_uuid(text: str) -> bool:
    """A UUID in its canonical hyphenated form, any letter case."""
    # uuid.UUID alone also takes braces, a urn: prefix, no hyphens, and (through int()) '_', '+' and spaces.
    if len(text) != 36 or any(
        (c == "-") != (i in _UUID_HYPHENS) or (c != "-" and c not in _HEX) for i, c in enumerate(text)
    ):
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def is_iso_date(text: str) -> bool:
    """An ISO 8601 date (`2024-07-15`) or date-time (`2024-07-15T10:30:00Z`, with or without an offset)."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True
