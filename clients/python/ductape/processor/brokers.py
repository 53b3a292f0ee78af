"""Message brokers from Python: publish, publish in batches, and consume a topic with `async for`.

    async for message in processor.message_broker.subscribe(product="shop", env="prd",
                                                             event="events:user-created", group="mailer"):
        handle(message.json())
        await message.ack()

A message published as JSON (`json=...`) arrives as that value (`message.json()`, no parsing); one published as
bytes keeps them (`message.data`; `message.json()` parses them). Acks and nacks are batched on the wire. When the
stream ends with UNAVAILABLE (a replica shutting down, a network blip) the subscription reconnects with jittered
exponential backoff; messages that were not acked are delivered again by the broker, so handlers must tolerate
repeats (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, NotRequired, Self, TypedDict, TypeVar, Unpack, cast

import grpc
from ductape.processor.calls import Caller, CallMetadata, ResourceClient
from ductape.processor.errors import ProcessorError, from_rpc_error
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from ductape.processor.values import RecordT, from_value, record_from
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message as ProtoMessage

ACK_FLUSH_S = 0.01
"""Acks wait at most this long on the client before they are sent (in one request)."""
ACK_FLUSH_COUNT = 100
"""Acks sent in one request once that many wait, or a quarter of the stream's `max_in_flight` when larger: a busy
stream sends fewer, larger requests (each costs both sides more than the acks in it), and its server still has
three quarters of its credit while they wait."""


def duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


class MessageFields(TypedDict, total=False):
    """The keyword arguments of `outgoing`, which `BrokerClient.publish` takes too."""

    data: bytes | None
    json: Any
    content_type: str
    attributes: Mapping[str, str] | None
    ordering_key: str
    idempotency_key: str


def outgoing(
    data: bytes | None = None,
    *,
    json: Any = None,
    content_type: str = "",
    attributes: Mapping[str, str] | None = None,
    ordering_key: str = "",
    idempotency_key: str = "",
) -> broker_pb2.OutgoingMessage:
    """A message to publish: `data` bytes (say what they are in `content_type`) or a `json` value."""
    # Only the fields given: each keyword costs, and an empty map passed to the constructor costs more than all the
    # others together (this runs for every message of a batch).
    message = broker_pb2.OutgoingMessage(data=data) if data is not None else broker_pb2.OutgoingMessage()
    if data is None:
        json_format.ParseDict(json, message.json)
    if content_type:
        message.content_type = content_type
    if attributes:
        message.attributes.update(attributes)
    if ordering_key:
        message.ordering_key = ordering_key
    if idempotency_key:
        message.idempotency_key = idempotency_key
    return message


class StreamOptions(TypedDict, total=False):
    """How `subscribe` and `webhook.receive` run their stream: `max_wait` and `ack_deadline` (seconds, sent in the
    stream's first message; the server's default when not given), `auto_ack` (ack each item once the loop's body
    is done with it; default False), `reconnect` (on UNAVAILABLE; default True), and `metadata` added to the
    stream's gRPC metadata, on every reconnect too (a caller's `traceparent`, its own `x-request-id`)."""

    max_wait: float | None
    ack_deadline: float | None
    auto_ack: bool
    reconnect: bool
    metadata: CallMetadata | None


_STREAM_OPTIONS = frozenset(StreamOptions.__annotations__)


class SubscribeFields(StreamOptions):
    """What `subscribe` takes: the topic (`broker_tag:topic_tag` in `event`), the consumer `group`, limits (0 or "":
    the server's default) and `json_values` (default True: a message published as JSON arrives as its value; False:
    as UTF-8 JSON bytes), sent as the stream's first message, and the `StreamOptions`."""

    product: str
    env: str
    event: str
    group: str
    max_in_flight: NotRequired[int]
    max_batch: NotRequired[int]
    max_deliveries: NotRequired[int]
    dead_letter_event: NotRequired[str]
    json_values: NotRequired[bool]


@dataclass(slots=True)
class PublishResult:
    """One batch entry's outcome: `message_id`, or the error's `code`, `reason` and `message`. Read-only by
    convention (not frozen: one is built per message published, and a frozen one costs four times as much)."""

    message_id: str
    code: grpc.StatusCode
    reason: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the entry was published."""
        return self.code == grpc.StatusCode.OK


@dataclass(eq=False, kw_only=True)
class StreamItem:
    """What a Subscribe-style stream delivers: settled by its ack id, on the stream that delivered it."""

    ack_id: str
    _subscription: StreamSubscription[Any] = field(repr=False)
    _generation: int = field(repr=False, default=0)

    async def ack(self) -> None:
        """Done: it is not delivered again."""
        self._subscription._queue_ack(self)

    async def nack(self, *, delay: float = 0.0, dead_letter: bool = False) -> None:
        """Deliver again after `delay` seconds, or (a message) send it to the dead-letter topic now."""
        await self._subscription._send_nack(self, delay, dead_letter)


ItemT = TypeVar("ItemT", bound=StreamItem)


_UNREAD: Any = object()  # a Message's payload, attributes or time not converted yet


class Message(StreamItem):
    """A delivered message. Ack it when done, or nack it to have it delivered again.

    It reads its fields from the `ReceivedMessage` it came in, converting on first use: a subscriber that reads only
    the payload pays for nothing else (this runs for every message).
    """

    def __init__(self, received: broker_pb2.ReceivedMessage, subscription: StreamSubscription[Any], generation: int):
        # StreamItem's fields set here rather than through its keyword __init__: this runs for every message.
        self.ack_id = received.ack_id
        self._subscription = subscription
        self._generation = generation
        self._received = received
        self._value: Any = _UNREAD
        self._data: bytes | None = None
        self._attributes: dict[str, str] | None = None
        self._publish_time: datetime | None = None

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, type={self.type!r}, delivery_attempt={self.delivery_attempt})"

    @property
    def id(self) -> str:
        """The message's id (its CloudEvents id), the same on every delivery."""
        return self._received.id

    @property
    def data(self) -> bytes:
        """The payload as bytes; for a message published as JSON, its UTF-8 JSON."""
        if self._data is None:
            received = self._received
            if received.HasField("json"):
                self._data = jsonlib.dumps(self.json(), separators=(",", ":"), ensure_ascii=False).encode()
            else:
                self._data = received.data
        return self._data

    def json(self) -> Any:
        """The payload as a JSON value: the value it was published as (whole numbers as ints), or its bytes parsed
        as JSON when it was published as bytes."""
        if self._value is _UNREAD:
            received = self._received
            self._value = from_value(received.json) if received.HasField("json") else jsonlib.loads(received.data)
        return self._value

    @property
    def published_as_json(self) -> bool:
        """Whether it arrived as the JSON value it was published as (`json`) rather than as bytes."""
        return self._received.HasField("json")

    @property
    def content_type(self) -> str:
        """The payload's media type."""
        return self._received.content_type

    @property
    def attributes(self) -> dict[str, str]:
        """The attributes it was published with."""
        if self._attributes is None:
            self._attributes = dict(self._received.attributes)
        return self._attributes

    @property
    def publish_time(self) -> datetime:
        """When it was published (UTC)."""
        if self._publish_time is None:
            self._publish_time = self._received.publish_time.ToDatetime(UTC)
        return self._publish_time

    @property
    def delivery_attempt(self) -> int:
        """1 on the first delivery, then 2, 3, ..."""
        return self._received.delivery_attempt

    @property
    def source(self) -> str:
        """The CloudEvents source: `/ductape/<product>/<env>/<broker>`."""
        return self._received.source

    @property
    def type(self) -> str:
        """The CloudEvents type: the topic's name."""
        return self._received.type

    @property
    def ordering_key(self) -> str:
        """The ordering key it was published with."""
        return self._received.ordering_key

    @property
    def traceparent(self) -> str:
        """The W3C trace context it was published with."""
        return self._received.traceparent

    @property
    def tracestate(self) -> str:
        """The W3C `tracestate` that travels with `traceparent`."""
        return self._received.tracestate


class StreamSubscription(Generic[ItemT]):
    """An open Subscribe-style stream (BrokerService.Subscribe, WebhookService.Receive); iterate it with
    `async for`. `close()` ends it. A subclass names the stream's request, method and items.

    `stale_acks` counts the acks and nacks the server ignored because their message was no longer outstanding;
    `expired_acks` those of them that came after the message's ack deadline (it may be delivered again).
    """

    _request: Any = broker_pb2.SubscribeRequest
    """The stream's request message (its `init`, `ack` and `nack`)."""

    def __init__(
        self,
        stub: Any,
        init: Any,
        *,
        metadata: Sequence[tuple[str, str]],
        auto_ack: bool,
        reconnect: bool,
        max_backoff: float = 5.0,
    ) -> None:
        self._stub = stub
        self._init = init
        self._metadata = tuple(metadata)
        self._auto_ack = auto_ack
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._pending_acks: list[str] = []
        self._flush_count = max(ACK_FLUSH_COUNT, init.max_in_flight // 4)
        self._flusher: asyncio.Task[None] | None = None
        self._call: Any = None
        self._generation = 0
        self._closed = False
        self.reconnects = 0
        self.stale_acks = 0
        self.expired_acks = 0

    def __aiter__(self) -> AsyncIterator[ItemT]:
        return self._messages()

    def _method(self) -> Any:
        """The stub's streaming method (the aio stub takes an async iterator)."""
        return self._stub.Subscribe

    def _items(self, response: Any) -> Any:
        """The delivered items of a batch response."""
        return response.batch.messages

    def _message(self, received: Any) -> ItemT:
        """A delivered item as the caller gets it (`_item` builds it)."""
        raise NotImplementedError

    @classmethod
    def opened(cls, stub: Any, caller: Caller, init: type[ProtoMessage], fields: Mapping[str, Any]) -> Self:
        """A stream whose first message is `init` made of `fields`, run as the `StreamOptions` among them say."""
        options = cast(StreamOptions, {key: value for key, value in fields.items() if key in _STREAM_OPTIONS})
        first: Any = init(**{key: value for key, value in fields.items() if key not in _STREAM_OPTIONS})
        for name in ("max_wait", "ack_deadline"):
            seconds = options.get(name)
            if seconds is not None:
                getattr(first, name).CopyFrom(duration(cast(float, seconds)))
        return cls(
            stub,
            first,
            metadata=caller.metadata(options.get("metadata")),
            auto_ack=options.get("auto_ack", False),
            reconnect=options.get("reconnect", True),
        )

    def _item(self, record: type[RecordT], received: ProtoMessage, **given: Any) -> RecordT:
        """A `record` (a `StreamItem`) from a delivered item's message (`record_from`), on this stream."""
        return record_from(record, received, _subscription=self, _generation=self._generation, **given)

    async def _open(self) -> Any:
        # End the previous stream's request iterator: left waiting on its queue, gRPC's task that drains it would
        # stay pending until garbage-collected mid-iteration ("aclose(): asynchronous generator is already running").
        self._requests.put_nowait(None)
        self._requests = asyncio.Queue()
        self._pending_acks = []
        self._generation += 1
        await self._requests.put(self._request(init=self._init))
        requests = self._requests

        async def request_iterator() -> AsyncIterator[Any]:
            while True:
                request = await requests.get()
                if request is None:
                    return
                yield request

        call = self._method()(request_iterator(), metadata=self._metadata)
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "ready":
            raise ProcessorError(grpc.StatusCode.INTERNAL, "the server did not confirm the subscription")
        return call

    async def _messages(self) -> AsyncIterator[ItemT]:
        backoff = 0.1
        while not self._closed:
            try:
                self._call = await self._open()
                backoff = 0.1
                while True:
                    response = await self._call.read()
                    if response is grpc.aio.EOF:
                        return
                    if response.HasField("stale_acks"):
                        self.stale_acks += len(response.stale_acks.ack_ids)
                        self.expired_acks += len(response.stale_acks.expired_ack_ids)
                        continue
                    for received in self._items(response):
                        message = self._message(received)
                        yield message
                        if self._auto_ack:
                            await message.ack()
            except grpc.aio.AioRpcError as exc:
                if self._closed or (exc.code() == grpc.StatusCode.CANCELLED and self._closed):
                    return
                if not self._reconnect or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(exc) from None
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, self._max_backoff)

    def _queue_ack(self, message: StreamItem) -> None:
        if message._generation != self._generation or self._closed:
            return  # from an earlier stream: the broker delivers it again anyway
        self._pending_acks.append(message.ack_id)
        if len(self._pending_acks) >= self._flush_count:
            self._flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(ACK_FLUSH_S)
        self._flush()

    def _flush(self) -> None:
        if self._pending_acks:
            ids, self._pending_acks = self._pending_acks, []
            self._requests.put_nowait(self._request(ack=broker_pb2.Acknowledge(ack_ids=ids)))

    async def _send_nack(self, message: StreamItem, delay: float, dead_letter: bool) -> None:
        if message._generation != self._generation or self._closed:
            return
        self._flush()
        await self._requests.put(
            self._request(
                nack=broker_pb2.NegativeAcknowledge(
                    ack_ids=[message.ack_id], delay=duration(delay), dead_letter=dead_letter
                )
            )
        )

    async def close(self) -> None:
        """Flush acks and end the stream; unacked messages go back to the group."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        await self._requests.put(None)
        if self._call is not None and not self._call.done():
            with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(self._drain(), 2.0)
            self._call.cancel()

    async def _drain(self) -> None:
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # close() itself is being cancelled
            # else: an earlier reader was cancelled, which cancelled the call: nothing left to drain


class Subscription(StreamSubscription[Message]):
    """A Subscribe stream's messages (see `StreamSubscription`)."""

    def _message(self, received: broker_pb2.ReceivedMessage) -> Message:
        return Message(received, self, self._generation)  # not `_item`: it reads its fields lazily (see Message)


class BrokerClient(ResourceClient):
    """`processor.message_broker`: publish and subscribe."""

    _stub: broker_pb2_grpc.BrokerServiceAsyncStub

    async def publish(
        self,
        *,
        product: str,
        env: str,
        event: str,
        metadata: CallMetadata | None = None,
        **message: Unpack[MessageFields],
    ) -> str:
        """Publish one message to `broker_tag:topic_tag`; returns its id. The message is given as to `outgoing`:
        `data` bytes or a `json` value, `content_type`, `attributes`, `ordering_key`, `idempotency_key`.

        `metadata` is added to this call's gRPC metadata (a caller's `traceparent`, its own `x-request-id`).
        """
        request = broker_pb2.PublishRequest(product=product, env=env, event=event, message=outgoing(**message))
        return str((await self._call(self._stub.Publish, request, metadata=metadata)).message_id)

    async def publish_batch(
        self,
        *,
        product: str,
        env: str,
        event: str,
        messages: Sequence[broker_pb2.OutgoingMessage],
        metadata: CallMetadata | None = None,
    ) -> list[PublishResult]:
        """Publish many messages (build them with `outgoing(...)`); one result per message, in order."""
        request = broker_pb2.PublishBatchRequest(product=product, env=env, event=event, messages=list(messages))
        response = await self._call(self._stub.PublishBatch, request, metadata=metadata)
        ok = grpc.StatusCode.OK
        return [
            PublishResult(r.message_id, ok)
            if r.code == 0
            else PublishResult(r.message_id, _code(r.code), r.reason, r.message)
            for r in response.results
        ]

    def subscribe(self, **fields: Unpack[SubscribeFields]) -> Subscription:
        """A subscription to iterate with `async for`; same `group` = shared messages."""
        return Subscription.opened(self._stub, self._call, broker_pb2.SubscribeInit, {"json_values": True, **fields})


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
