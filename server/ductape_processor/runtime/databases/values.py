"""Values between callers (JSON) and databases: what a bound parameter becomes, what a column's value becomes.

Out of a database, types are kept as JSON can carry them: integers stay integers up to 2^53 (what a JSON number
holds exactly) and become strings beyond; decimals are strings (never rounded through a float); timestamps are RFC
3339 text (with their offset when the column has one); dates and times ISO 8601; bytes base64; JSON columns JSON;
UUIDs text; intervals a number of seconds. Rows are counted and measured as they are converted, so a result over the
bounds stops early with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final

from ductape_processor.errors import ResourceExhausted
from ductape_processor.reasons import Reason

SAFE_INTEGER: Final = 2**53
"""The largest integer a JSON number (an IEEE double) holds exactly: larger ones travel as strings."""


class ResultTooLarge(ResourceExhausted, reason=Reason.DB_RESULT_TOO_LARGE):
    """A result over the configured bounds (rows or bytes)."""


def to_json(value: Any) -> Any:
    """One column's value as a JSON-like value."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -SAFE_INTEGER <= value <= SAFE_INTEGER else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return str(value)


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict | list):
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return 8


def rows_to_json(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], max_rows: int, max_bytes: int, what: str
) -> list[dict[str, Any]]:
    """Rows as objects keyed by column name; ResultTooLarge past `max_rows` rows or about `max_bytes` bytes."""
    if len(rows) > max_rows:
        raise ResultTooLarge(
            f"{what}: the result has more than {max_rows} rows (PROCESSOR_DATABASE_MAX_ROWS); page it "
            "(page_size) or select less",
            metadata={"limit": "rows", "maximum": str(max_rows)},
        )
    names = [str(name) for name in columns]
    budget = max_bytes
    converted: list[dict[str, Any]] = []
    for row in rows:
        item: dict[str, Any] = {}
        for name, raw in zip(names, row, strict=False):
            value = to_json(raw)
            item[name] = value
            budget -= _size(value) + len(name)
        if budget < 0:
            raise ResultTooLarge(
                f"{what}: the result is larger than {max_bytes} bytes (PROCESSOR_DATABASE_MAX_RESULT_BYTES); page "
                "it (page_size) or select less",
                metadata={"limit": "bytes", "maximum": str(max_bytes)},
            )
        converted.append(item)
    return converted
