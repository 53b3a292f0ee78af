"""Conversions every resource client shares: Python values to and from the protobuf messages of requests and replies."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ductape.processor.v1 import common_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

RecordT = TypeVar("RecordT", bound="DataclassInstance")

SessionLike = common_pb2.SessionRef | Mapping[str, str] | tuple[str, str]


def session_ref(session: SessionLike | None) -> common_pb2.SessionRef | None:
    """Accept Ductape's `{tag, token}` shape, a (tag, token) pair, or the message itself; None (no session) stays
    None, which a request's constructor leaves unset."""
    if session is None or isinstance(session, common_pb2.SessionRef):
        return session
    if isinstance(session, tuple):
        return common_pb2.SessionRef(tag=session[0], token=session[1])
    return common_pb2.SessionRef(tag=session["tag"], token=session["token"])


def plain(value: Any) -> Any:
    """JSON-like Python from a Struct/Value converted by json_format: whole numbers back to ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A `google.protobuf.Value` as JSON-like Python, in one pass (json_format and `plain` take two and cost several
    times more): whole numbers become ints, as JSON has one number type."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: from_value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None


def struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A Struct of `data`, or None."""
    if data is None:
        return None
    message = struct_pb2.Struct()
    message.update(dict(data))
    return message


@functools.cache
def _field_names(record: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(record) if field.init)


def record_from(record: type[RecordT], message: Message, **given: Any) -> RecordT:
    """A `record` (a dataclass) from a reply's `message`: the fields in `given` as given, every other one the
    message's field of the same name (so a record that renames or converts a field says so in `given`)."""
    copied = {name: getattr(message, name) for name in _field_names(record) if name not in given}
    return record(**copied, **given)


def enum_word(enum: Any, value: int, prefix: str) -> str:
    """An enum value as the facades show it: `FEATURE_RUN_STATUS_ROLLED_BACK` -> `rolled_back`."""
    return str(enum.Name(value)).removeprefix(prefix).lower()


def moment(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime, None when the message does not set it."""
    return getattr(message, field).ToDatetime(tzinfo=UTC) if message.HasField(field) else None
