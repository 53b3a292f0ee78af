"""Validation errors in the processor's words: each pydantic error becomes one problem, with its path in the manifest
as written (union discriminators dropped) and a reason a manifest's author reads without knowing pydantic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from pydantic_core import ErrorDetails

from ductape_processor.errors import FieldViolation
from ductape_processor.runtime.registry.manifest import TAG_PATTERN, TOPIC_NAME_PATTERN


def _path(document: object, loc: Sequence[int | str]) -> str:
    """Turn a pydantic error location into a manifest path, dropping union discriminators pydantic inserts."""
    path = ""
    node: object = document
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if part < len(node) else None
            continue
        if isinstance(node, dict) and part in node:
            path += f".{part}" if path else str(part)
            node = node[part]
            continue
        if (isinstance(node, dict) and part in (node.get("type"), node.get("provider"))) or part == "[key]":
            continue
        path += f".{part}" if path else str(part)
        node = None
    return path


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")
_PATTERNS: Final = {
    TAG_PATTERN: "must be a tag: letters, digits, '_' and '-', starting with a letter, at most 64 characters",
    TOPIC_NAME_PATTERN: "may hold only letters, digits, '_', '.' and '-'",
}
_KINDS: Final = {
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping (key: value pairs)",
    "model_type": "must be a mapping (key: value pairs)",
    "model_attributes_type": "must be a mapping (key: value pairs)",
    "list_type": "must be a list",
    "invalid-json-value": "must be plain data: text, a number, true/false, null, a list or a mapping",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field: not part of the manifest schema (see docs/manifest.md)",
}


def _choices(expected: str) -> str:
    return ", ".join(_QUOTED.findall(expected)) or expected


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _got(value: object) -> str:
    shown = repr(value)
    return f", not {shown}" if isinstance(value, str | int | float) and len(shown) <= 40 else ""


def problem_reason(error: ErrorDetails) -> str:
    """One validation error in the processor's words (never the validation library's)."""
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    text = _KINDS.get(kind)
    if text is None:
        if kind == "literal_error":
            text = f"must be one of {_choices(str(ctx['expected']))}{_got(error.get('input'))}"
        elif kind == "union_tag_invalid":
            given = error.get("input")
            tag = given.get(str(ctx["discriminator"]).strip("'")) if isinstance(given, dict) else None
            text = f"must be one of {_choices(str(ctx['expected_tags']))}{_got(tag)}"
        elif kind == "union_tag_not_found":
            text = "required field is missing: it says which kind of entry this is"
        elif kind == "string_pattern_mismatch":
            pattern = str(ctx["pattern"])
            text = _PATTERNS.get(pattern, f"does not have the expected form ({pattern})")
        elif kind == "string_too_short":
            minimum = int(ctx["min_length"])
            text = "must not be empty" if minimum == 1 else f"must have at least {_plural(minimum, 'character')}"
        elif kind == "string_too_long":
            text = f"must have at most {_plural(int(ctx['max_length']), 'character')}"
        elif kind == "too_short":
            minimum = int(ctx["min_length"])
            text = "must not be empty" if minimum == 1 else f"must have at least {_plural(minimum, 'item')}"
        elif kind == "too_long":
            text = f"must have at most {_plural(int(ctx['max_length']), 'item')}"
        elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
            bound = {"greater_than_equal": "at least", "less_than_equal": "at most"}.get(kind)
            bound = bound or {"greater_than": "more than", "less_than": "less than"}[kind]
            limit = next(iter(ctx.values()))
            text = f"must be {bound} {limit}"
        elif kind in ("value_error", "assertion_error"):
            text = str(ctx.get("error", "is not valid"))
        else:
            text = "is not a valid value here"
    loc = error["loc"]
    if loc and loc[-1] == "[key]":
        return f"the key {text}"
    return text


def violation(document: object, error: ErrorDetails) -> FieldViolation:
    """One validation error as a problem of the manifest: its path in the document, and why in our words."""
    path = _path(document, error["loc"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")
        path = f"{path}.{discriminator}" if path and discriminator else path
    return FieldViolation(path, problem_reason(error))
