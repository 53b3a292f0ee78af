"""BrokerService: Publish, PublishBatch and the Subscribe stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, cast

import grpc
import orjson
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from ductape_processor.api.calls import Context, deadline, first_message, require_target
from ductape_processor.api.streams import aborter, acks_and_nacks
from ductape_processor.api.values import json_to_value, seconds, set_timestamp, value_to_python
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers.messages import NO_ATTRIBUTES, IncomingEvent, OutgoingMessage
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
    # Runs for every message delivered, so each ReceivedMessage is built in place in the response (no copy of a
    # finished message into it): a copy of the fields it shares with the other messages of its publish (`_shared`,
    # made once per publish; `CopyFrom` costs less than setting them, or than merging them in as bytes), then only
    # the fields of its own that it has (each one set costs).
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


def _response(event: StreamEvent, json_values: bool = False) -> broker_pb2.SubscribeResponse:
    if isinstance(event, Batch):
        return _batch(event.messages, json_values)
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
    """`add_BrokerServiceServicer_to_server`, with the responses that PublishBatch encodes itself (`_published`)
    passed through to gRPC."""
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(servicer, cast(grpc.aio.Server, _PassedThrough(server)))


class _PassedThrough:
    """The server as the generated function sees it: its generic handler serves PublishBatch with `serialized`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_PublishBatchPassedThrough(handler) for handler in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        # The same handlers as the generic handler's, PublishBatch's serializer aside; the processor's server does
        # not register them (grpc_server._GenericHandlersOnly), so they are not passed on.
        pass


class _PublishBatchPassedThrough(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is not None and handler_call_details.method == PUBLISH_BATCH:
            # A named tuple (grpc's RpcMethodHandler): the same handler, another serializer.
            return handler._replace(response_serializer=serialized)  # type: ignore[attr-defined,no-any-return]
        return handler


PUBLISH_BATCH: Final = f"/{broker_pb2.DESCRIPTOR.services_by_name['BrokerService'].full_name}/PublishBatch"
_new = tuple.__new__
# `results` (field 1, 2 + ID_CHARS bytes long) holding a PublishResult whose `message_id` (field 1) is ID_CHARS long.
_RESULT_HEAD: Final = f"\n{chr(ID_CHARS + 2)}\n{chr(ID_CHARS)}"
_ID_LENGTH: Final = {ID_CHARS}


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService."""

    def __init__(self, runtime: BrokerRuntime) -> None:
        self._runtime = runtime

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

    async def PublishBatch(  # type: ignore[override]  # bytes: a response encoded already (`add_to_server`)
        self, request: broker_pb2.PublishBatchRequest, context: Context
    ) -> broker_pb2.PublishBatchResponse | bytes:
        product, env, event = request.product, request.env, request.event
        if not (product and env and event):
            require_target(request)
        entries: list[OutgoingMessage | ProcessorError] = []
        append = entries.append
        for message in request.messages:
            # Runs for every message: one that holds bytes (most) becomes its OutgoingMessage here, each field read
            # once and the tuple made without a call of Python code (`_outgoing` has the rest, and the errors).
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
        published = await self._runtime.publish_batch(product, env, event, entries, deadline(context))
        return _published(published)

    async def Subscribe(
        self, request_iterator: AsyncIterator[broker_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[broker_pb2.SubscribeResponse]:
        init = (await first_message(request_iterator, "init")).init
        require_target(init, "init.")
        if not init.group:
            raise InvalidArgument.field("init.group", "is required: the consumer group")
        stream = await self._runtime.subscribe(
            init.product, init.env, init.event, init.group, _limits(init), init.dead_letter_event
        )

        json_values = init.json_values
        async with contextlib.aclosing(stream.run(acks_and_nacks(request_iterator), aborter(context))) as events:
            async for event in events:
                yield _response(event, json_values)
