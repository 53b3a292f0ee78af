"""BrokerService: Publish, PublishBatch and the Subscribe stream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from ductape.processor.v1 import broker_pb2, broker_pb2_grpc

from ductape_processor.api.calls import Context, deadline, first_message, require_target
from ductape_processor.api.streams import aborter, acks_and_nacks
from ductape_processor.api.values import seconds, set_timestamp, value_to_python
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingMessage
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.brokers.stream import Batch, StaleAcks, StreamEvent
from ductape_processor.runtime.brokers.subscriptions import Limits


def _outgoing(message: broker_pb2.OutgoingMessage, field: str) -> OutgoingMessage:
    kind = message.WhichOneof("payload")
    if kind == "json":
        data = json.dumps(value_to_python(message.json), separators=(",", ":"), ensure_ascii=False).encode()
        content_type = message.content_type or "application/json"
    elif kind == "data":
        data, content_type = message.data, message.content_type
    else:
        raise InvalidArgument.field(f"{field}.payload", "give data (bytes) or json")
    return OutgoingMessage(data, content_type, dict(message.attributes), message.ordering_key, message.idempotency_key)


def _limits(init: broker_pb2.SubscribeInit) -> Limits:
    return Limits.checked(
        max_in_flight=init.max_in_flight,
        max_batch=init.max_batch,
        max_wait_s=seconds(init.max_wait) if init.HasField("max_wait") else None,
        ack_deadline_s=seconds(init.ack_deadline) if init.HasField("ack_deadline") else None,
        max_deliveries=init.max_deliveries,
        dead_letter_event=init.dead_letter_event,
    )


def _batch(messages: list[tuple[str, IncomingEvent]]) -> broker_pb2.SubscribeResponse:
    # Each ReceivedMessage is built in place in the response (no copy of a finished message into it): this runs
    # for every message delivered.
    response = broker_pb2.SubscribeResponse()
    batch = response.batch
    batch.SetInParent()
    received = batch.messages
    for ack_id, message in messages:
        item = received.add(
            ack_id=ack_id,
            id=message.id,
            data=message.data,
            content_type=message.content_type,
            delivery_attempt=message.delivery_attempt,
            source=message.source,
            type=message.type,
            ordering_key=message.ordering_key,
            traceparent=message.traceparent,
            tracestate=message.tracestate,
        )
        if message.attributes:
            item.attributes.update(message.attributes)
        set_timestamp(item.publish_time, message.time)
    return response


def _response(event: StreamEvent) -> broker_pb2.SubscribeResponse:
    if isinstance(event, Batch):
        return _batch(event.messages)
    if isinstance(event, StaleAcks):
        return broker_pb2.SubscribeResponse(
            stale_acks=broker_pb2.StaleAcks(ack_ids=event.ack_ids, expired_ack_ids=event.expired_ack_ids)
        )
    return broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id=event.subscription_id))


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

    async def PublishBatch(
        self, request: broker_pb2.PublishBatchRequest, context: Context
    ) -> broker_pb2.PublishBatchResponse:
        require_target(request)
        entries: list[OutgoingMessage | ProcessorError] = []
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
            deadline(context),
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
        init = (await first_message(request_iterator, "init")).init
        require_target(init, "init.")
        if not init.group:
            raise InvalidArgument.field("init.group", "is required: the consumer group")
        stream = await self._runtime.subscribe(
            init.product, init.env, init.event, init.group, _limits(init), init.dead_letter_event
        )

        async with contextlib.aclosing(stream.run(acks_and_nacks(request_iterator), aborter(context))) as events:
            async for event in events:
                yield _response(event)
