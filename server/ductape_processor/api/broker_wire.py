"""The Subscribe stream's batches encoded as protobuf by hand: a `SubscribeResponse` holding a `MessageBatch`, as the
bytes gRPC sends (`api/broker.py` `add_to_server` passes them through, as it does PublishBatch's response).

Every message a subscriber receives goes through here, so it costs what it must and no more. Built as upb messages
(a `ReceivedMessage` added to the response a message, the fields it shares with its publish copied in, 4-8 fields
set, then serialized by gRPC) a plain message cost 8.7k instructions; encoded here, 5.3k (bench/README.md, "Redis
batches, sixth round: the subscribe response"). What saves:
- the fields a message shares with the other messages of its publish (content type, publish time, delivery attempt,
  source, type) are encoded once per publish, as bytes (`_shared`);
- a plain message (no attributes, ordering key or trace context: most) is one join of its ack id, id and data, each
  after a head (the field's tag and length) taken from a table, and of those shared bytes;
- a message's attributes, ordering key and trace context, when set, are encoded again only when they differ from
  the message before's (the messages of a publish often share them), its attribute entries as text encoded once;
- nothing is built and then serialized again.

The bytes are upb's for the same response: the fields of a `ReceivedMessage` in field-number order, a field left
out when it is empty (proto3), a message's and a field's length as a varint. The one difference: a message's
`attributes` entries come in the mapping's own order, where upb writes its hash table's; both parse to the same
map (tests/test_broker_wire.py compares both ways, on varied input). Strings are encoded with `str.encode()`, which
refuses what no protobuf string can hold (a lone surrogate) with upb's own `UnicodeEncodeError`; a delivery attempt
outside int32 is refused with upb's `ValueError`.

Not here: a batch with a payload to send as a JSON value (`json_values`) is built by upb (`api/broker.py`
`_batch`): its conversion into a `google.protobuf.Value` costs most (about 21k instructions for a small object),
and costs least filled in place in the response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from ductape_processor.api.values import timestamp
from ductape_processor.runtime.brokers.messages import IncomingEvent

_INT64: Final = (1 << 64) - 1
"""An int64 or int32 field's value as its varint encodes it: a negative one as its 64-bit two's complement."""


def _computed_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS: Final = tuple(_computed_varint(value) for value in range(2048))
"""The varints of 0 to 2047 (one or two bytes): most lengths."""


def varint(value: int) -> bytes:
    """A protobuf varint of `value`, 0 or more (a negative int32 or int64 masked with `_INT64` first)."""
    return _VARINTS[value] if value < len(_VARINTS) else _computed_varint(value)


def _heads(tag: bytes, count: int) -> tuple[bytes, ...]:
    # The tag and length of a field for each length below `count`; none for 0, as a proto3 field left out.
    return (b"", *(tag + varint(length) for length in range(1, count)))


# A field's head (tag and length) for each length of the table; the tables hold about 8,800 bytes objects (about
# 0.4 MB). Longer fields and messages have their heads computed.
_ACK_ID_HEADS: Final = _heads(b"\x0a", 0x80)  # ReceivedMessage.ack_id, field 1
_ID_HEADS: Final = _heads(b"\x12", 0x80)  # id, field 2
_DATA_HEADS: Final = _heads(b"\x1a", 2048)  # data, field 3: most payloads are shorter than 2 KiB
_CONTENT_TYPE_HEADS: Final = _heads(b"\x22", 0x80)  # content_type, field 4
_SOURCE_HEADS: Final = _heads(b"\x42", 0x80)  # source, field 8
_TYPE_HEADS: Final = _heads(b"\x4a", 0x80)  # type, field 9
_MESSAGE_HEADS: Final = tuple(b"\x0a" + varint(length) for length in range(4096))
"""MessageBatch.messages (field 1): a message of any length below 4096 (its data shorter than 2 KiB), even 0."""


def _field(tag: bytes, value: bytes) -> bytes:
    """A length-delimited field; nothing when `value` is empty (proto3 leaves it out)."""
    return tag + varint(len(value)) + value if value else b""


def _shared(message: IncomingEvent) -> tuple[bytes, bytes, bytes]:
    """The fields a `ReceivedMessage` shares with the other messages of its publish, encoded: all of them, then
    apart those before and after a message's `attributes` (5): `content_type` (4); `publish_time` (6),
    `delivery_attempt` (7), `source` (8) and `type` (9). Made once a publish (once a message when each is its own)."""
    content_type, source, type_ = message.content_type.encode(), message.source.encode(), message.type.encode()
    attempt = message.delivery_attempt
    if not -0x8000_0000 <= attempt <= 0x7FFF_FFFF:
        raise ValueError(f"Value out of range: {attempt}")  # upb's words for an int32 field
    publish_time = timestamp(message.time).SerializeToString()  # upb: fewer instructions than two varints here
    attempt_field = b"\x38" + varint(attempt & _INT64) if attempt else b""
    try:
        head = _CONTENT_TYPE_HEADS[len(content_type)] + content_type
        tail = b"".join(
            (
                b"\x32",  # present even when empty (the epoch)
                _VARINTS[len(publish_time)],
                publish_time,
                attempt_field,
                _SOURCE_HEADS[len(source)],
                source,
                _TYPE_HEADS[len(type_)],
                type_,
            )
        )
    except IndexError:  # a string longer than its table
        head = _field(b"\x22", content_type)
        tail = b"".join(
            (
                b"\x32",
                _VARINTS[len(publish_time)],
                publish_time,
                attempt_field,
                _field(b"\x42", source),
                _field(b"\x4a", type_),
            )
        )
    return head + tail, head, tail


def _attributes(attributes: Mapping[str, str]) -> bytes:
    """`attributes` (5): an entry a key, each writing its key (1) and value (2) even when empty, as upb does."""
    # Most entries are short and ASCII: joined as text with one-character lengths and encoded once, which costs
    # about half as much as encoding each string and joining bytes (and less than upb's map). A character outside
    # ASCII (more bytes than characters) or a length past 127 (no such character in the table) shows in the
    # encoded length, and those entries are encoded piece by piece (which also raises upb's own error for a lone
    # surrogate, where the text's would give its place in the text).
    lengths = _ASCII_LENGTHS
    pieces: list[str] = []
    try:
        for key, value in attributes.items():
            key_length, value_length = len(key), len(value)
            pieces += (
                "*",
                lengths[key_length + value_length + 4],
                "\n",
                lengths[key_length],
                key,
                "\x12",
                lengths[value_length],
                value,
            )
        text = "".join(pieces)
        encoded = text.encode()
    except (IndexError, UnicodeEncodeError):  # a long entry, or a string no protobuf string can hold: see below
        pass
    else:
        if len(encoded) == len(text):
            return encoded
    parts: list[bytes] = []
    for key, value in attributes.items():
        key_bytes, value_bytes = key.encode(), value.encode()
        entry = b"\x0a" + varint(len(key_bytes)) + key_bytes + b"\x12" + varint(len(value_bytes)) + value_bytes
        parts += (b"\x2a", varint(len(entry)), entry)
    return b"".join(parts)


_ASCII_LENGTHS: Final = tuple(map(chr, range(0x80)))
"""The varints of 0 to 127 as text: one ASCII character each."""


def _received(message: IncomingEvent, head: bytes, tail: bytes) -> bytes:
    """A `ReceivedMessage`'s bytes, whatever its fields' lengths: `head` and `tail` from `_shared`."""
    return b"".join(
        (
            _field(b"\x0a", message.handle.encode()),
            _field(b"\x12", message.id.encode()),
            _field(b"\x1a", message.data),
            head,
            _attributes(message.attributes),
            tail,
            _field(b"\x52", message.ordering_key.encode()),
            _field(b"\x5a", message.traceparent.encode()),
            _field(b"\x62", message.tracestate.encode()),
        )
    )


def subscribe_batch(messages: Sequence[IncomingEvent]) -> bytes:
    """A `SubscribeResponse` whose `batch` holds `messages`, as the bytes gRPC sends (each payload as `data`)."""
    parts: list[bytes] = []
    append = parts.append
    join = b"".join
    ack_id_heads, id_heads, data_heads, message_heads = _ACK_ID_HEADS, _ID_HEADS, _DATA_HEADS, _MESSAGE_HEADS
    known: dict[tuple[object, ...], tuple[bytes, bytes, bytes]] = {}
    # The shared values of the message before: the messages of one publish usually come in a row, with the very same
    # values (adapters decode them once), so identity says they are the same without a hash of the five.
    time = source = type_ = content_type = None
    attempt = 0
    shared = head = tail = attribute_fields = ordering_key_field = trace_fields = b""
    last_attributes: Mapping[str, str] = {}
    last_ordering_key = last_traceparent = last_tracestate = ""
    for message in messages:
        if (
            message.time is not time
            or message.source is not source
            or message.type is not type_
            or message.content_type is not content_type
            or message.delivery_attempt != attempt
        ):
            time, source, type_ = message.time, message.source, message.type
            content_type, attempt = message.content_type, message.delivery_attempt
            key = (time, source, type_, content_type, attempt)
            encoded = known.get(key)
            if encoded is None:
                encoded = known[key] = _shared(message)
            shared, head, tail = encoded
        ack_id, id_, data = message.handle.encode(), message.id.encode(), message.data
        attributes = message.attributes
        ordering_key, traceparent, tracestate = message.ordering_key, message.traceparent, message.tracestate
        try:
            if not (attributes or ordering_key or traceparent or tracestate):
                # Most messages: the ack id, the id and the data after their heads, and the shared fields, in one
                # join.
                body = join(
                    (ack_id_heads[len(ack_id)], ack_id, id_heads[len(id_)], id_, data_heads[len(data)], data, shared)
                )
            else:
                # The attributes, the ordering key (10) and the trace context (11, 12), each encoded again only
                # when it differs from the message before's (the messages of a publish often have the same).
                if attributes != last_attributes:
                    last_attributes, attribute_fields = attributes, _attributes(attributes)
                if ordering_key != last_ordering_key:
                    last_ordering_key, ordering_key_field = ordering_key, _field(b"\x52", ordering_key.encode())
                if traceparent != last_traceparent or tracestate != last_tracestate:
                    last_traceparent, last_tracestate = traceparent, tracestate
                    trace_fields = _field(b"\x5a", traceparent.encode()) + _field(b"\x62", tracestate.encode())
                body = join(
                    (
                        ack_id_heads[len(ack_id)],
                        ack_id,
                        id_heads[len(id_)],
                        id_,
                        data_heads[len(data)],
                        data,
                        head,
                        attribute_fields,
                        tail,
                        ordering_key_field,
                        trace_fields,
                    )
                )
            append(message_heads[len(body)])
        except IndexError:  # a field or the message longer than its table: costs more, and is rare
            body = _received(message, head, tail)
            length = len(body)
            append(message_heads[length] if length < len(message_heads) else b"\x0a" + _computed_varint(length))
        append(body)
    if not parts:
        return b""  # no message: no batch, as upb writes a response whose `batch` was never added to
    batch = join(parts)
    return b"\x12" + varint(len(batch)) + batch  # SubscribeResponse.batch (2)
