"""The store's webhook records and operations (written in store/webhooks.py): emitted messages, their deliveries
to each endpoint with every attempt, the endpoints' health, and received webhooks. `Store` derives from
`WebhookState`, so the runtime reaches them through the one store interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Final

WEBHOOKS_TOPIC: Final = "webhooks"
"""The change topic of deliveries (`Store.listen`): a delivery was added or is due again."""


EndpointKey = tuple[str, str, str, str]
"""An endpoint of a webhook in an environment: product, environment, webhook tag, URL."""


class DeliveryStatus(IntEnum):
    """Where a delivery stands (the proto's DeliveryStatus numbers)."""

    PENDING = 1
    SUCCEEDED = 2
    FAILED = 3
    ENDPOINT_DISABLED = 4


@dataclass(frozen=True, slots=True)
class WebhookMessage:
    """An emitted event: its body (the JSON every delivery sends) and the key it was emitted under."""

    message_id: str
    product: str
    env: str
    webhook: str
    event: str
    body: str
    idempotency_key: str
    request_hash: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A message's delivery to one endpoint; claimed by `lease_owner` until `lease_until` while attempted."""

    delivery_id: str
    message_id: str
    product: str
    env: str
    webhook: str
    event: str
    endpoint: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    last_code: int
    lease_owner: str | None = None
    lease_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """What storing an emitted message did: the message (the first one, for a repeated idempotency key), its
    deliveries' ids, whether it is new, and the deliveries stored leased to the emitter (to attempt now)."""

    message: WebhookMessage
    delivery_ids: list[str]
    new: bool
    held: list[DeliveryRecord]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try of a delivery."""

    delivery_id: str
    number: int
    started_at: datetime
    duration_ms: int
    response_code: int
    excerpt: str
    error: str
    success: bool


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """How `owner`'s attempt of a delivery ended: the attempt, the delivery's next state, and how long its endpoint
    may fail before it is disabled."""

    delivery: DeliveryRecord
    owner: str
    attempt: AttemptRecord
    status: DeliveryStatus
    next_attempt_at: datetime | None
    disable_after: timedelta


@dataclass(frozen=True, slots=True)
class Deferral:
    """A delivery `owner` claimed and hands back unattempted (its endpoint's rate is taken), due again at `due`."""

    delivery_id: str
    owner: str
    due: datetime


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """Which deliveries to list; empty (or None) means any."""

    product: str
    env: str
    webhook: str = ""
    message_id: str = ""
    status: DeliveryStatus | None = None


class DispatchStatus(IntEnum):
    """Where a received webhook's dispatch stands (the proto's DispatchStatus numbers)."""

    NONE = 0
    """The receive dispatches nothing."""
    PENDING = 1
    DISPATCHED = 2
    FAILED = 3


@dataclass(frozen=True, slots=True)
class ReceivedRecord:
    """A received webhook: `webhook_id` is what refuses a replay (the provider's id, or the signature's digest).

    Its dispatch is pending until it is done, due at `dispatch_at` and claimed by `lease_owner` until `lease_until`
    while it is made (the replica that accepted it claims it as it stores it); `dispatch_result` is what the dispatch
    made (JSON: the message's and the job's ids), or the last attempt's error."""

    received_id: str
    product: str
    env: str
    webhook: str
    webhook_id: str
    received_at: datetime
    content_type: str
    headers: str
    body: bytes
    dispatch_status: DispatchStatus = DispatchStatus.NONE
    dispatch_attempts: int = 0
    dispatch_at: datetime | None = None
    dispatch_result: str = ""
    lease_owner: str | None = None
    lease_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class DispatchEnd:
    """How `owner`'s attempt at a received webhook's dispatch ended: its next state, when it is due again (pending),
    and what it made or why it failed."""

    received_id: str
    owner: str
    status: DispatchStatus
    dispatch_at: datetime | None
    result: str


class WebhookState(abc.ABC):
    """The webhook operations of the store."""

    @abc.abstractmethod
    async def insert_webhook_message(self, message: WebhookMessage, deliveries: list[DeliveryRecord]) -> Stored:
        """Store a message and its deliveries: as given (those with a `lease_owner` leased to it, their first attempt
        counted), but those to a disabled endpoint, which are ENDPOINT_DISABLED and unleased. When its idempotency key
        was used in its environment, returns the first message and its delivery ids, storing nothing."""

    @abc.abstractmethod
    async def claim_deliveries(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[tuple[DeliveryRecord, str]]:
        """Lease up to `limit` pending deliveries due at `now` that no live lease holds, one more attempt counted;
        each with its message's body."""

    @abc.abstractmethod
    async def end_deliveries(self, ends: list[AttemptEnd], now: datetime) -> list[EndpointKey]:
        """Record attempts (those whose owner still holds the delivery) and the deliveries' next states, and the
        endpoints' health; returns the endpoints this disabled. The pending deliveries of an endpoint that failed
        and is disabled (by this call or before) are disabled with it, but for those whose attempt is under way
        elsewhere: their own end disables them."""

    @abc.abstractmethod
    async def defer_deliveries(self, deferrals: list[Deferral]) -> None:
        """Hand claimed deliveries back unattempted (those their owner still holds): due again at their `due`, the
        claim's count of attempts taken back."""

    @abc.abstractmethod
    async def next_delivery_moment(self) -> datetime | None:
        """The earliest moment a pending delivery falls due (its next attempt, or its lease's end)."""

    @abc.abstractmethod
    async def list_deliveries(
        self, where: DeliveryFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        """Deliveries matching `where`, newest first, strictly older than the `after` (created_at, id) cursor."""

    @abc.abstractmethod
    async def get_delivery(
        self, product: str, env: str, delivery_id: str
    ) -> tuple[DeliveryRecord, str, list[AttemptRecord]] | None:
        """A delivery of that environment, its message's body and its attempts (oldest first)."""

    @abc.abstractmethod
    async def redeliver(self, product: str, env: str, delivery_id: str, now: datetime) -> DeliveryRecord | None:
        """Make a delivery pending and due at `now`, its schedule started over, its endpoint enabled again."""

    @abc.abstractmethod
    async def insert_received(self, record: ReceivedRecord) -> bool:
        """Store a received webhook (with its dispatch's state and lease); False (nothing stored) when its
        `webhook_id` was received before."""

    @abc.abstractmethod
    async def claim_dispatches(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[ReceivedRecord]:
        """Lease up to `limit` pending dispatches due at `now` that no live lease holds, one more attempt counted."""

    @abc.abstractmethod
    async def end_dispatches(self, ends: list[DispatchEnd]) -> None:
        """Record how dispatches ended, those whose owner still holds them."""

    @abc.abstractmethod
    async def next_dispatch_moment(self) -> datetime | None:
        """The earliest moment a pending dispatch falls due (its next attempt, or its lease's end)."""

    @abc.abstractmethod
    async def purge_webhooks(self, before: datetime, limit: int) -> tuple[int, int]:
        """Delete up to `limit` messages emitted before `before` (with their deliveries and attempts) and up to
        `limit` webhooks received before it; never a pending delivery (nor its message), nor a webhook whose dispatch
        is pending. Returns how many messages and received webhooks went."""

    @abc.abstractmethod
    async def list_received(
        self, product: str, env: str, webhook: str, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ReceivedRecord]:
        """Received webhooks of an environment (of one webhook when given), newest first, before `after`."""
