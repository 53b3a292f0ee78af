"""Webhooks from Python: emit an event to its subscribed endpoints, follow its deliveries, and watch the provider
webhooks the processor receives.

    emitted = await processor.webhook.emit(product="shop", env="dev", event="orders:paid",
                                           payload={"orderId": "o-1"}, idempotency_key="o-1-paid")
    detail = await processor.webhook.get_delivery(product="shop", env="dev", delivery_id=emitted.delivery_ids[0])

    async for received in processor.webhook.receive(product="shop", env="dev", webhook="payments", group="billing"):
        handle(received.json())
        await received.ack()

`receive` reconnects on UNAVAILABLE like `message_broker.subscribe`; unacked webhooks are delivered again.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict, Unpack

from ductape.processor.brokers import StreamItem, StreamOptions, StreamSubscription
from ductape.processor.calls import CallMetadata, ResourceClient, every_item
from ductape.processor.v1 import webhook_pb2, webhook_pb2_grpc
from google.protobuf import json_format, struct_pb2


class EnvironmentRef(TypedDict):
    """The product environment a call is about."""

    product: str
    env: str


class DeliveryFilter(EnvironmentRef, total=False):
    """Which deliveries `list_deliveries` returns: one webhook's (its tag), one message's, in one status."""

    webhook: str
    message_id: str
    status: webhook_pb2.DeliveryStatus.ValueType


class ReceiveFields(StreamOptions):
    """What `receive` takes: the webhook (its tag), the consumer `group` and limits (0: the server's default), sent
    as the stream's first message, and the `StreamOptions`."""

    product: str
    env: str
    webhook: str
    group: str
    max_in_flight: NotRequired[int]
    max_batch: NotRequired[int]


@dataclass(eq=False, kw_only=True)
class ReceivedWebhook(StreamItem):
    """A received webhook on a Receive stream. Ack it when done, or nack it to have it delivered again."""

    id: str
    webhook: str
    webhook_id: str
    receive_time: datetime
    body: bytes
    content_type: str
    headers: dict[str, str]
    delivery_attempt: int

    def json(self) -> Any:
        """The body parsed as JSON."""
        return jsonlib.loads(self.body)


class ReceiveSubscription(StreamSubscription[ReceivedWebhook]):
    """A Receive stream; iterate it with `async for`, `close()` ends it."""

    _request = webhook_pb2.ReceiveRequest

    def _method(self) -> Any:
        return self._stub.Receive

    def _items(self, response: Any) -> Any:
        return response.batch.deliveries

    def _message(self, received: webhook_pb2.ReceivedDelivery) -> ReceivedWebhook:
        webhook = received.webhook
        return self._item(
            ReceivedWebhook,
            webhook,
            receive_time=webhook.receive_time.ToDatetime(UTC),
            headers=dict(webhook.headers),
            delivery_attempt=received.delivery_attempt,
            ack_id=received.ack_id,
        )


class WebhookClient(ResourceClient):
    """`processor.webhook`: emit, deliveries, received webhooks."""

    _stub: webhook_pb2_grpc.WebhookServiceAsyncStub

    async def emit(
        self,
        *,
        product: str,
        env: str,
        event: str,
        payload: Any,
        idempotency_key: str = "",
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
    ) -> webhook_pb2.EmitResponse:
        """Emit `event` (`webhook_tag:event_tag`) with a JSON `payload`: its `message_id` and `delivery_ids`."""
        request = webhook_pb2.EmitRequest(product=product, env=env, event=event, idempotency_key=idempotency_key)
        request.payload.CopyFrom(json_format.ParseDict(payload, struct_pb2.Value()))
        return await self._call(self._stub.Emit, request, timeout, metadata)

    async def list_deliveries(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
        **where: Unpack[DeliveryFilter],
    ) -> webhook_pb2.ListDeliveriesResponse:
        """One page of deliveries, newest first."""
        request = webhook_pb2.ListDeliveriesRequest(page_size=page_size, page_token=page_token, **where)
        return await self._call(self._stub.ListDeliveries, request, metadata=metadata, safe=True)

    def every_delivery(
        self, *, metadata: CallMetadata | None = None, **where: Unpack[DeliveryFilter]
    ) -> AsyncIterator[webhook_pb2.Delivery]:
        """Every delivery matching `where`, page after page."""

        async def page(token: str) -> webhook_pb2.ListDeliveriesResponse:
            return await self.list_deliveries(page_token=token, metadata=metadata, **where)

        return every_item(page, lambda listed: listed.deliveries)

    async def get_delivery(
        self, *, delivery_id: str, metadata: CallMetadata | None = None, **ref: Unpack[EnvironmentRef]
    ) -> webhook_pb2.Delivery:
        """A delivery with every attempt and its payload."""
        request = webhook_pb2.GetDeliveryRequest(delivery_id=delivery_id, **ref)
        return (await self._call(self._stub.GetDelivery, request, metadata=metadata, safe=True)).delivery

    async def redeliver(
        self, *, delivery_id: str, metadata: CallMetadata | None = None, **ref: Unpack[EnvironmentRef]
    ) -> webhook_pb2.Delivery:
        """Deliver again now, the schedule started over; the delivery, pending."""
        request = webhook_pb2.RedeliverRequest(delivery_id=delivery_id, **ref)
        return (await self._call(self._stub.Redeliver, request, metadata=metadata, safe=True)).delivery

    async def list_received(
        self,
        *,
        webhook: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
        **ref: Unpack[EnvironmentRef],
    ) -> webhook_pb2.ListReceivedResponse:
        """One page of received webhooks, newest first (of one webhook when given)."""
        request = webhook_pb2.ListReceivedRequest(webhook=webhook, page_size=page_size, page_token=page_token, **ref)
        return await self._call(self._stub.ListReceived, request, metadata=metadata, safe=True)

    def receive(self, **fields: Unpack[ReceiveFields]) -> ReceiveSubscription:
        """A Receive stream to iterate with `async for`; same `group` = shared webhooks."""
        return ReceiveSubscription.opened(self._stub, self._call, webhook_pb2.ReceiveInit, fields)
