"""The store's webhooks: `SqlWebhookStore` adds them to the jobs' store (and so to `SqlStore`) with the statements
of webhook_statements.py; the back-ends derive from it.

Deliveries are claimed under leases (store/leases.py: `FOR UPDATE ... SKIP LOCKED` on PostgreSQL), so each attempt
is made by one replica; the end of attempts is recorded in one transaction per batch, and only where the attempter
still holds the delivery. A new or re-armed delivery is announced on the "webhooks" topic (NOTIFY on PostgreSQL).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from ductape_processor.store import webhook_statements as sql
from ductape_processor.store.jobs import SqlJobStore
from ductape_processor.store.sql import Connection, Row, _named, _values
from ductape_processor.store.statements import SqlValue, Where
from ductape_processor.store.webhook_records import (
    WEBHOOKS_TOPIC,
    AttemptEnd,
    AttemptRecord,
    Deferral,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryStatus,
    DispatchEnd,
    DispatchStatus,
    EndpointKey,
    ReceivedRecord,
    Stored,
    WebhookMessage,
)


class SqlWebhookStore(SqlJobStore):
    """`SqlJobStore` with the webhooks' operations."""

    # -- row mappers ------------------------------------------------------------------------------------------------

    def _message(self, row: Row) -> WebhookMessage:
        return WebhookMessage(**_named(WebhookMessage, row, created_at=self._dialect.moment))

    def _delivery(self, row: Row) -> DeliveryRecord:
        times = dict.fromkeys(("next_attempt_at", "created_at", "lease_until"), self._dialect.moment)
        return DeliveryRecord(**_named(DeliveryRecord, row, status=DeliveryStatus, **times))

    def _message_row(self, message: WebhookMessage) -> tuple[Any, ...]:
        return _values(message, created_at=self._dialect.time)

    def _delivery_row(self, delivery: DeliveryRecord) -> tuple[Any, ...]:
        times = dict.fromkeys(("next_attempt_at", "created_at", "lease_until"), self._dialect.time)
        return _values(delivery, status=int, **times)

    def _attempt(self, row: Row) -> AttemptRecord:
        return AttemptRecord(**_named(AttemptRecord, row, started_at=self._dialect.moment, success=bool))

    def _received(self, row: Row) -> ReceivedRecord:
        times = dict.fromkeys(("received_at", "dispatch_at", "lease_until"), self._dialect.moment)
        return ReceivedRecord(**_named(ReceivedRecord, row, body=bytes, dispatch_status=DispatchStatus, **times))

    # -- emitting ---------------------------------------------------------------------------------------------------

    async def insert_webhook_message(self, message: WebhookMessage, deliveries: list[DeliveryRecord]) -> Stored:
        async def insert(conn: Connection) -> Stored:
            if message.idempotency_key:
                row = await conn.fetchrow(sql.MESSAGE_BY_KEY, message.product, message.env, message.idempotency_key)
                if row is not None:
                    first = self._message(row)
                    ids = [str(r[0]) for r in await conn.fetch(sql.DELIVERY_IDS_OF, first.message_id)]
                    return Stored(first, ids, False, [])
            await conn.execute(sql.INSERT_MESSAGE, *self._message_row(message))
            disabled = {
                str(r[0])
                for r in await conn.fetch(sql.DISABLED_ENDPOINTS, message.product, message.env, message.webhook)
            }
            stored = [
                d
                if d.endpoint not in disabled
                else replace(
                    d,
                    status=DeliveryStatus.ENDPOINT_DISABLED,
                    next_attempt_at=None,
                    attempts=0,
                    lease_owner=None,
                    lease_until=None,
                )
                for d in deliveries
            ]
            if stored:
                await conn.executemany(sql.INSERT_DELIVERY, [self._delivery_row(d) for d in stored])
            if any(d.status == DeliveryStatus.PENDING and d.lease_owner is None for d in stored):
                await self._announce(conn, message.product, WEBHOOKS_TOPIC)  # any replica may take them
            held = [d for d in stored if d.lease_owner is not None]
            return Stored(message, [d.delivery_id for d in deliveries], True, held)

        lock = (
            f"webhooks:{message.product}:{message.env}:{message.idempotency_key}" if message.idempotency_key else None
        )
        return await self._transaction(insert, lock=lock, retry=False)

    # -- delivering -------------------------------------------------------------------------------------------------

    async def claim_deliveries(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[tuple[DeliveryRecord, str]]:
        at = self._dialect.time(now)
        statement = sql.claim_deliveries(self._dialect)
        rows = await self._write_returning(
            statement, owner, self._dialect.time(lease_until), at, at, limit, retry=False
        )
        deliveries = [self._delivery(row) for row in rows]
        ids = sorted({d.message_id for d in deliveries})
        bodies = (
            {str(r[0]): str(r[1]) for r in await self._reader.fetch(sql.message_bodies(len(ids)), *ids)} if ids else {}
        )
        return [(d, bodies.get(d.message_id, "")) for d in deliveries]

    async def end_deliveries(self, ends: list[AttemptEnd], now: datetime) -> list[EndpointKey]:
        time = self._dialect.time
        # the number's place takes the delivery id: the statement numbers the attempt after those recorded
        attempts = [
            (
                e.delivery.delivery_id,
                e.delivery.delivery_id,
                *_values(e.attempt, started_at=time)[2:],
                e.delivery.delivery_id,
                e.owner,
            )
            for e in ends
        ]
        updates: list[tuple[SqlValue, ...]] = [
            (
                int(e.status),
                time(e.next_attempt_at) if e.next_attempt_at is not None else None,
                e.attempt.response_code,
                e.delivery.delivery_id,
                e.owner,
            )
            for e in ends
        ]
        recovered = {_endpoint(e.delivery) for e in ends if e.attempt.success}
        failing: dict[EndpointKey, timedelta] = {}
        for e in ends:
            if not e.attempt.success:
                failing[_endpoint(e.delivery)] = e.disable_after

        async def end(conn: Connection) -> list[EndpointKey]:
            # Attempts first: the end clears the lease that says this owner still held the delivery.
            await conn.executemany(sql.insert_attempt_if_held(self._dialect), attempts)
            await conn.executemany(sql.END_DELIVERY, updates)
            if recovered:  # a success in the batch: the endpoint is not failing every attempt
                await conn.executemany(sql.ENDPOINT_RECOVERED, sorted(recovered))
            disabled: list[EndpointKey] = []
            for where, disable_after in failing.items():
                if where in recovered:
                    continue
                row = await conn.fetchrow(sql.ENDPOINT_FAILING, *where, time(now))
                assert row is not None  # an upsert's RETURNING: the row inserted or updated
                failing_since = self._dialect.moment(row[0])
                if row[1] is None:
                    if failing_since > now - disable_after:
                        continue
                    await conn.execute(sql.DISABLE_ENDPOINT, time(now), *where)
                    disabled.append(where)
                # Disabled now or before (a delivery emitted while another replica disabled its endpoint, or one
                # whose attempt was under way then): the batch's pending deliveries go with it.
                await conn.execute(sql.DISABLE_DELIVERIES, *where, time(now))
            return disabled

        return await self._transaction(end, retry=False)

    async def defer_deliveries(self, deferrals: list[Deferral]) -> None:
        rows: list[tuple[SqlValue, ...]] = [(self._dialect.time(d.due), d.delivery_id, d.owner) for d in deferrals]

        async def defer(conn: Connection) -> None:
            await conn.executemany(sql.DEFER_DELIVERY, rows)

        await self._transaction(defer)

    async def next_delivery_moment(self) -> datetime | None:
        return await self._first_moment(sql.NEXT_DELIVERY_MOMENT)

    # -- reading and redelivering -----------------------------------------------------------------------------------

    async def list_deliveries(
        self, where: DeliveryFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        clause = Where("product = ? AND env = ?", where.product, where.env)
        clause.when("webhook = ?", where.webhook or None)
        clause.when("message_id = ?", where.message_id or None)
        clause.when("status = ?", int(where.status) if where.status is not None else None)
        source = (sql.DELIVERY_COLUMNS, "webhook_deliveries")
        rows = await self._newest_first(clause, source, ("created_at", "delivery_id"), after, limit)
        return [self._delivery(row) for row in rows]

    async def get_delivery(
        self, product: str, env: str, delivery_id: str
    ) -> tuple[DeliveryRecord, str, list[AttemptRecord]] | None:
        # The attempts first: the delivery read after them shows at least the state their end recorded (each read
        # sees what was committed when it ran; an attempt and its delivery's state commit together).
        attempts = [self._attempt(r) for r in await self._reader.fetch(sql.ATTEMPTS, delivery_id)]
        row = await self._reader.fetchrow(sql.DELIVERY, product, env, delivery_id)
        if row is None:
            return None
        delivery = self._delivery(row)
        body = await self._reader.fetchrow(sql.MESSAGE_BODY, delivery.message_id)
        return delivery, str(body[0]) if body else "", attempts

    async def redeliver(self, product: str, env: str, delivery_id: str, now: datetime) -> DeliveryRecord | None:
        async def again(conn: Connection) -> DeliveryRecord | None:
            rows = await conn.fetch(sql.REDELIVER, self._dialect.time(now), product, env, delivery_id)
            if not rows:
                return None
            delivery = self._delivery(rows[0])
            await conn.execute(sql.ENABLE_ENDPOINT, product, env, delivery.webhook, delivery.endpoint)
            await self._announce(conn, product, WEBHOOKS_TOPIC)
            return delivery

        return await self._transaction(again, retry=False)

    # -- receiving --------------------------------------------------------------------------------------------------

    async def insert_received(self, record: ReceivedRecord) -> bool:
        times = dict.fromkeys(("received_at", "dispatch_at", "lease_until"), self._dialect.time)
        values = _values(record, dispatch_status=int, **times)
        return await self._write(sql.INSERT_RECEIVED, *values, retry=False) == 1

    async def claim_dispatches(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[ReceivedRecord]:
        at = self._dialect.time(now)
        statement = sql.claim_dispatches(self._dialect)
        rows = await self._write_returning(
            statement, owner, self._dialect.time(lease_until), at, at, limit, retry=False
        )
        return [self._received(row) for row in rows]

    async def end_dispatches(self, ends: list[DispatchEnd]) -> None:
        time = self._dialect.time
        rows: list[tuple[SqlValue, ...]] = [
            (int(e.status), e.dispatch_at and time(e.dispatch_at), e.result, e.received_id, e.owner) for e in ends
        ]
        if len(rows) == 1:
            await self._write(sql.END_DISPATCH, *rows[0])
            return

        async def end(conn: Connection) -> None:
            await conn.executemany(sql.END_DISPATCH, rows)

        await self._transaction(end)

    async def next_dispatch_moment(self) -> datetime | None:
        return await self._first_moment(sql.NEXT_DISPATCH_MOMENT)

    async def purge_webhooks(self, before: datetime, limit: int) -> tuple[int, int]:
        at = self._dialect.time(before)

        async def purge(conn: Connection) -> int:
            picked = [str(row[0]) for row in await conn.fetch(sql.EXPIRED_MESSAGES, at, limit)]
            if not picked:
                return 0
            ended = [str(row[0]) for row in await conn.fetch(sql.ended_deliveries_of(len(picked)), *picked)]
            if ended:
                await conn.execute(sql.attempts_of(len(ended)), *ended)
            return await conn.execute(sql.messages_without_deliveries(len(picked)), *picked)

        messages = await self._transaction(purge)
        received = await self._write(sql.EXPIRED_RECEIVED, at, limit)
        return messages, received

    async def list_received(
        self, product: str, env: str, webhook: str, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ReceivedRecord]:
        clause = Where("product = ? AND env = ?", product, env)
        clause.when("webhook = ?", webhook or None)
        source = (sql.RECEIVED_COLUMNS, "webhooks_received")
        rows = await self._newest_first(clause, source, ("received_at", "received_id"), after, limit)
        return [self._received(row) for row in rows]


def _endpoint(delivery: DeliveryRecord) -> EndpointKey:
    return (delivery.product, delivery.env, delivery.webhook, delivery.endpoint)
