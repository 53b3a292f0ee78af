"""A message as an entry of a Redis stream, and an entry as a message (see `redis` for the fields).

Both run for every message. The XADDs of a publish are encoded for the wire here, what its messages share encoded
once, as are a subscription's XACKs; entries are read straight from hiredis' reply, one written by this adapter
without optional fields by position (its field names compared with the expected ones in place), any other through
a dict of its fields, and what the messages of one publish share (`time`, `source`, `type`, content type) is
decoded once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from ductape_processor.adapters.brokers.codec import ATTRIBUTE_PREFIX, DEFAULT_CONTENT_TYPE, Binding, aware, format_time
from ductape_processor.runtime.brokers.messages import (
    JSON_PAYLOAD_MARK,
    NO_ATTRIBUTES,
    IncomingEvent,
    OutgoingEvent,
    PlainEvents,
)

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
_ID_LENGTHS: Final = tuple(b"$%d\r\n" % size for size in range(48))  # a bulk string's head for each entry id length
_new_object = object.__new__
_JSON_MARK: Final = JSON_PAYLOAD_MARK.encode()
_SPECVERSION_NAME: Final = _BINDING.specversion.encode()
_PLAIN_NAMES: Final = (_SPECVERSION_NAME, _ID, _SOURCE, _TYPE, _TIME, _CONTENT_TYPE, _DATA)
"""The fields of an entry this adapter wrote for a message without optional fields, in their order (`messages`
compares each with the reply's name in its place: cheaper than a slice of the reply compared with a list)."""
_PLAIN_LENGTH: Final = 2 * len(_PLAIN_NAMES)


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _pair(name: str, value: str) -> bytes:
    return _bulk(name.encode()) + _bulk(value.encode())


_SPECVERSION: Final = _pair(_BINDING.specversion, "1.0")
_ID_NAME: Final = _bulk(_ID)
_CONTENT_TYPE_NAME: Final = _bulk(_CONTENT_TYPE)
_DATA_NAME: Final = _bulk(_DATA)
_PLAIN_HEADER: Final = b"*%d\r\n" % (3 + _PLAIN_LENGTH)  # XADD, key, *, and the fields of a plain entry
_CRLF: Final = b"\r\n"
_LENGTHS: Final = tuple(b"$%d\r\n" % length for length in range(1024))
"""The head of a bulk string of each length up to 1023 bytes (an id, most payloads), picked instead of formatted:
`bytes %` parses its format on every use (2 formats a message)."""
_HEADS_LIST: Final = list(_LENGTHS)  # the same, for `map` (see `_heads`)


def _optional(message: OutgoingEvent) -> tuple[bytes, int]:
    """The fields a message has only when set, in their order, and how many."""
    pairs: list[bytes] = []
    if message.ordering_key:
        pairs.append(_pair(_BINDING.ordering_key, message.ordering_key))
    if message.traceparent:
        pairs.append(_pair("traceparent", message.traceparent))
    if message.tracestate:
        pairs.append(_pair("tracestate", message.tracestate))
    if message.json_payload:
        pairs.append(_pair(_BINDING.json_payload, JSON_PAYLOAD_MARK))
    for key, value in message.attributes.items():
        pairs.append(_pair(ATTRIBUTE_PREFIX + key, value))
    return b"".join(pairs), len(pairs)


def _start(key: str) -> bytes:
    """An XADD of this adapter's up to its message's id: the command, the key, `*` (Redis picks the entry id), the
    `specversion` field and the `id` field's name."""
    return b"$4\r\nXADD\r\n" + _bulk(key.encode()) + b"$1\r\n*\r\n" + _SPECVERSION + _ID_NAME


def _after_id(source: str, type_: str, moment: datetime) -> bytes:
    """The end of a message's id, and the fields that follow up to the content type's value."""
    return (
        _CRLF
        + _pair(_BINDING.source, source)
        + _pair(_BINDING.type, type_)
        + _pair(_BINDING.time, format_time(moment))
        + _CONTENT_TYPE_NAME
    )


def _heads(values: list[bytes]) -> list[bytes]:
    """The bulk-string head (`$<length>\\r\\n`) of each value: one object repeated when they are all as long (the
    ids), else each picked from the table (through a list's `__getitem__`, a C method: a tuple's goes through a
    slot wrapper that makes an argument tuple a call)."""
    sizes = list(map(len, values))
    first = sizes[0]
    if sizes.count(first) == len(sizes):
        return [_LENGTHS[first] if first < len(_LENGTHS) else b"$%d\r\n" % first] * len(sizes)
    if max(sizes) < len(_LENGTHS):
        return list(map(_HEADS_LIST.__getitem__, sizes))
    return [_LENGTHS[size] if size < len(_LENGTHS) else b"$%d\r\n" % size for size in sizes]


def xadd_plain(key: str, events: PlainEvents) -> bytes:
    """The XADDs of plain events, the same bytes as `xadd` of `events.events()`, made from the columns without a
    loop in Python: what the events share is encoded once (and each distinct content type once), each column's
    pieces are put in their places in one list by slice assignments (each a step in C), and the list joined."""
    count = len(events.ids)
    if not count:
        return b""
    optional = []
    if events.traceparent:
        optional.append(_pair("traceparent", events.traceparent))
    if events.tracestate:
        optional.append(_pair("tracestate", events.tracestate))
    head = b"*%d\r\n" % (3 + _PLAIN_LENGTH + 2 * len(optional)) + _start(key)
    after_id = _after_id(events.source, events.type, events.time)
    after_content_type = b"".join(optional) + _DATA_NAME
    content_types = events.content_types
    first = content_types[0]
    if content_types.count(first) == count:  # one content type (most batches): compared, not hashed
        middles = [after_id + _bulk(first.encode()) + after_content_type] * count
    else:
        encoded = {kind: after_id + _bulk(kind.encode()) + after_content_type for kind in set(content_types)}
        middles = list(map(encoded.__getitem__, content_types))
    ids = list(map(str.encode, events.ids))
    data = events.data
    # Six pieces a message: the end of the message before and the command's head, the id's length and the id, the
    # fields up to the payload's name, the payload's length and the payload.
    parts = [_CRLF + head] * (6 * count)
    parts[0] = head
    parts[1::6] = _heads(ids)
    parts[2::6] = ids
    parts[3::6] = middles
    parts[4::6] = _heads(data)
    parts[5::6] = data
    parts.append(_CRLF)
    return b"".join(parts)


def xadd(key: str, messages: Sequence[OutgoingEvent]) -> bytes:
    """The XADDs of `messages`, one after the other, RESP-encoded for the wire (`PipelinedConnection.send`).

    The fields are those `Binding.headers` gives, in its order, then the payload. Encoded here rather than by
    hiredis' `pack_command`, which formats each argument's length with `sprintf` (18 arguments a message: 2 µs), and
    without a dict of headers in between: what the messages of one publish share (the command, the key, `source`,
    `type`, `time`, a content type) is encoded once, joined into the piece between a message's id and its payload,
    and a message without optional fields adds five pieces to one list (a formatting of all its pieces at once cost
    more than the list: `bytes %` parses its format every time). The source, type and time are compared by identity
    with the message before's (the runtime gives the messages of one publish the very same objects), and by value only
    when they are other objects.
    """
    start = _start(key)
    plain_start = _PLAIN_HEADER + start
    parts: list[bytes] = []
    extend = parts.extend
    moment: datetime | None = None
    source = type_ = content_type = None
    after_id = b""  # the end of the id, and the fields that follow up to the content type's value
    middle = b""  # after_id, the content type's value and the payload's name: what a plain message shares
    for message in messages:
        if message.time is not moment or message.source is not source or message.type is not type_:
            if message.time != moment or message.source != source or message.type != type_:
                after_id = _after_id(message.source, message.type, message.time)
                content_type = None
            moment, source, type_ = message.time, message.source, message.type
        if message.content_type != content_type:  # equal strings (each message's own, from its request)
            content_type = message.content_type
            middle = after_id + _bulk(content_type.encode()) + _DATA_NAME
        identity, data = message.id.encode(), message.data
        size, length = len(identity), len(data)
        if (
            message.traceparent
            or message.ordering_key
            or message.tracestate
            or message.json_payload
            or (message.attributes is not NO_ATTRIBUTES and message.attributes)  # the shared empty one: no len()
        ):
            optional, count = _optional(message)
            extend(
                (
                    b"*%d\r\n" % (3 + _PLAIN_LENGTH + 2 * count),
                    start,
                    _LENGTHS[size] if size < 1024 else b"$%d\r\n" % size,
                    identity,
                    middle[: -len(_DATA_NAME)],
                    optional,
                    _DATA_NAME,
                )
            )
        else:
            extend((plain_start, _LENGTHS[size] if size < 1024 else b"$%d\r\n" % size, identity, middle))
        extend((_LENGTHS[length] if length < 1024 else b"$%d\r\n" % length, data, _CRLF))
    return b"".join(parts)


def xack(key: str, group: str, entry_ids: list[bytes]) -> bytes:
    """``XACK <key> <group> <entry id>...`` encoded for the wire (RESP): the entry ids in their order, each run of ids
    of one length joined in one step (ids delivered in a row differ in length only when their sequence number gains
    a digit, or at a new millisecond).

    hiredis' `pack_command` formats each argument's length with `sprintf`: about 1,760 instructions an entry id;
    sorted by length first (groups as large as can be), about 800; in their order, about 620 (callgrind, acks of 250
    ids in runs of 10 and 27)."""
    parts = [b"*%d\r\n$4\r\nXACK\r\n" % (len(entry_ids) + 3)]
    for name in (key.encode(), group.encode()):
        parts.append(b"$%d\r\n%b\r\n" % (len(name), name))
    for size, same in itertools.groupby(entry_ids, len):
        length = _ID_LENGTHS[size] if size < len(_ID_LENGTHS) else b"$%d\r\n" % size
        parts.append(length + (b"\r\n" + length).join(same) + b"\r\n")
    return b"".join(parts)


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
    """Reads the entries one subscription fetches; remembers the last `time`, `source`, `type` and content type it
    decoded (the messages of one publish share them), so that each is decoded once a publish, not once a message."""

    __slots__ = ("_content_type", "_source", "_time", "_time_field", "_topic", "_type")

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._time_field: bytes | None = None
        self._time = datetime.fromtimestamp(0, UTC)
        self._source = (_NO_BYTES, "")
        self._type = (_NO_BYTES, topic)
        self._content_type = (_NO_BYTES, DEFAULT_CONTENT_TYPE)

    def messages(self, entries: Iterable[Sequence[Any]], attempt: int, held: dict[str, bytes]) -> list[IncomingEvent]:
        """The messages of entries `[entry id, [field, value, ...]]` of one delivery attempt, each noted in `held`
        (its handle -> the entry id as the reply had it).

        An entry as this adapter writes it without optional fields (the fields `_PLAIN_NAMES`, in that order) is read
        by position; any other (optional fields, another producer's) through `incoming`.
        """
        out: list[IncomingEvent] = []
        append = out.append
        new_event = _new_object
        suffix = f"@{attempt}"  # a handle is one per delivery: a stale handle never settles a later delivery
        topic = self._topic
        # The remembered values as locals for the loop (written back after it): (the field as read, its value).
        time_field, moment = self._time_field, self._time
        (raw_source_seen, source), (raw_type_seen, type_) = self._source, self._type
        raw_content_type_seen, content_type = self._content_type
        for raw_entry_id, flat in entries:
            if flat is None:  # deleted while pending (older servers)
                continue
            entry_id = raw_entry_id.decode()
            try:  # no len() first: a list of another length (optional fields) raises here
                n0, _, n1, raw_id, n2, raw_source, n3, raw_type, n4, raw_time, n5, raw_content_type, n6, data = flat
            except ValueError:
                plain = False
            else:
                plain = (
                    n1 == _ID
                    and n2 == _SOURCE
                    and n3 == _TYPE
                    and n4 == _TIME
                    and n5 == _CONTENT_TYPE
                    and n6 == _DATA
                    and n0 == _SPECVERSION_NAME
                )
            if not plain:
                message = self.incoming(entry_id, flat, attempt)
                held[message.handle] = raw_entry_id
                append(message)
                continue
            if raw_time == time_field:
                written = moment
            else:
                parsed = _written_time(raw_time)
                if parsed is None:
                    written = _entry_time(entry_id)
                else:
                    written = moment = parsed
                    time_field = raw_time
            if raw_source != raw_source_seen:
                raw_source_seen, source = raw_source, raw_source.decode("utf-8", "replace")
            if raw_type != raw_type_seen:
                raw_type_seen, type_ = raw_type, raw_type.decode("utf-8", "replace") if raw_type else topic
            if raw_content_type != raw_content_type_seen:
                raw_content_type_seen = raw_content_type
                content_type = raw_content_type.decode("utf-8", "replace") or DEFAULT_CONTENT_TYPE
            handle = entry_id + suffix
            held[handle] = raw_entry_id
            # Made with `object.__new__` and every field set here (a test checks them against the dataclass's own
            # `__init__`): calling the class runs its Python `__init__` in a nested frame, about 1k instructions more.
            event = new_event(IncomingEvent)
            if raw_id:
                try:  # without arguments: `decode("utf-8", "replace")` looks its codec up by name, about 300 more
                    event.id = raw_id.decode()
                except UnicodeDecodeError:
                    event.id = _text(raw_id)
            else:
                event.id = entry_id
            event.source = source
            event.type = type_
            event.time = written
            event.data = data
            event.content_type = content_type
            event.handle = handle
            event.attributes = NO_ATTRIBUTES  # shared and read-only, as a published message's (no dict a message)
            event.ordering_key = event.traceparent = event.tracestate = ""
            event.delivery_attempt = attempt
            event.json_payload = False
            append(event)
        self._time_field, self._time = time_field, moment
        self._source, self._type = (raw_source_seen, source), (raw_type_seen, type_)
        self._content_type = (raw_content_type_seen, content_type)
        return out

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
