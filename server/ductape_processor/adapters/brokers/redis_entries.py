"""A message as an entry of a Redis stream, and an entry as a message (see `redis` for the fields).

Both run for every message, so the fields are written as one flat command (hiredis encodes the text) and read
straight from hiredis' reply: bytes names compared with bytes, no dict of decoded text in between, and the `time`
that the messages of one publish share parsed once.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Final

from ductape_processor.adapters.brokers.codec import ATTRIBUTE_PREFIX, DEFAULT_CONTENT_TYPE, Binding, aware
from ductape_processor.adapters.brokers.redis_connection import Arg, Command
from ductape_processor.runtime.brokers.messages import JSON_PAYLOAD_MARK, IncomingEvent, OutgoingEvent

_BINDING = Binding(prefix="", ordering_key="orderingkey", content_type="datacontenttype")
# The field names as the replies carry them (bytes), spelled once from the binding.
_ID: Final = _BINDING.id.encode()
_SOURCE: Final = _BINDING.source.encode()
_TYPE: Final = _BINDING.type.encode()
_TIME: Final = _BINDING.time.encode()
_CONTENT_TYPE: Final = b"datacontenttype"
_ORDERING_KEY: Final = _BINDING.ordering_key.encode()
_JSON_PAYLOAD: Final = _BINDING.json_payload.encode()
_ATTRIBUTE: Final = ATTRIBUTE_PREFIX.encode()
_DATA: Final = b"data"
_KNOWN_FIELDS: Final = frozenset(
    {_BINDING.specversion.encode(), _ID, _SOURCE, _TYPE, _TIME, _CONTENT_TYPE, _ORDERING_KEY, _JSON_PAYLOAD, _DATA}
    | {b"traceparent", b"tracestate"}
)
_NO_BYTES = b""
_JSON_MARK: Final = JSON_PAYLOAD_MARK.encode()


def xadd(key: str, message: OutgoingEvent, time: str | None = None) -> Command:
    """The XADD of one message: its CloudEvents fields, then the payload (hiredis encodes the text as UTF-8)."""
    command: list[Arg] = [b"XADD", key, b"*"]
    for name, value in _BINDING.headers(message, time).items():
        command += (name, value)
    command += (_DATA, message.data)
    return tuple(command)


def _entry_time(entry_id: str) -> datetime:
    millis = entry_id.partition("-")[0]
    return datetime.fromtimestamp(int(millis) / 1000 if millis.isdigit() else 0, UTC)


def _written_time(field: bytes | None) -> datetime | None:
    """A `time` field's moment (a naive one is UTC); None when it is absent or unreadable."""
    if field:
        with contextlib.suppress(ValueError):
            return aware(datetime.fromisoformat(_text(field)))
    return None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class EntryReader:
    """Reads the entries one subscription fetches; remembers the last `time` field it parsed."""

    __slots__ = ("_time", "_time_field", "_topic")

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._time_field = _NO_BYTES
        self._time = datetime.fromtimestamp(0, UTC)

    def incoming(self, entry_id: str, flat: list[bytes], attempt: int) -> IncomingEvent:
        """A message from its entry's fields, decoded straight from the reply (see the module on foreign entries)."""
        pairs = iter(flat)
        fields: dict[bytes, bytes] = dict(zip(pairs, pairs, strict=False))
        get = fields.get
        raw_time = get(_TIME)
        if raw_time is not None and raw_time == self._time_field:
            moment = self._time
        else:
            written = _written_time(raw_time)
            if raw_time is not None and written is not None:
                self._time_field, self._time = raw_time, written
            moment = written or _entry_time(entry_id)
        raw_id, raw_type = get(_ID), get(_TYPE)
        # Positional, in IncomingEvent's field order: this runs for every message delivered.
        return IncomingEvent(
            _text(raw_id) if raw_id else entry_id,
            _text(get(_SOURCE, _NO_BYTES)),
            _text(raw_type) if raw_type else self._topic,
            moment,
            get(_DATA, _NO_BYTES),
            _text(get(_CONTENT_TYPE, _NO_BYTES)) or DEFAULT_CONTENT_TYPE,
            f"{entry_id}@{attempt}",  # one per delivery: a stale handle never settles a later delivery
            {}
            if fields.keys() <= _KNOWN_FIELDS
            else {
                _text(name[len(_ATTRIBUTE) :]): _text(value)
                for name, value in fields.items()
                if name.startswith(_ATTRIBUTE)
            },
            _text(get(_ORDERING_KEY, _NO_BYTES)),
            _text(get(b"traceparent", _NO_BYTES)),
            attempt,
            _text(get(b"tracestate", _NO_BYTES)),
            get(_JSON_PAYLOAD) == _JSON_MARK,
        )
