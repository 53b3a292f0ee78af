"""BrokerService: Publish, PublishBatch and the Subscribe stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from google.protobuf import duration_pb2

from ductape_processor.adapters.brokers.base import InboundMessage
from ductape_processor.api.status import error_trailers
from ductape_processor.api.values import timestamp, value_to_python
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers import BrokerRuntime, Outgoing
from ductape_processor.runtime.brokers.subscriptions import (
    Ignored,
    Limits,
    StreamClosing,
    SubscriberNotReading,
    Subscription,
)
from ductape_processor.runtime.policies import Deadline
from ductape_processor.telemetry.context import current_call

Context = grpc.aio.ServicerContext[Any, Any]
MAX_STALE_REPORTED = 10_000  # ids in one StaleAcks notice; more are dropped from the notice (still ignored)


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _outgoing(message: broker_pb2.OutgoingMessage, field: str) -> Outgoing:
    kind = message.WhichOneof("payload")
    if kind == "json":
        data = json.dumps(value_to_python(message.json), separators=(",", ":"), ensure_ascii=False).encode()
        content_type = message.content_type or "application/json"
    elif kind == "data":
        data, content_type = message.data, message.content_type
    else:
        raise InvalidArgument.field(f"{field}.payload", "give data (bytes) or json")
    return Outgoing(data, content_type, dict(message.attributes), message.ordering_key, message.idempotency_key)


def _where(product: str, env: str, event: str, prefix: str = "") -> None:
    for name, value in (("product", product), ("env", env), ("event", event)):
        if not value:
            raise InvalidArgument.field(prefix + name, "is required")


def _limits(init: broker_pb2.SubscribeInit) -> Limits:
    def bounded(value: int, default: int, high: int, field: str) -> int:
        if value < 0 or value > high:
            raise InvalidArgument.field(f"init.{field}", f"must be between 1 and {high} (0: {default})")
        return value or default

    max_wait = _seconds(init.max_wait) if init.HasField("max_wait") else 0.01
    ack_deadline = _seconds(init.ack_deadline) if init.HasField("ack_deadline") else 30.0
    if not 0 <= max_wait <= 60:
        raise InvalidArgument.field("init.max_wait", "must be between 0 and 60 s")
    if not 0.1 <= ack_deadline <= 3600:
        raise InvalidArgument.field("init.ack_deadline", "must be between 0.1 s and 1 h")
    if init.max_deliveries < 0:
        raise InvalidArgument.field("init.max_deliveries", "must not be negative")
    if init.max_deliveries and not init.dead_letter_event:
        raise InvalidArgument.field("init.dead_letter_event", "is required when max_deliveries is set")
    return Limits(
        max_in_flight=bounded(init.max_in_flight, 100, 10_000, "max_in_flight"),
        max_batch=bounded(init.max_batch, 100, 1000, "max_batch"),
        max_wait_s=max_wait,
        ack_deadline_s=ack_deadline,
        max_deliveries=init.max_deliveries,
    )


def _received(ack_id: str, message: InboundMessage) -> broker_pb2.ReceivedMessage:
    return broker_pb2.ReceivedMessage(
        ack_id=ack_id,
        id=message.id,
        data=message.data,
        content_type=message.content_type,
        attributes=message.attributes,
        publish_time=timestamp(message.time),
        delivery_attempt=message.delivery_attempt,
        source=message.source,
        type=message.type,
        ordering_key=message.ordering_key,
        traceparent=message.traceparent,
        tracestate=message.tracestate,
    )


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Serves BrokerService."""

    def __init__(self, runtime: BrokerRuntime) -> None:
        self._runtime = runtime

    async def Publish(self, request: broker_pb2.PublishRequest, context: Context) -> broker_pb2.PublishResponse:
        _where(request.product, request.env, request.event)
        message_id = await self._runtime.publish(
            request.product,
            request.env,
            request.event,
            _outgoing(request.message, "message"),
            deadline=Deadline(context.time_remaining()),
        )
        return broker_pb2.PublishResponse(message_id=message_id)

    async def PublishBatch(
        self, request: broker_pb2.PublishBatchRequest, context: Context
    ) -> broker_pb2.PublishBatchResponse:
        _where(request.product, request.env, request.event)
        entries: list[Outgoing | ProcessorError] = []
        for index, message in enumerate(request.messages):
            try:
                entries.append(_outgoing(message, f"messages[{index}]"))
            except ProcessorError as exc:
                entries.append(exc)
        published = await self._runtime.publish_batch(
            request.product,
            request.env,
            request.event,
            entries,
            Deadline(context.time_remaining()),
        )
        results = []
        for outcome in published:
            if isinstance(outcome, str):
                results.append(broker_pb2.PublishResult(message_id=outcome))
            else:
                results.append(
                    broker_pb2.PublishResult(code=outcome.code.value[0], reason=outcome.reason, message=outcome.message)
                )
        return broker_pb2.PublishBatchResponse(results=results)

    async def Subscribe(
        self, request_iterator: AsyncIterator[broker_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[broker_pb2.SubscribeResponse]:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            raise InvalidArgument.field("init", "the stream ended before its first request") from None
        if first.WhichOneof("kind") != "init":
            raise InvalidArgument.field("init", "the first request must carry init")
        init = first.init
        _where(init.product, init.env, init.event, "init.")
        if not init.group:
            raise InvalidArgument.field("init.group", "is required: the consumer group")
        subscription = await self._runtime.subscribe(
            init.product, init.env, init.event, init.group, _limits(init), init.dead_letter_event
        )
        try:
            yield broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id=secrets.token_hex(8)))
            async for response in self._stream(subscription, request_iterator, context):
                yield response
        finally:
            self._runtime.forget(subscription)
            await subscription.close()

    async def _stream(
        self, subscription: Subscription, requests: AsyncIterator[broker_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[broker_pb2.SubscribeResponse]:
        stale = broker_pb2.StaleAcks()
        noticed = asyncio.Event()

        def report(ignored: Ignored | None) -> None:
            if ignored is not None and len(stale.ack_ids) < MAX_STALE_REPORTED:
                included = ignored.ack_ids[: MAX_STALE_REPORTED - len(stale.ack_ids)]
                stale.ack_ids.extend(included)
                stale.expired_ack_ids.extend(set(ignored.expired).intersection(included))
                noticed.set()

        async def read() -> None:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    report(await subscription.ack(list(request.ack.ack_ids)))
                elif kind == "nack":
                    delay = _seconds(request.nack.delay) if request.nack.HasField("delay") else 0.0
                    if not 0 <= delay <= 3600:
                        raise InvalidArgument.field("nack.delay", "must be between 0 and 1 h")
                    report(await subscription.nack(list(request.nack.ack_ids), delay, request.nack.dead_letter))
                elif kind == "init":
                    raise InvalidArgument.field("init", "a stream takes init only once, as its first request")
                else:
                    raise InvalidArgument.field("kind", "a request must carry init, ack or nack")

        async def watch() -> None:
            if await subscription.watch():
                # The handler is stuck in a write the client does not read: end the call from here (the generator
                # is only finalised later, by the garbage collector).
                self._runtime.forget(subscription)
                call = current_call.get()
                code, message, trailers = error_trailers(
                    SubscriberNotReading(
                        f"the stream was not read for {subscription.stall_s:g} s; its messages went back to the group"
                    ),
                    call.request_id if call is not None else "",
                )
                with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
                    await context.abort(code, message, trailing_metadata=trailers)

        reader = asyncio.ensure_future(read())
        closing = asyncio.ensure_future(self._runtime.closing.wait())
        watcher = asyncio.ensure_future(watch())
        notice = asyncio.ensure_future(noticed.wait())
        fetching: asyncio.Future[list[tuple[str, InboundMessage]]] | None = None
        try:
            while True:
                if fetching is None:
                    fetching = asyncio.ensure_future(subscription.next_batch())
                waiting: set[asyncio.Future[Any]] = {fetching, reader, closing, watcher, notice}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if notice in done:
                    response = broker_pb2.SubscribeResponse(stale_acks=stale)
                    stale = broker_pb2.StaleAcks()
                    noticed.clear()
                    notice = asyncio.ensure_future(noticed.wait())
                    yield response
                    continue
                if fetching in done and not fetching.exception() and fetching.result():
                    batch = fetching.result()
                    fetching = None
                    subscription.writing(batch)
                    yield broker_pb2.SubscribeResponse(
                        batch=broker_pb2.MessageBatch(messages=[_received(a, m) for a, m in batch])
                    )
                    subscription.written(batch)
                    continue
                if closing in done:
                    raise StreamClosing("the server is shutting down; reconnect to another replica")
                for worker in (reader, fetching):
                    failure = worker.exception() if worker in done else None
                    if failure is not None:
                        raise failure
                return  # the client finished sending (or the subscription closed): the stream is over
        finally:
            workers: set[asyncio.Future[Any]] = {reader, closing, watcher, notice}
            if fetching is not None:
                workers.add(fetching)
            for pending in workers:
                pending.cancel()
            # Bounded: a driver that swallows a cancellation must not keep the stream (and its status) hanging;
            # the subscription's close() below stops any fetch still running.
            await asyncio.wait(workers, timeout=1.0)
            for pending in workers:
                if pending.done() and not pending.cancelled():
                    pending.exception()  # retrieved: already reported through the stream
