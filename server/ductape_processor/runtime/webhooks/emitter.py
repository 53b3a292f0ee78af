"""WebhookRuntime: Emit (a message stored with one delivery per subscribed endpoint, attempted by the
`DeliveryWorker`), the deliveries' listing, detail and redelivery, the received webhooks' listing, and the retention
of both (`purge`).

The body every delivery of a message POSTs is fixed when the message is emitted (a redelivery signs the same
bytes): Standard Webhooks' recommended envelope, `{"type": "<webhook>.<event>", "timestamp": ..., "data": payload}`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ductape_processor.errors import InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.contract import check_input
from ductape_processor.runtime.logs.recorder import execution_record
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.idempotency import idempotency_key_problem, key_reused
from ductape_processor.runtime.policies.paging import (
    ITEM_BYTES,
    decode_page_token,
    effective_page_size,
    page,
    time_position,
)
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.registry.webhooks import Webhook, WebhookEvent
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.webhooks.deliveries import DeliveryWorker
from ductape_processor.store.base import ExecutionStatus

# The records the API layer shows, re-exported from here (api/ reads the store only through the runtime).
from ductape_processor.store.webhook_records import AttemptRecord as AttemptRecord
from ductape_processor.store.webhook_records import DeliveryFilter as DeliveryFilter
from ductape_processor.store.webhook_records import DeliveryRecord as DeliveryRecord
from ductape_processor.store.webhook_records import DeliveryStatus as DeliveryStatus
from ductape_processor.store.webhook_records import DispatchStatus as DispatchStatus
from ductape_processor.store.webhook_records import ReceivedRecord as ReceivedRecord
from ductape_processor.store.webhook_records import WebhookMessage


@dataclass(frozen=True, slots=True)
class EmitCall:
    """One Emit: the event (`webhook:event`) in an environment, its payload (`None` when not given), and a key."""

    product: str
    env: str
    event: str
    payload: Any
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class Emitted:
    """What Emit stored: the message's id, its deliveries' ids, whether the key had emitted it before, and the
    execution record's id."""

    message_id: str
    delivery_ids: list[str]
    duplicate: bool
    process_id: str


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    """A delivery with its message's body and every attempt."""

    delivery: DeliveryRecord
    body: str
    attempts: list[AttemptRecord]


def split_event(event: str) -> tuple[str, str]:
    """`webhook_tag:event_tag`, or INVALID_ARGUMENT on `event`."""
    tag, sep, event_tag = event.partition(":")
    if not sep or not tag or not event_tag or ":" in event_tag:
        raise InvalidArgument.field("event", "must be webhook_tag:event_tag")
    return tag, event_tag


PURGE_BATCH: Final = 1000
"""Messages (and received webhooks) one purge transaction deletes at most."""
PURGE_BATCHES: Final = 20
"""Batches one round of `purge` deletes at most: a backlog goes over several rounds, none holding the store long."""


class WebhookRuntime:
    """Emits webhook events and answers for their deliveries and the webhooks received."""

    def __init__(self, services: CallServices, worker: DeliveryWorker, clock: Clock, retention: timedelta) -> None:
        """`retention`: how long emitted messages (with their deliveries and attempts) and received webhooks are
        kept once they are done."""
        self._services = services
        self._registry = services.registry
        self._store = services.store
        self._worker = worker
        self._clock = clock
        self._retention = retention

    @property
    def worker(self) -> DeliveryWorker:
        """This replica's deliveries (started and stopped by the app)."""
        return self._worker

    async def _slug(self, product: str, env: str) -> str:
        environment, _ = await self._registry.environment(product, env)
        return environment.slug

    async def emit(self, call: EmitCall) -> Emitted:
        """Store the message and its deliveries, and wake this replica's deliveries; INVALID_ARGUMENT names the bad
        field (a payload that breaks the event's schema: `payload.<field>`). An Emit of a declared event writes an
        execution record (`kind: webhook`, `resource: webhook:event`), failed or not."""
        tag, event_tag = split_event(call.event)
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        if call.payload is None:
            raise InvalidArgument.field("payload", "is required: the event's data")
        started = datetime.now(UTC)
        process_id = self._services.recorder.new_id()
        resolved = await self._services.registry.resolve(call.product, call.env)
        webhook = named(call.product, resolved.manifest.webhooks, "webhook", tag, Reason.WEBHOOK_NOT_FOUND)
        event = webhook.event(event_tag)
        if event is None:
            raise NotFound.in_resource(call.product, "webhook", tag, "event", event_tag, Reason.WEBHOOK_EVENT_NOT_FOUND)
        try:
            emitted = await self._emit(call, resolved.env.slug, webhook, event)
        except ProcessorError as exc:
            self._record(resolved, call.event, process_id, started, exc.reason, {})
            raise
        detail: dict[str, Any] = {"message_id": emitted.message_id, "deliveries": len(emitted.delivery_ids)}
        if emitted.duplicate:
            detail["duplicate"] = True
        self._record(resolved, call.event, process_id, started, "", detail)
        return replace(emitted, process_id=process_id)

    def _record(
        self, resolved: Resolved, resource: str, process_id: str, started: datetime, reason: str, detail: dict[str, Any]
    ) -> None:
        self._services.recorder.record(
            execution_record(
                resolved,
                "webhook",
                resource,
                process_id,
                started,
                ExecutionStatus.FAIL if reason else ExecutionStatus.SUCCESS,
                attempts=1,
                error_reason=reason,
                detail=json.dumps(detail, separators=(",", ":")) if detail else "",
            )
        )

    async def _emit(self, call: EmitCall, slug: str, webhook: Webhook, event: WebhookEvent) -> Emitted:
        tag, event_tag = webhook.tag, event.tag
        payload = call.payload
        if event.payload_schema is not None:
            if not isinstance(payload, dict):
                raise InvalidArgument.field("payload", "must be an object: the event declares a schema")
            payload = check_input(event.payload_schema, payload, "payload", root="")
        now = self._clock.now()
        try:
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False)
        except ValueError:  # a NaN or an infinity (a Value's double can be one): no JSON reader would take the body
            raise InvalidArgument.field("payload", "holds NaN or an infinite number, which JSON cannot carry") from None
        envelope = {"type": f"{tag}.{event_tag}", "timestamp": now.isoformat().replace("+00:00", "Z")}
        body = json.dumps(envelope, separators=(",", ":"))[:-1] + f',"data":{data}}}'
        message = WebhookMessage(
            message_id=f"msg_{uuid.uuid4().hex}",
            product=call.product,
            env=slug,
            webhook=tag,
            event=event_tag,
            body=body,
            idempotency_key=call.idempotency_key,
            request_hash=hashlib.sha256(f"{call.event}\n{data}".encode()).hexdigest(),
            created_at=now,
        )
        first_delay = webhook.delays[0]
        deliveries = [
            DeliveryRecord(
                delivery_id=f"dlv_{uuid.uuid4().hex}",
                message_id=message.message_id,
                product=call.product,
                env=slug,
                webhook=tag,
                event=event_tag,
                endpoint=endpoint.url,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now + first_delay,
                created_at=now,
                last_code=0,
            )
            for endpoint in webhook.endpoints.get(slug, [])
            if not endpoint.events or event_tag in endpoint.events
        ]
        if first_delay <= timedelta(0):  # due at once: attempted here, without waiting for a claim
            deliveries = self._worker.hold(deliveries)
        held = sum(1 for d in deliveries if d.lease_owner is not None)
        try:
            stored = await self._store.insert_webhook_message(message, deliveries)
        except BaseException:
            self._worker.release(held)
            raise
        self._worker.release(held - len(stored.held))  # a repeated key's, or a disabled endpoint's
        if not stored.new and stored.message.request_hash != message.request_hash:
            raise key_reused("event or payload", call.idempotency_key)
        for delivery in stored.held:
            self._worker.attempt(delivery, message.body)
        if stored.new and len(stored.held) < len(stored.delivery_ids):
            self._worker.wake()  # the rest are claimed (or a disabled endpoint's: nothing to do)
        return Emitted(stored.message.message_id, stored.delivery_ids, not stored.new, "")

    async def list_deliveries(
        self, where: DeliveryFilter, page_size: int, page_token: str
    ) -> tuple[list[DeliveryRecord], str]:
        """One page of the environment's deliveries, newest first, and the next page's token."""
        size = effective_page_size(page_size)
        slug = await self._slug(where.product, where.env)
        status = str(int(where.status)) if where.status is not None else ""
        listing = ("webhook deliveries", where.product, slug, where.webhook, where.message_id, status)
        after = decode_page_token(listing, page_token, time_position) if page_token else None
        query = DeliveryFilter(where.product, slug, where.webhook, where.message_id, where.status)
        records = await self._store.list_deliveries(query, after=after, limit=size + 1)
        return page(records, size, listing, lambda d: (d.created_at.timestamp(), d.delivery_id))

    async def get_delivery(self, product: str, env: str, delivery_id: str) -> DeliveryDetail:
        """A delivery with its attempts; NOT_FOUND `DELIVERY_NOT_FOUND`."""
        found = await self._store.get_delivery(product, await self._slug(product, env), delivery_id)
        if found is None:
            raise self._not_found(product, delivery_id)
        return DeliveryDetail(*found)

    async def redeliver(self, product: str, env: str, delivery_id: str) -> DeliveryRecord:
        """Make a delivery pending again, due now; NOT_FOUND `DELIVERY_NOT_FOUND`."""
        delivery = await self._store.redeliver(product, await self._slug(product, env), delivery_id, self._clock.now())
        if delivery is None:
            raise self._not_found(product, delivery_id)
        self._worker.wake()
        return delivery

    @staticmethod
    def _not_found(product: str, delivery_id: str) -> NotFound:
        return NotFound(
            f"no delivery {delivery_id!r} in this environment",
            reason=Reason.DELIVERY_NOT_FOUND,
            metadata={"product": product, "delivery_id": delivery_id},
        )

    async def list_received(
        self, product: str, env: str, webhook: str, page_size: int, page_token: str
    ) -> tuple[list[ReceivedRecord], str]:
        """One page of the webhooks received in the environment, newest first, and the next page's token."""
        size = effective_page_size(page_size)
        slug = await self._slug(product, env)
        listing = ("webhooks received", product, slug, webhook)
        after: tuple[datetime, str] | None = (
            decode_page_token(listing, page_token, time_position) if page_token else None
        )
        records = await self._store.list_received(product, slug, webhook, after=after, limit=size + 1)
        return page(
            records,
            size,
            listing,
            lambda r: (r.received_at.timestamp(), r.received_id),
            lambda r: ITEM_BYTES + len(r.body) + len(r.headers) + len(r.dispatch_result),
        )

    async def purge(self) -> tuple[int, int]:
        """Delete what is older than the retention: messages with their deliveries and attempts (none pending), and
        received webhooks (their dispatch not pending). Returns how many messages and received webhooks went."""
        before = self._clock.now() - self._retention
        messages = received = 0
        for _ in range(PURGE_BATCHES):
            gone = await self._store.purge_webhooks(before, PURGE_BATCH)
            messages, received = messages + gone[0], received + gone[1]
            if max(gone) < PURGE_BATCH:
                break
        return messages, received
