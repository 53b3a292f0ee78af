"""WebhookService: proto in, WebhookRuntime / WebhookReceiver call, proto out."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta

from ductape.processor.v1 import broker_pb2, webhook_pb2, webhook_pb2_grpc
from google.protobuf import duration_pb2

from ductape_processor.api.calls import Context, ProductEnv, first_message, product_env
from ductape_processor.api.streams import DEFAULT_MAX_RESPONSE_BYTES, aborter, acks_and_nacks, batch_responses
from ductape_processor.api.values import python_to_value, required, seconds, timestamp, value_to_python
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.brokers.stream import Batch, StaleAcks, StreamEvent
from ductape_processor.runtime.brokers.subscriptions import Limits
from ductape_processor.runtime.webhooks.emitter import (
    AttemptRecord,
    DeliveryDetail,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryStatus,
    DispatchStatus,
    EmitCall,
    ReceivedRecord,
    WebhookRuntime,
)
from ductape_processor.runtime.webhooks.receiver import WebhookReceiver, received


class _DeliveryRef(ProductEnv):
    delivery_id: str


def _delivery(request: webhook_pb2.GetDeliveryRequest | webhook_pb2.RedeliverRequest) -> _DeliveryRef:
    return _DeliveryRef(
        **product_env(request), delivery_id=required(request.delivery_id, "delivery_id", "the delivery's id")
    )


def _attempt(attempt: AttemptRecord) -> webhook_pb2.DeliveryAttempt:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(milliseconds=attempt.duration_ms))
    return webhook_pb2.DeliveryAttempt(
        number=attempt.number,
        start_time=timestamp(attempt.started_at),
        duration=duration,
        response_code=attempt.response_code,
        response_excerpt=attempt.excerpt,
        error=attempt.error,
        success=attempt.success,
    )


def delivery_message(delivery: DeliveryRecord, detail: DeliveryDetail | None = None) -> webhook_pb2.Delivery:
    """A delivery as the API shows it; with `detail`, its attempts and payload too."""
    message = webhook_pb2.Delivery(
        delivery_id=delivery.delivery_id,
        message_id=delivery.message_id,
        event=f"{delivery.webhook}:{delivery.event}",
        endpoint=delivery.endpoint,
        status=webhook_pb2.DeliveryStatus.ValueType(int(delivery.status)),
        attempts=delivery.attempts,
        create_time=timestamp(delivery.created_at),
        last_response_code=delivery.last_code,
    )
    if delivery.next_attempt_at is not None and delivery.status == DeliveryStatus.PENDING:
        message.next_attempt_time.CopyFrom(timestamp(delivery.next_attempt_at))
    if detail is not None:
        message.attempt_details.extend(_attempt(a) for a in detail.attempts)
        if detail.body:
            message.payload.CopyFrom(python_to_value(json.loads(detail.body).get("data")))
    return message


def received_message(record: ReceivedRecord) -> webhook_pb2.ReceivedWebhook:
    """A received webhook as the API shows it."""
    message = webhook_pb2.ReceivedWebhook(
        id=record.received_id,
        webhook=record.webhook,
        webhook_id=record.webhook_id if record.webhook_id != record.received_id else "",
        receive_time=timestamp(record.received_at),
        body=record.body,
        content_type=record.content_type,
        headers=json.loads(record.headers) if record.headers else {},
    )
    if record.dispatch_status != DispatchStatus.NONE:
        made = json.loads(record.dispatch_result) if record.dispatch_result else {}
        dispatch = message.dispatch
        dispatch.status = webhook_pb2.DispatchStatus.ValueType(int(record.dispatch_status))
        dispatch.attempts = record.dispatch_attempts
        dispatch.message_id = made.get("message_id", "")
        dispatch.job_id = made.get("job_id", "")
        dispatch.process_id = made.get("process_id", "")
        dispatch.error = made.get("error", "")
        if record.dispatch_status == DispatchStatus.PENDING and record.dispatch_at is not None:
            dispatch.next_attempt_time.CopyFrom(timestamp(record.dispatch_at))
    return message


def _batch(messages: list[IncomingEvent]) -> webhook_pb2.ReceiveResponse:
    deliveries = [
        webhook_pb2.ReceivedDelivery(
            ack_id=message.handle,
            webhook=received_message(received(message)),
            delivery_attempt=message.delivery_attempt,
        )
        for message in messages
    ]
    return webhook_pb2.ReceiveResponse(batch=webhook_pb2.ReceivedBatch(deliveries=deliveries))


def _response(event: StreamEvent) -> webhook_pb2.ReceiveResponse:
    if isinstance(event, Batch):
        return _batch(event.messages)
    if isinstance(event, StaleAcks):
        return webhook_pb2.ReceiveResponse(
            stale_acks=broker_pb2.StaleAcks(ack_ids=event.ack_ids, expired_ack_ids=event.expired_ack_ids)
        )
    return webhook_pb2.ReceiveResponse(ready=broker_pb2.SubscribeReady(subscription_id=event.subscription_id))


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    """Serves WebhookService."""

    def __init__(
        self, runtime: WebhookRuntime, receiver: WebhookReceiver, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    ) -> None:
        self._runtime = runtime
        self._receiver = receiver
        self._max_response_bytes = max_response_bytes  # the server's send limit (`max_message_bytes`)

    async def Emit(self, request: webhook_pb2.EmitRequest, context: Context) -> webhook_pb2.EmitResponse:
        call = EmitCall(
            **product_env(request),
            event=required(request.event, "event", "webhook_tag:event_tag"),
            payload=value_to_python(request.payload) if request.HasField("payload") else None,
            idempotency_key=request.idempotency_key,
        )
        emitted = await self._runtime.emit(call)
        return webhook_pb2.EmitResponse(
            message_id=emitted.message_id,
            delivery_ids=emitted.delivery_ids,
            duplicate=emitted.duplicate,
            process_id=emitted.process_id,
        )

    async def ListDeliveries(
        self, request: webhook_pb2.ListDeliveriesRequest, context: Context
    ) -> webhook_pb2.ListDeliveriesResponse:
        try:
            status = DeliveryStatus(request.status) if request.status else None
        except ValueError:
            raise InvalidArgument.field("status", f"{request.status} is not a delivery status") from None
        where = DeliveryFilter(
            **product_env(request), webhook=request.webhook, message_id=request.message_id, status=status
        )
        deliveries, token = await self._runtime.list_deliveries(where, request.page_size, request.page_token)
        return webhook_pb2.ListDeliveriesResponse(
            deliveries=[delivery_message(d) for d in deliveries], next_page_token=token
        )

    async def GetDelivery(
        self, request: webhook_pb2.GetDeliveryRequest, context: Context
    ) -> webhook_pb2.GetDeliveryResponse:
        detail = await self._runtime.get_delivery(**_delivery(request))
        return webhook_pb2.GetDeliveryResponse(delivery=delivery_message(detail.delivery, detail))

    async def Redeliver(self, request: webhook_pb2.RedeliverRequest, context: Context) -> webhook_pb2.RedeliverResponse:
        return webhook_pb2.RedeliverResponse(
            delivery=delivery_message(await self._runtime.redeliver(**_delivery(request)))
        )

    async def ListReceived(
        self, request: webhook_pb2.ListReceivedRequest, context: Context
    ) -> webhook_pb2.ListReceivedResponse:
        records, token = await self._runtime.list_received(
            **product_env(request), webhook=request.webhook, page_size=request.page_size, page_token=request.page_token
        )
        return webhook_pb2.ListReceivedResponse(received=[received_message(r) for r in records], next_page_token=token)

    async def Receive(
        self, request_iterator: AsyncIterator[webhook_pb2.ReceiveRequest], context: Context
    ) -> AsyncIterator[webhook_pb2.ReceiveResponse]:
        init = (await first_message(request_iterator, "init")).init
        limits = Limits.checked(
            max_in_flight=init.max_in_flight,
            max_batch=init.max_batch,
            max_wait_s=seconds(init.max_wait) if init.HasField("max_wait") else None,
            ack_deadline_s=seconds(init.ack_deadline) if init.HasField("ack_deadline") else None,
            max_deliveries=0,
            dead_letter_event="",
        )
        stream = await self._receiver.watch(
            **product_env(init, "init."),
            tag=required(init.webhook, "init.webhook", "the webhook's tag"),
            group=required(init.group, "init.group", "the consumer group"),
            limits=limits,
        )
        async with contextlib.aclosing(stream.run(acks_and_nacks(request_iterator), aborter(context))) as events:
            async for event in events:
                if not isinstance(event, Batch):
                    yield _response(event)
                    continue
                # As Subscribe's: a batch of large webhooks in parts, one too large alone sent elsewhere.
                too_large: list[IncomingEvent] = []
                for response in batch_responses(event.messages, _batch, self._max_response_bytes, too_large):
                    yield response
                if too_large:
                    await stream.undeliverable(too_large, self._max_response_bytes)
