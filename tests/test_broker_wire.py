"""The Subscribe stream's batches encoded by hand (api/broker_wire.py) against the response built with upb, as the
servicer built it before (each `ReceivedMessage` added to a `SubscribeResponse` and its fields set): the same bytes,
or, where a message has two attributes or more (upb writes a map in its hash table's order), bytes that parse to the
same message. Through a real server and the clients, tests/test_brokers.py and the clients' own tests."""

from __future__ import annotations

import string
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import orjson
import pytest
from ductape.processor.v1 import broker_pb2
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ductape_processor.api.broker import SUBSCRIBE, BrokerServicer, _response, add_to_server, serialized
from ductape_processor.api.broker_wire import subscribe_batch, varint
from ductape_processor.api.values import json_to_value, set_timestamp
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.brokers.stream import Batch, Ready, StaleAcks

MOMENT = datetime(2026, 12, 5, 21, 30, 7, 123456, tzinfo=UTC)


def upb_value(data: bytes, target: struct_pb2.Value) -> bool:
    if not json_to_value(data, target):
        target.Clear()
        return False
    if target.WhichOneof("kind") is None:
        (target.struct_value if data.lstrip()[:1] == b"{" else target.list_value).SetInParent()
    return True


def upb_response(messages: Sequence[IncomingEvent], json_values: bool) -> broker_pb2.SubscribeResponse:
    """The response as the servicer built it with upb until 2026-12-05 (`api/broker.py` `_batch` at a86917e)."""
    response = broker_pb2.SubscribeResponse()
    add = response.batch.messages.add
    for message in messages:
        item = add(
            ack_id=message.handle,
            id=message.id,
            content_type=message.content_type,
            delivery_attempt=message.delivery_attempt,
            source=message.source,
            type=message.type,
            ordering_key=message.ordering_key,
            traceparent=message.traceparent,
            tracestate=message.tracestate,
        )
        set_timestamp(item.publish_time, message.time)
        if not (json_values and message.json_payload) or not upb_value(message.data, item.json):
            item.data = message.data
        item.attributes.update(message.attributes)
    return response


def event(
    data: bytes = b'{"order":7}',
    *,
    handle: str = "1733440000000-0",
    id: str = "01JEXAMPLE0000000000000000",
    source: str = "/ductape/shop/dev/events",
    type: str = "orders",
    time: datetime = MOMENT,
    content_type: str = "application/json",
    attributes: dict[str, str] | None = None,
    ordering_key: str = "",
    traceparent: str = "",
    delivery_attempt: int = 1,
    tracestate: str = "",
    json_payload: bool = False,
) -> IncomingEvent:
    return IncomingEvent(
        id,
        source,
        type,
        time,
        data,
        content_type,
        handle,
        attributes or {},
        ordering_key,
        traceparent,
        delivery_attempt,
        tracestate,
        json_payload,
    )


def sent(messages: Sequence[IncomingEvent], json_values: bool = False) -> bytes:
    """What gRPC sends for a batch of `messages` (its response serializer: `serialized`)."""
    return serialized(_response(Batch(list(messages)), json_values))


def assert_as_upb(messages: Sequence[IncomingEvent], json_values: bool = False) -> bytes:
    """The bytes sent parse to upb's response; they are upb's bytes unless a message has two attributes or more
    (the one place where the order of the bytes may differ)."""
    wire = sent(messages, json_values)
    expected = upb_response(messages, json_values)
    assert broker_pb2.SubscribeResponse.FromString(wire) == expected
    if all(len(message.attributes) < 2 for message in messages):
        assert wire == expected.SerializeToString()
    return wire


def test_a_plain_batch_is_encoded_by_hand_as_upbs_bytes() -> None:
    messages = [event(b"x" * size, handle=f"1733440000000-{size}", id=f"id-{size}") for size in range(0, 300, 7)]
    assert type(_response(Batch(messages))) is bytes, "encoded by hand, passed through"
    assert type(_response(Batch(messages), json_values=True)) is bytes, "no JSON payload to convert"
    assert_as_upb(messages)


@pytest.mark.parametrize(
    "changed",
    [
        {"handle": ""},
        {"id": ""},
        {"data": b""},
        {"content_type": ""},
        {"source": ""},
        {"type": ""},
        {"handle": "", "id": "", "data": b"", "content_type": "", "source": "", "type": "", "delivery_attempt": 0},
        {"delivery_attempt": 0},
        {"delivery_attempt": 1},
        {"delivery_attempt": 127},
        {"delivery_attempt": 128},
        {"delivery_attempt": 2**31 - 1},
        {"delivery_attempt": -1},  # int32's negative: ten bytes, as upb writes it
        {"delivery_attempt": -(2**31)},
        {"time": MOMENT.replace(microsecond=0)},
        {"time": datetime(1970, 1, 1, tzinfo=UTC)},  # an empty Timestamp, still present
        {"time": datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)},  # negative seconds
        {"time": datetime(1, 1, 1, tzinfo=UTC)},
        {"time": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)},
        {"time": MOMENT.astimezone(timezone(timedelta(hours=-5)))},
        {"time": MOMENT.replace(tzinfo=None)},  # naive: local time, as set_timestamp takes it
        {"handle": "é" * 70, "id": "日本" * 30},  # more bytes than characters, over 127 bytes
        {"handle": "h" * 127, "id": "i" * 128},
        {"source": "/ductape/ünïcode/😀", "type": "ördërs", "content_type": "text/plain; charset=ütf-8"},
        {"data": b"\x00\xff" * 1000},
        {"data": b"d" * 2047},
        {"data": b"d" * 2048},
        {"data": b"d" * 4096},
        {"data": b"d" * (16 * 1024 + 1)},
        {"data": b"d" * (2 * 1024 * 1024 + 1)},
        {"attributes": {"k": "v"}},
        {"attributes": {"": ""}},  # a map entry writes an empty key and value
        {"attributes": {"région": "ü" * 200}},
        {"ordering_key": "customer-1"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=1"},
        {"tracestate": "t" * 300},
        {"attributes": {"k": "v"}, "ordering_key": "o", "traceparent": "tp", "tracestate": "ts", "data": b"x" * 5000},
    ],
)
def test_each_field_and_edge_is_encoded_as_upb_does(changed: dict[str, Any]) -> None:
    messages = [event(**changed), event(), event(**changed)]
    assert_as_upb(messages)
    assert_as_upb(messages, json_values=True)  # not JSON payloads: json_values changes nothing


def test_many_attributes_parse_to_the_same_map() -> None:
    attributes = {f"key-{n}": "välue" * (n % 7) for n in range(1000)}
    wire = assert_as_upb([event(attributes=attributes), event(), event(attributes={"a": "1", "b": ""})])
    received = broker_pb2.SubscribeResponse.FromString(wire).batch.messages
    assert dict(received[0].attributes) == attributes
    assert dict(received[2].attributes) == {"a": "1", "b": ""}


@pytest.mark.parametrize(
    "data",
    [
        b'{"order":7,"items":[1,2.5,"x",null,true,{"deep":[]}]}',
        b"{}",
        b" []",
        b"null",
        b"1e3",
        b'"\xc3\xa9t\xc3\xa9"',
        b"not json",  # not JSON: sent as data, beside an empty json as upb left it
        b"",
        b'"\\ud800"',  # a lone surrogate no protobuf string can hold
        b"[" * 40 + b"]" * 40,  # deeper than MAX_JSON_DEPTH
        orjson.dumps({"big": "x" * 20_000}),
    ],
)
def test_json_payloads_are_sent_as_values_as_upb_did(data: bytes) -> None:
    messages = [event(data, json_payload=True), event(data), event(data, json_payload=True, attributes={"k": "v"})]
    assert_as_upb(messages, json_values=True)
    assert type(_response(Batch(messages), json_values=False)) is bytes, "sent as data: encoded by hand"
    assert_as_upb(messages, json_values=False)


def test_publishes_interleaved_in_one_batch_keep_their_own_shared_fields() -> None:
    first = dict(source="/a", type="orders", time=MOMENT, content_type="application/json", delivery_attempt=1)
    second = dict(source="/b", type="refunds", time=MOMENT.replace(microsecond=0), content_type="", delivery_attempt=3)
    # Equal values in other objects: the same shared fields, found again by value.
    third = dict(first, source="".join(["/", "a"]), time=MOMENT + timedelta(0))
    order = [first, first, second, first, third, second, second, first, third]
    messages = [event(f"m{n}".encode(), handle=f"h-{n}", id=f"id-{n}", **shared) for n, shared in enumerate(order)]
    wire = assert_as_upb(messages)
    received = broker_pb2.SubscribeResponse.FromString(wire).batch.messages
    assert [(m.source, m.type, m.delivery_attempt) for m in received] == [
        (shared["source"], shared["type"], shared["delivery_attempt"]) for shared in order
    ]


def test_each_message_has_its_own_attributes_ordering_key_and_trace_context_when_its_neighbours_share_them() -> None:
    traced = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "v=1"}
    own = [
        {"attributes": {"k": "v"}, **traced},
        {"attributes": {"k": "v"}, **traced},  # equal, another dict
        {"attributes": {"k": "w"}, "ordering_key": "a", **traced},
        {"ordering_key": "a"},  # no attributes after some
        {"ordering_key": "b", "tracestate": "v=1"},
        {"attributes": {"k": "v", "é": "ü"}, "traceparent": traced["traceparent"]},
        {},
        {"attributes": {"k": "v"}, "ordering_key": "b", **traced},
    ]
    messages = [event(f"m{n}".encode(), handle=f"h-{n}", **fields) for n, fields in enumerate(own)]
    received = broker_pb2.SubscribeResponse.FromString(assert_as_upb(messages)).batch.messages
    assert [(dict(m.attributes), m.ordering_key, m.traceparent, m.tracestate) for m in received] == [
        (f.get("attributes", {}), f.get("ordering_key", ""), f.get("traceparent", ""), f.get("tracestate", ""))
        for f in own
    ]


def test_an_empty_batch_is_an_empty_response_as_upb_writes_it() -> None:
    assert subscribe_batch([]) == upb_response([], False).SerializeToString() == b""


@pytest.mark.parametrize(
    "changed",
    [
        {"id": "\ud800"},
        {"handle": "a\udfffb"},
        {"source": "\ud800"},
        {"content_type": "\udc80"},
        {"attributes": {"\ud800": "v"}},
        {"attributes": {"k": "\ud800"}},
        {"ordering_key": "\ud800"},
    ],
)
def test_a_string_no_protobuf_string_can_hold_fails_as_with_upb(changed: dict[str, Any]) -> None:
    messages = [event(), event(**changed)]
    with pytest.raises(UnicodeEncodeError) as by_upb:
        upb_response(messages, False)
    with pytest.raises(UnicodeEncodeError) as by_hand:
        subscribe_batch(messages)
    assert str(by_hand.value) == str(by_upb.value)


@pytest.mark.parametrize("attempt", [2**31, -(2**31) - 1, 2**63])
def test_a_delivery_attempt_outside_int32_fails_as_with_upb(attempt: int) -> None:
    messages = [event(delivery_attempt=attempt)]
    with pytest.raises(ValueError, match="out of range") as by_upb:
        upb_response(messages, False)
    with pytest.raises(ValueError, match="out of range") as by_hand:
        subscribe_batch(messages)
    assert str(by_hand.value) == str(by_upb.value)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**31 - 1, 2**63, 2**64 - 1])
def test_varint_is_protobufs(value: int) -> None:
    message = broker_pb2.ReceivedMessage(delivery_attempt=value) if value < 2**31 else None
    if message is not None:
        assert b"\x38" + varint(value) == message.SerializeToString() or value == 0
    assert _decoded_varint(varint(value)) == value


def _decoded_varint(encoded: bytes) -> int:
    value = 0
    for shift, byte in enumerate(encoded):
        value |= (byte & 0x7F) << (7 * shift)
        assert (byte & 0x80 == 0) == (shift == len(encoded) - 1), "a continuation bit on every byte but the last"
    return value


_TEXT = st.text(max_size=40) | st.text(string.ascii_letters, min_size=100, max_size=200)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_SHARED = st.fixed_dictionaries(
    {
        "source": _TEXT,
        "type": _TEXT,
        "content_type": st.sampled_from(["", "application/json", "text/plain; charset=ü"]) | _TEXT,
        "time": st.datetimes(timezones=st.just(UTC) | st.timezones())
        | st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.replace(microsecond=0)),
        "delivery_attempt": st.integers(0, 3) | st.integers(-(2**31), 2**31 - 1),
    }
)


@st.composite
def _batches(draw: st.DrawFn) -> list[IncomingEvent]:
    publishes = draw(st.lists(_SHARED, min_size=1, max_size=3))
    messages = []
    for n in range(draw(st.integers(0, 12))):
        json_payload = draw(st.booleans())
        data = (
            draw(st.sampled_from([orjson.dumps(draw(_JSON)), b"not json", b"{}"]))
            if json_payload
            else draw(st.binary(max_size=200) | st.binary(min_size=2000, max_size=5000))
        )
        messages.append(
            event(
                data,
                handle=draw(st.sampled_from([f"1733440000000-{n}", ""]) | _TEXT),
                id=draw(st.sampled_from([f"01J{n:023d}", ""]) | _TEXT),
                attributes=draw(st.dictionaries(_TEXT, _TEXT, max_size=4) | st.just({})),
                ordering_key=draw(st.just("") | _TEXT),
                traceparent=draw(st.just("") | _TEXT),
                tracestate=draw(st.just("") | _TEXT),
                json_payload=json_payload,
                **draw(st.sampled_from(publishes)),  # the publish's very objects, as adapters give them
            )
        )
    return messages


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_batches(), json_values=st.booleans())
def test_varied_batches_are_encoded_as_upb_does(messages: list[IncomingEvent], json_values: bool) -> None:
    assert_as_upb(messages, json_values)


def test_stale_acks_and_ready_are_still_messages_serialized_as_before() -> None:
    stale = _response(StaleAcks(ack_ids=["a", "é"], expired_ack_ids=["é"]))
    assert stale == broker_pb2.SubscribeResponse(
        stale_acks=broker_pb2.StaleAcks(ack_ids=["a", "é"], expired_ack_ids=["é"])
    )
    ready = _response(Ready(subscription_id="0123abcd"))
    assert ready == broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id="0123abcd"))
    assert serialized(ready) == ready.SerializeToString()


def test_subscribe_responses_encoded_by_the_servicer_pass_through_and_messages_are_serialized() -> None:
    class Collected:
        def __init__(self) -> None:
            self.handlers: list[grpc.GenericRpcHandler] = []

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.handlers.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            pass

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method

    server = Collected()
    add_to_server(BrokerServicer(runtime=None), server)  # type: ignore[arg-type]
    [generic] = server.handlers
    handler = generic.service(Details(SUBSCRIBE))
    assert handler is not None and handler.response_serializer is not None and handler.stream_stream is not None
    wire = subscribe_batch([event()])
    assert handler.response_serializer(wire) is wire  # as it is
    ready = broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id="x"))
    assert handler.response_serializer(ready) == ready.SerializeToString()
