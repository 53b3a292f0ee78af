"""BrokerService: Publish, PublishBatch and the Subscribe stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final, NamedTuple, cast

import grpc
import orjson
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from ductape_processor.api.broker_wire import subscribe_batch
from ductape_processor.api.calls import Context, deadline, first_message, require_target
from ductape_processor.api.streams import DEFAULT_MAX_RESPONSE_BYTES, aborter, acks_and_nacks, batch_responses
from ductape_processor.api.values import json_to_value, seconds, set_timestamp, value_to_python
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers.messages import NO_ATTRIBUTES, IncomingEvent, OutgoingMessage, PlainMessages
from ductape_processor.runtime.brokers.publisher import ID_CHARS, BrokerRuntime
from ductape_processor.runtime.brokers.stream import Batch, StaleAcks, StreamEvent
from ductape_processor.runtime.brokers.subscriptions import Limits


def _outgoing(message: broker_pb2.OutgoingMessage, field: str, index: int | None = None) -> OutgoingMessage:
    # Runs for every message published, so it reads each field once and does nothing it need not: the field's name
    # (`messages[i]` in a batch) is spelled only for an error, a payload that holds bytes is not asked which member
    # of its oneof it is, and the attributes map is copied only when it has entries (iterating an empty protobuf
    # map through the Mapping protocol costs more than the rest of this function).
    data = message.data
    if data:
        content_type, json_payload = message.content_type, False
    else:
        kind = message.WhichOneof("payload")
        if kind == "data":  # set, and empty
            content_type, json_payload = message.content_type, False
        elif kind == "json":
            # Compact UTF-8 JSON (orjson: as json.dumps with separators=(",", ":"), ensure_ascii=False, in a fifth
            # of the time); a NaN or an infinity, which JSON cannot hold, becomes null.
            data = orjson.dumps(value_to_python(message.json))
            content_type, json_payload = message.content_type or "application/json", True
        else:
            where = field if index is None else f"{field}[{index}]"
            raise InvalidArgument.field(f"{where}.payload", "give data (bytes) or json")
    attributes = message.attributes
    return OutgoingMessage(
        data,
        content_type,
        dict(attributes) if attributes else NO_ATTRIBUTES,
        message.ordering_key,
        message.idempotency_key,
        json_payload,
    )


def _varint_size(value: int) -> int:
    """Bytes of `value` (>= 0) as a protobuf varint."""
    return 1 if value < 0x80 else 2 if value < 0x4000 else 3 if value < 0x200000 else 4 if value < 0x10000000 else 5


def _string_field_size(text: str) -> int:
    """Bytes of a proto3 string field numbered below 16 holding `text` (none when empty: it is not written)."""
    size = len(text.encode())
    return 1 + _varint_size(size) + size if size else 0


def _plain(message: broker_pb2.OutgoingMessage) -> bool:
    """A non-empty payload of bytes and nothing but a content type beside it."""
    return bool(message.data) and not (message.attributes or message.ordering_key or message.idempotency_key)


class ReceivedBatch(NamedTuple):
    """A PublishBatch request as the server hands it to the servicer (`add_to_server`): parsed, with the number of
    bytes it came in (`_only_columns`)."""

    request: broker_pb2.PublishBatchRequest
    size: int


def received_batch(data: bytes) -> ReceivedBatch:
    """PublishBatch's request deserializer: the request and its size."""
    return ReceivedBatch(broker_pb2.PublishBatchRequest.FromString(data), len(data))


def _only_columns(
    request: broker_pb2.PublishBatchRequest, data: list[bytes], content_types: list[str], size: int
) -> bool:
    """Whether the request, `size` bytes as received (or as upb encodes it), holds nothing but its target (product,
    env, event) and, in each message, a non-empty `data` and a `content_type`: no attributes, ordering key,
    idempotency key or unknown field anywhere.

    Told from the size: every other field present takes at least two bytes, and the fields counted take at least
    their shortest encoding (a client's longer one only adds), so the size equals what those fields take, encoded
    the shortest way, only when nothing else is there. What they take is summed over the columns (each step in C),
    so the lengths' varints must be of one size across the batch (payloads all under 128 bytes, or all from 128 to
    16383, ...); a batch that spans two, or has a non-ASCII content type (its UTF-8 length is not its `len`),
    answers False and is read the whole way. Reading each message's other three fields instead cost about 1.5k
    instructions a message (the attributes' map container alone about 1k)."""
    sizes = list(map(len, data))
    low, high = min(sizes), max(sizes)
    size_bytes = _varint_size(low)
    if not low or _varint_size(high) != size_bytes or not "".join(content_types).isascii():
        return False
    kinds = list(map(len, content_types))
    kinds_low, kinds_high = min(kinds), max(kinds)
    if not kinds_high:  # no content type given (not written)
        fixed = 1 + size_bytes
    elif kinds_low and _varint_size(kinds_low) == _varint_size(kinds_high):
        fixed = 2 + size_bytes + _varint_size(kinds_low)
    else:
        return False
    message_bytes = _varint_size(low + kinds_low + fixed)  # each message's length, as a varint
    if _varint_size(high + kinds_high + fixed) != message_bytes:
        return False
    expected = len(sizes) * (1 + message_bytes + fixed) + sum(sizes) + sum(kinds)
    expected += _string_field_size(request.product) + _string_field_size(request.env)
    return size == expected + _string_field_size(request.event)


def _entries(messages: Iterable[broker_pb2.OutgoingMessage]) -> list[OutgoingMessage | ProcessorError]:
    """A batch's messages, each as its `OutgoingMessage` or its error, in their positions (`messages[i]`)."""
    entries: list[OutgoingMessage | ProcessorError] = []
    append = entries.append
    for message in messages:
        # One that holds bytes becomes its OutgoingMessage here, each field read once and the tuple made without a
        # call of Python code (`_outgoing` has the rest, and the errors).
        data = message.data
        if data:
            attributes = message.attributes
            append(
                _new(
                    OutgoingMessage,
                    (
                        data,
                        message.content_type,
                        dict(attributes) if attributes else NO_ATTRIBUTES,
                        message.ordering_key,
                        message.idempotency_key,
                        False,
                    ),
                )
            )
            continue
        try:
            append(_outgoing(message, "messages", len(entries)))
        except ProcessorError as exc:
            append(exc)
    return entries


def _limits(init: broker_pb2.SubscribeInit) -> Limits:
    return Limits.checked(
        max_in_flight=init.max_in_flight,
        max_batch=init.max_batch,
        max_wait_s=seconds(init.max_wait) if init.HasField("max_wait") else None,
        ack_deadline_s=seconds(init.ack_deadline) if init.HasField("ack_deadline") else None,
        max_deliveries=init.max_deliveries,
        dead_letter_event=init.dead_letter_event,
    )


def _json_payload(data: bytes, target: struct_pb2.Value) -> bool:
    """Fill `target` with the JSON payload `data`; False (target cleared) when it cannot be a Value: not JSON, nested
    deeper than MAX_JSON_DEPTH, or a string no protobuf string can hold. The message then carries `data`."""
    if not json_to_value(data, target):
        target.Clear()
        return False
    if target.WhichOneof("kind") is None:  # an empty object or array at the top: still a value
        (target.struct_value if data.lstrip()[:1] == b"{" else target.list_value).SetInParent()
    return True


def _shared(message: IncomingEvent) -> broker_pb2.ReceivedMessage:
    """The fields a `ReceivedMessage` shares with the other messages of its publish (CloudEvents source, type,
    content type, publish time, and its delivery attempt): copied into each message of a batch, they are converted
    once per publish instead of once per message."""
    shared = broker_pb2.ReceivedMessage(
        content_type=message.content_type,
        delivery_attempt=message.delivery_attempt,
        source=message.source,
        type=message.type,
    )
    set_timestamp(shared.publish_time, message.time)
    return shared


def _batch(messages: list[IncomingEvent], json_values: bool) -> broker_pb2.SubscribeResponse:
    # Only for a batch with a payload to send as a JSON value (`_response`); the others are encoded by hand
    # (`subscribe_batch`). Each ReceivedMessage is built in place in the response (no copy of a finished message
    # into it; a Value converted in a message of its own and serialized alone cost 4k instructions more): a copy of
    # the fields it shares with the other messages of its publish (`_shared`, made once per publish; `CopyFrom`
    # costs less than setting them, or than merging them in as bytes), then only the fields of its own that it has
    # (each one set costs).
    response = broker_pb2.SubscribeResponse()
    add = response.batch.messages.add
    shared: dict[tuple[object, ...], broker_pb2.ReceivedMessage] = {}
    # The shared values of the message before: the messages of one publish usually come in a row, with the very same
    # values (adapters decode them once).
    time = source = type_ = content_type = None
    attempt = 0
    common = broker_pb2.ReceivedMessage()
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
            known = shared.get(key)
            if known is None:
                known = shared[key] = _shared(message)
            common = known
        item = add()
        item.CopyFrom(common)
        item.ack_id = message.handle  # its ack id
        item.id = message.id
        if not (json_values and message.json_payload) or not _json_payload(message.data, item.json):
            item.data = message.data
        if message.ordering_key:
            item.ordering_key = message.ordering_key
        if message.traceparent:
            item.traceparent = message.traceparent
        if message.tracestate:
            item.tracestate = message.tracestate
        if message.attributes:
            item.attributes.update(message.attributes)
    return response


def _batch_response(messages: list[IncomingEvent], json_values: bool) -> broker_pb2.SubscribeResponse | bytes:
    # A batch is encoded by hand and passed through to gRPC as it is (`subscribe_batch`, `add_to_server`), unless a
    # payload in it is to be sent as a JSON value: its conversion into a Value costs most, and costs least built in
    # place in the response by upb (`_batch`).
    if json_values and any(message.json_payload for message in messages):
        return _batch(messages, json_values)
    return subscribe_batch(messages)


def _response(event: StreamEvent, json_values: bool = False) -> broker_pb2.SubscribeResponse | bytes:
    # The responses other than batches are messages, serialized by `serialized`.
    if isinstance(event, Batch):
        return _batch_response(event.messages, json_values)
    if isinstance(event, StaleAcks):
        return broker_pb2.SubscribeResponse(
            stale_acks=broker_pb2.StaleAcks(ack_ids=event.ack_ids, expired_ack_ids=event.expired_ack_ids)
        )
    return broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id=event.subscription_id))


def _published(published: Sequence[str | ProcessorError]) -> broker_pb2.PublishBatchResponse | bytes:
    # A batch that all went out (most) is answered with its encoding, made by one join and passed through to gRPC
    # as it is (`serialized`): one `PublishResult` with a message id each, no message built and serialized again
    # (`add(message_id=...)`, a call with a keyword a message, cost three times as much as the parse of the join,
    # and the parse and the serialization together 0.9k instructions a message). Every id the runtime gives is
    # ID_CHARS ASCII characters long; the join is used only when every id has ID_CHARS characters and the bytes
    # are as long as those characters (so all ASCII): an id of another length could not be framed by the fixed
    # heads, however the lengths add up.
    if published:
        try:
            lengths = set(map(len, published))  # type: ignore[arg-type]
        except TypeError:  # an entry's error
            pass
        else:
            if lengths == _ID_LENGTH:
                encoded = (_RESULT_HEAD + _RESULT_HEAD.join(published)).encode()  # type: ignore[arg-type]
                if len(encoded) == len(published) * (len(_RESULT_HEAD) + ID_CHARS):
                    return encoded
    response = broker_pb2.PublishBatchResponse()
    add = response.results.add
    for outcome in published:
        if isinstance(outcome, str):
            add(message_id=outcome)
        else:
            add(code=outcome.code.value[0], reason=outcome.reason, message=outcome.message)
    return response


def serialized(response: Message | bytes) -> bytes:
    """A response as gRPC sends it: one the servicer encoded already (bytes) passes through as it is."""
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


def add_to_server(servicer: BrokerServicer, server: grpc.aio.Server) -> None:
    """`add_BrokerServiceServicer_to_server`, with the responses that PublishBatch and Subscribe encode themselves
    (`_published`, `subscribe_batch`) passed through to gRPC."""
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, cast(grpc.aio.Server, _PassedThrough(server)))


class _PassedThrough:
    """The server as the generated function sees it: its generic handler serves PublishBatch and Subscribe with
    `serialized`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_EncodedPassedThrough(handler) for handler in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        # The same handlers as the generic handler's, the serializers aside; the processor's server does
        # not register them (grpc_server._GenericHandlersOnly), so they are not passed on.
        pass


class _EncodedPassedThrough(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is not None and handler_call_details.method == PUBLISH_BATCH:
            # A named tuple (grpc's RpcMethodHandler): the same handler, another deserializer and serializer.
            return handler._replace(  # type: ignore[attr-defined,no-any-return]
                request_deserializer=received_batch, response_serializer=serialized
            )
        if handler is not None and handler_call_details.method == SUBSCRIBE:
            # Batches encoded already (`subscribe_batch`), the other responses messages.
            return handler._replace(response_serializer=serialized)  # type: ignore[attr-defined,no-any-return]
        return handler


PUBLISH_BATCH: Final = f"/{broker_pb2.DESCRIPTOR.services_by_name['BrokerService'].full_name}/PublishBatch"
SUBSCRIBE: Final = f"/{broker_pb2.DESCRIPTOR.services_by_name['BrokerService'].full_name}/Subscribe"
_new = tuple.__new__
# `results` (field 1, 2 + ID_CHARS bytes long) holding a PublishResult whose `message_id` (field 1) is ID_CHARS long.
_RESULT_HEAD: Final = f"\n{chr(ID_CHARS + 2)}\n{chr(ID_CHARS)}"
_ID_LENGTH: Final = {ID_CHARS}


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService."""

    def __init__(self, runtime: BrokerRuntime, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self._runtime = runtime
        self._max_response_bytes = max_response_bytes  # the server's send limit (`max_message_bytes`)

    async def Publish(self, request: broker_pb2.PublishRequest, context: Context) -> broker_pb2.PublishResponse:
        require_target(request)
        message_id = await self._runtime.publish(
            request.product,
            request.env,
            request.event,
            _outgoing(request.message, "message"),
            deadline=deadline(context),
        )
        return broker_pb2.PublishResponse(message_id=message_id)

    async def PublishBatch(  # type: ignore[override]  # received as ReceivedBatch, answered as bytes (`add_to_server`)
        self, request: ReceivedBatch | broker_pb2.PublishBatchRequest, context: Context
    ) -> broker_pb2.PublishBatchResponse | bytes:
        if isinstance(request, ReceivedBatch):
            batch, size = request
        else:  # called in process, not through the server: the size upb encodes it to
            batch, size = request, -1
        product, env, event = batch.product, batch.env, batch.event
        if not (product and env and event):
            require_target(batch)
        messages = batch.messages
        # Runs for every message: a batch of plain messages (a non-empty payload of bytes and a content type, nothing
        # else: most batches) is handed on as two columns, two fields read a message and no object made
        # (`PlainMessages`; the runtime checks their sizes in one pass). That nothing else is set anywhere in the
        # request is told from its size (`_only_columns`), not by reading each message's other three fields. Any
        # other batch is read the whole way (`_entries`), each entry checked and refused at its position; one whose
        # first message is not plain (all keyed, say) at once, without reading its columns first.
        entries: PlainMessages | list[OutgoingMessage | ProcessorError] | None = None
        if messages and _plain(messages[0]):
            data: list[bytes] = []
            content_types: list[str] = []
            add_data, add_content_type = data.append, content_types.append
            for message in messages:
                add_data(message.data)
                add_content_type(message.content_type)
            if _only_columns(batch, data, content_types, batch.ByteSize() if size < 0 else size):
                entries = PlainMessages(data, content_types)
        if entries is None:
            entries = _entries(messages)
        published = await self._runtime.publish_batch(product, env, event, entries, deadline(context))
        return _published(published)

    async def Subscribe(  # type: ignore[override]  # bytes: a batch encoded already (`add_to_server`)
        self, request_iterator: AsyncIterator[broker_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[broker_pb2.SubscribeResponse | bytes]:
        init = (await first_message(request_iterator, "init")).init
        require_target(init, "init.")
        if not init.group:
            raise InvalidArgument.field("init.group", "is required: the consumer group")
        stream = await self._runtime.subscribe(
            init.product, init.env, init.event, init.group, _limits(init), init.dead_letter_event
        )

        json_values, limit = init.json_values, self._max_response_bytes
        async with contextlib.aclosing(stream.run(acks_and_nacks(request_iterator), aborter(context))) as events:
            async for event in events:
                if not isinstance(event, Batch):
                    yield _response(event, json_values)
                    continue
                # A batch larger than gRPC lets the server send is written in parts; a message too large on its own
                # would end the stream (and come back to end the next one): the runtime sends it elsewhere.
                too_large: list[IncomingEvent] = []
                for response in batch_responses(
                    event.messages, lambda batch: _batch_response(batch, json_values), limit, too_large
                ):
                    yield response
                if too_large:
                    await stream.undeliverable(too_large, limit)
