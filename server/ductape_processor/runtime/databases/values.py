"""Values between callers (JSON) and databases: what a bound parameter becomes, what a column's value becomes.

Out of a database, types are kept as JSON can carry them: integers stay integers up to 2^53 (what a JSON number
holds exactly) and become strings beyond; decimals are strings (never rounded through a float); timestamps are RFC
3339 text (with their offset when the column has one); dates and times ISO 8601; bytes base64; JSON columns JSON;
UUIDs text; intervals a number of seconds. Rows are counted and measured as they are converted, so a result over the
bounds stops early with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class ResultBudget:
    """What a call may still answer: rows and bytes, spent as rows are converted. One Execute has one; a Batch shares
    one across its steps, so its answer as a whole stays within the bounds."""

    rows: int
    bytes: int
    max_rows: int = field(init=False)
    max_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_rows = self.rows
        self.max_bytes = self.bytes


def _size(value: Any) -> int:
    """About the bytes `value` takes as a `google.protobuf.Value` in the answer, its tags and lengths included (a
    one-letter text takes about 4 bytes, a number 9, and a value of a row's map a few more): the bound is on the
    answer as it is sent, whose largest message is PROCESSOR_MAX_MESSAGE_BYTES."""
    if isinstance(value, str):
        return len(value.encode()) + 4 if len(value) < 1 << 20 else 4 * len(value)
    if isinstance(value, dict):
        return 4 + sum(len(str(k).encode()) + 8 + _size(v) for k, v in value.items())
    if isinstance(value, list):
        return 4 + sum(2 + _size(v) for v in value)
    return 9


def rows_to_json(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], budget: ResultBudget, what: str
) -> list[dict[str, Any]]:
    """Rows as objects keyed by column name, spending `budget`; ResultTooLarge once it is spent."""
    if len(rows) > budget.rows:
        raise ResultTooLarge(
            f"{what}: the result has more than {budget.max_rows} rows (PROCESSOR_DATABASE_MAX_ROWS); page it "
            "(page_size) or select less",
            metadata={"limit": "rows", "maximum": str(budget.max_rows)},
        )
    budget.rows -= len(rows)
    names = [str(name) for name in columns]
    entries = [len(name.encode()) + 8 for name in names]  # a column's map entry: tags, lengths, its name
    converted: list[dict[str, Any]] = []
    for row in rows:
        item: dict[str, Any] = {}
        spent = 4  # the row's own Struct
        for name, entry, raw in zip(names, entries, row, strict=False):
            value = to_json(raw)
            item[name] = value
            spent += entry + _size(value)
        budget.bytes -= spent
        if budget.bytes < 0:
            raise ResultTooLarge(
                f"{what}: the result is larger than {budget.max_bytes} bytes (PROCESSOR_DATABASE_MAX_RESULT_BYTES); "
                "page it (page_size) or select less",
                metadata={"limit": "bytes", "maximum": str(budget.max_bytes)},
            )
        converted.append(item)
    return converted
