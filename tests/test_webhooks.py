"""Emitting webhooks (WebhookService.Emit and the deliveries) on both stores, against real local endpoints: what the
endpoint received (checked with the independent `standardwebhooks` package), the attempts GetDelivery lists, and
retries moved through the schedule by an injected clock."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ductape.processor.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from ductape.processor.v1 import log_pb2, webhook_pb2
from standardwebhooks import Webhook as StandardWebhook

from ductape_processor.runtime.webhooks.signing import SignatureRefused, signed_headers, signing_key, verify_standard
from ductape_processor.store import Store
from ductape_processor.store.statements import Statement
from ductape_processor.store.webhook_records import (
    AttemptEnd,
    AttemptRecord,
    DeliveryFilter,
    DeliveryRecord,
    DeliveryStatus,
    WebhookMessage,
)
from tests.conftest import Running, ServerFactory
from tests.jobs_harness import START, FakeClock

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes, ok?!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the previous secret, rotated out").decode()
DELIVERED = webhook_pb2.DELIVERY_STATUS_SUCCEEDED
PENDING = webhook_pb2.DELIVERY_STATUS_PENDING
PENDING_STATE = DeliveryStatus.PENDING


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once `check()` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, "the condition did not hold in time"
        await asyncio.sleep(0.02)


@dataclass
class Endpoint:
    """A local webhook endpoint: answers each POST with the next status of `answers` (then 200)."""

    server: TestServer
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # the loop's time of each POST
    answers: list[int] = field(default_factory=list)
    delay_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hook"


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    state = Endpoint(server)

    async def hook(request: web.Request) -> web.Response:
        state.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        state.arrivals.append(asyncio.get_running_loop().time())
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        status = state.answers.pop(0) if state.answers else 200
        return web.Response(status=status, text=f"answer {status}")

    app.router.add_post("/hook", hook)
    await server.start_server()
    yield state
    await server.close()


def manifest(
    url: str, *, private: bool = True, extra: str = "", schedule: str = "[0, 5s, 5m]", rate: int | None = None
) -> str:
    limit = f", rate_limit: {rate}" if rate is not None else ""
    return f"""
product: shop
environments: [{{slug: dev, allow_private_endpoints: {str(private).lower()}}}]
webhooks:
  - tag: orders
    schedule: {schedule}
    timeout: 1s
    disable_after: 1h
    events:
      - {{tag: paid, schema: {{orderId: {{type: string, required: true}}}}}}
      - {{tag: refunded}}
    endpoints:
      dev:
        - {{url: "{url}", secret: ["$Secret{{HOOK}}", "$Secret{{OLD_HOOK}}"], events: [paid],
           headers: {{X-Shop: s1}}{limit}}}
{extra}"""


@dataclass
class Hooks:
    running: Running
    endpoint: Endpoint
    clock: FakeClock | None

    @property
    def client(self) -> Any:
        return self.running.client.webhook

    async def emit(self, payload: Any = None, **fields: Any) -> webhook_pb2.EmitResponse:
        values: dict[str, Any] = {"product": "shop", "env": "dev", "event": "orders:paid"}
        values.update(fields)
        return await self.client.emit(payload=payload if payload is not None else {"orderId": "o-1"}, **values)

    async def delivery(self, delivery_id: str) -> webhook_pb2.Delivery:
        return await self.client.get_delivery(product="shop", env="dev", delivery_id=delivery_id)

    async def settled(
        self, delivery_id: str, attempts: int, status: int = 0, timeout: float = 10.0
    ) -> webhook_pb2.Delivery:
        """The delivery once `attempts` attempts are recorded (and it is in `status`, when given)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            delivery = await self.delivery(delivery_id)
            done = len(delivery.attempt_details) >= attempts and status in (0, delivery.status)
            if done or loop.time() > end:
                return delivery
            await asyncio.sleep(0.02)


def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text(f"HOOK={SECRET}\nOLD_HOOK={OLD_SECRET}\n")
    return path


Factory = Callable[..., Awaitable[Hooks]]


@pytest.fixture
async def hooks(
    store_factory: Callable[[], Awaitable[Store]], start_server: ServerFactory, endpoint: Endpoint, tmp_path: Path
) -> Factory:
    async def make(*, clock: FakeClock | None = None, **options: Any) -> Hooks:
        running = await start_server(store=await store_factory(), clock=clock, secrets_file=secrets_file(tmp_path))
        await running.client.product.apply(manifest(endpoint.url, **options).encode())
        return Hooks(running, endpoint, clock)

    return make


async def test_a_delivery_is_signed_so_standardwebhooks_verifies_it_with_either_rotated_secret(hooks: Factory) -> None:
    state = await hooks()
    emitted = await state.emit({"orderId": "o-1", "amount": 3})
    delivery = await state.settled(emitted.delivery_ids[0], 1)
    assert delivery.status == DELIVERED
    headers, body = state.endpoint.received[0]
    assert headers["webhook-id"] == emitted.message_id
    assert headers["x-shop"] == "s1" and headers["content-type"] == "application/json"
    assert len(headers["webhook-signature"].split(" ")) == 2  # one signature per secret during the rotation
    for secret in (SECRET, OLD_SECRET):
        verified = StandardWebhook(secret).verify(body, headers)
        assert verified == {
            "type": "orders.paid",
            "timestamp": verified["timestamp"],
            "data": {"orderId": "o-1", "amount": 3},
        }
    assert json.loads(body)["data"] == {"amount": 3, "orderId": "o-1"}
    assert delivery.payload.struct_value["orderId"] == "o-1"


def test_our_verifier_accepts_what_standardwebhooks_signs_and_refuses_a_changed_body() -> None:
    now = 1_800_000_000
    signature = StandardWebhook(SECRET).sign("msg_1", datetime.fromtimestamp(now, UTC), '{"a":1}')
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert verify_standard(headers, b'{"a":1}', signing_key(SECRET), now, 300) == "msg_1"
    ours = signed_headers("msg_1", now, b'{"a":1}', [signing_key(SECRET)])
    assert ours["webhook-signature"] == signature
    with pytest.raises(SignatureRefused):
        verify_standard(headers, b'{"a":2}', signing_key(SECRET), now, 300)
    with pytest.raises(SignatureRefused):
        verify_standard(headers, b'{"a":1}', signing_key(SECRET), now + 301, 300)


async def test_a_500_is_retried_on_the_schedule_and_every_attempt_is_kept(hooks: Factory) -> None:
    clock = FakeClock()
    state = await hooks(clock=clock)
    state.endpoint.answers = [500, 503]
    emitted = await state.emit()
    delivery_id = emitted.delivery_ids[0]
    first = await state.settled(delivery_id, 1)
    assert first.status == PENDING and first.last_response_code == 500
    clock.advance(timedelta(seconds=4))
    await asyncio.sleep(0.3)
    assert len(state.endpoint.received) == 1  # the second attempt is due 5 s after the first failed
    clock.advance(timedelta(seconds=1))
    second = await state.settled(delivery_id, 2)
    assert [a.response_code for a in second.attempt_details] == [500, 503]
    clock.advance(timedelta(minutes=5))
    third = await state.settled(delivery_id, 3)
    assert third.status == DELIVERED
    assert [(a.number, a.response_code, a.success) for a in third.attempt_details] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    assert third.attempt_details[0].response_excerpt == "answer 500"
    assert len(state.endpoint.received) == 3


async def test_a_timeout_fails_the_attempt_and_a_used_up_schedule_fails_the_delivery(hooks: Factory) -> None:
    clock = FakeClock()
    state = await hooks(clock=clock, schedule="[0, 10s]")
    state.endpoint.delay_s = 1.5  # the webhook's timeout is 1 s
    emitted = await state.emit()
    first = await state.settled(emitted.delivery_ids[0], 1)
    assert first.attempt_details[0].response_code == 0
    assert "did not answer within" in first.attempt_details[0].error
    clock.advance(timedelta(seconds=10))
    second = await state.settled(emitted.delivery_ids[0], 2)
    assert second.status == webhook_pb2.DELIVERY_STATUS_FAILED
    assert not second.HasField("next_attempt_time")


async def test_an_endpoint_failing_longer_than_disable_after_is_disabled_and_redeliver_enables_it(
    hooks: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    state = await hooks(clock=clock)
    state.endpoint.answers = [500] * 10
    first = await state.emit(idempotency_key="a")
    second = await state.emit(idempotency_key="b")
    for emitted in (first, second):
        assert (await state.settled(emitted.delivery_ids[0], 1)).status == PENDING
    clock.advance(timedelta(minutes=61))  # past disable_after (1 h) since the first failure
    # Both retries are due. The first to fail disables the endpoint; the other delivery is disabled with it, at once
    # when it was waiting, or by the end of its attempt when that was under way (that attempt is recorded).
    for emitted in (first, second):
        delivery = await state.settled(emitted.delivery_ids[0], 1, webhook_pb2.DELIVERY_STATUS_ENDPOINT_DISABLED)
        assert delivery.status == webhook_pb2.DELIVERY_STATUS_ENDPOINT_DISABLED
        assert len(delivery.attempt_details) in (1, 2) and not delivery.HasField("next_attempt_time")
    # No attempt is under way any more (a delivery whose attempt is under way stays pending until it ends), so every
    # POST made has reached the endpoint.
    sent = len(state.endpoint.received)
    made = [len((await state.delivery(e.delivery_ids[0])).attempt_details) for e in (first, second)]
    assert sent == sum(made)
    await until(lambda: any(r.getMessage() == "webhook endpoint disabled" for r in caplog.records))
    third = await state.emit()  # unkeyed: the one-statement emit on PostgreSQL
    assert (await state.delivery(third.delivery_ids[0])).status == webhook_pb2.DELIVERY_STATUS_ENDPOINT_DISABLED
    state.endpoint.answers = []
    again = await state.client.redeliver(product="shop", env="dev", delivery_id=third.delivery_ids[0])
    assert again.status == PENDING
    assert (await state.settled(third.delivery_ids[0], 1)).status == DELIVERED
    assert len(state.endpoint.received) == sent + 1


async def test_an_attempt_under_way_when_its_endpoint_is_disabled_is_recorded_and_its_delivery_disabled(
    store_factory: Callable[[], Awaitable[Store]],
) -> None:
    store = await store_factory()
    now = START
    message = WebhookMessage("msg_1", "shop", "dev", "orders", "paid", "{}", "", "", now)
    deliveries = [
        DeliveryRecord(
            f"dlv_{n}", "msg_1", "shop", "dev", "orders", "paid", "http://e/hook", PENDING_STATE, 0, now, now, 0
        )
        for n in (1, 2, 3)
    ]
    await store.insert_webhook_message(message, deliveries)
    one_hour = timedelta(hours=1)

    def failed(delivery: DeliveryRecord, owner: str, at: datetime) -> AttemptEnd:
        attempt = AttemptRecord(delivery.delivery_id, delivery.attempts, at, 5, 500, "no", "answered 500", False)
        return AttemptEnd(delivery, owner, attempt, PENDING_STATE, at + timedelta(seconds=5), one_hour)

    # Replica A fails dlv_1 (the endpoint fails from now on), then claims it again with dlv_2 an hour later; replica B
    # claims dlv_3 at the same moment.
    (claimed,) = await store.claim_deliveries("a", now, now + timedelta(minutes=1), 1)
    assert await store.end_deliveries([failed(claimed[0], "a", now)], now) == []
    later = now + one_hour
    by_a = [d for d, _ in await store.claim_deliveries("a", later, later + timedelta(minutes=1), 2)]
    by_b = [d for d, _ in await store.claim_deliveries("b", later, later + timedelta(minutes=1), 2)]
    assert sorted(d.delivery_id for d in by_a + by_b) == ["dlv_1", "dlv_2", "dlv_3"]
    # A's ends disable the endpoint; B's delivery, under way, stays pending until B's attempt ends.
    assert await store.end_deliveries([failed(d, "a", later) for d in by_a], later) == [
        ("shop", "dev", "orders", "http://e/hook")
    ]
    states = {d.delivery_id: d for d in await store.list_deliveries(DeliveryFilter("shop", "dev"), after=None, limit=9)}
    assert [states[d.delivery_id].status for d in by_b] == [PENDING_STATE]
    assert await store.end_deliveries([failed(d, "b", later) for d in by_b], later) == []
    for delivery_id in ("dlv_1", "dlv_2", "dlv_3"):
        found = await store.get_delivery("shop", "dev", delivery_id)
        assert found is not None
        record, _, attempts = found
        assert record.status == DeliveryStatus.ENDPOINT_DISABLED and record.next_attempt_at is None
        assert len(attempts) == (2 if delivery_id == "dlv_1" else 1)


async def test_redeliver_after_a_delivery_sends_it_again_and_numbers_the_attempts_on(hooks: Factory) -> None:
    state = await hooks()
    emitted = await state.emit()
    delivery_id = emitted.delivery_ids[0]
    assert (await state.settled(delivery_id, 1)).status == DELIVERED
    again = await state.client.redeliver(product="shop", env="dev", delivery_id=delivery_id)
    assert again.status == PENDING
    twice = await state.settled(delivery_id, 2)
    assert twice.status == DELIVERED
    assert [(a.number, a.success) for a in twice.attempt_details] == [(1, True), (2, True)]
    assert len(state.endpoint.received) == 2


async def test_private_addresses_are_refused_unless_the_environment_allows_them(hooks: Factory) -> None:
    state = await hooks(private=False)
    emitted = await state.emit()
    refused = await state.settled(emitted.delivery_ids[0], 1)
    assert refused.status == PENDING and "non-public" in refused.attempt_details[0].error
    assert state.endpoint.received == []


async def test_an_idempotency_key_emits_once_and_refuses_another_payload(hooks: Factory) -> None:
    state = await hooks()
    first = await state.emit(idempotency_key="k")
    again = await state.emit(idempotency_key="k")
    assert (
        again.duplicate
        and again.message_id == first.message_id
        and list(again.delivery_ids) == list(first.delivery_ids)
    )
    with pytest.raises(FailedPreconditionError) as refused:
        await state.emit({"orderId": "other"}, idempotency_key="k")
    assert refused.value.reason == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"event": "orders"}, "event"),
        ({"event": ""}, "event"),
        ({"product": ""}, "product"),
        ({"payload": {"amount": 1}}, "payload.orderId"),
        ({"payload": [1]}, "payload"),
        ({"idempotency_key": "k" * 300}, "idempotency_key"),
    ],
)
async def test_bad_emits_are_invalid_argument_naming_the_field(
    hooks: Factory, fields: dict[str, Any], field_name: str
) -> None:
    state = await hooks()
    fields = dict(fields)  # the parameters are shared by both stores' runs
    payload = fields.pop("payload", None)
    with pytest.raises(InvalidArgumentError) as refused:
        await state.emit(payload, **fields)
    assert [v.field for v in refused.value.field_violations] == [field_name]


async def test_unknown_webhooks_events_and_deliveries_are_not_found(hooks: Factory) -> None:
    state = await hooks()
    for event, reason in (("nope:paid", "WEBHOOK_NOT_FOUND"), ("orders:nope", "WEBHOOK_EVENT_NOT_FOUND")):
        with pytest.raises(NotFoundError) as missing:
            await state.emit(event=event)
        assert missing.value.reason == reason
    with pytest.raises(NotFoundError) as missing:
        await state.delivery("dlv_nope")
    assert missing.value.reason == "DELIVERY_NOT_FOUND"


async def test_an_event_no_endpoint_takes_makes_no_delivery_and_deliveries_list_newest_first(hooks: Factory) -> None:
    state = await hooks()
    none = await state.emit({"why": "x"}, event="orders:refunded")
    assert list(none.delivery_ids) == []
    emitted = [await state.emit({"orderId": str(n)}) for n in range(3)]
    page = await state.client.list_deliveries(product="shop", env="dev", page_size=2)
    rest = await state.client.list_deliveries(product="shop", env="dev", page_size=2, page_token=page.next_page_token)
    listed = [d.delivery_id for d in [*page.deliveries, *rest.deliveries]]
    assert listed == [e.delivery_ids[0] for e in reversed(emitted)]
    assert rest.next_page_token == ""
    with pytest.raises(InvalidArgumentError):
        await state.client.list_deliveries(product="shop", env="dev", page_token="garbage")


async def test_the_retention_purge_deletes_what_is_done_and_older_and_keeps_what_is_pending(hooks: Factory) -> None:
    clock = FakeClock()
    state = await hooks(clock=clock, schedule="[0, 40d]")  # a failed delivery waits 40 days for its retry
    done = await state.emit(idempotency_key="done")
    assert (await state.settled(done.delivery_ids[0], 1)).status == DELIVERED
    state.endpoint.answers = [500] * 10
    pending = await state.emit({"orderId": "o-2"}, idempotency_key="pending")
    assert (await state.settled(pending.delivery_ids[0], 1)).status == PENDING
    webhooks = state.running.app.components.webhooks
    assert await webhooks.purge() == (0, 0)  # nothing is older than the retention (30 days by default)
    clock.advance(timedelta(days=31))
    assert await webhooks.purge() == (1, 0)
    with pytest.raises(NotFoundError):
        await state.delivery(done.delivery_ids[0])
    store = state.running.app.components.store
    assert await rows(store, "SELECT count(*) FROM webhook_attempts WHERE delivery_id = ?", done.delivery_ids[0]) == 0
    assert await rows(store, "SELECT count(*) FROM webhook_messages WHERE message_id = ?", done.message_id) == 0
    kept = await state.delivery(pending.delivery_ids[0])  # pending: kept with its message and attempts
    assert kept.status == PENDING and len(kept.attempt_details) >= 1
    again = await state.emit(idempotency_key="done")  # the key went with its message
    assert not again.duplicate and again.message_id != done.message_id


async def rows(store: Store, query: str, *args: Any) -> int:
    """A count the test reads from the store's tables directly."""
    row = await store._reader.fetchrow(Statement(query), *args)  # type: ignore[attr-defined]
    assert row is not None
    return int(row[0])


async def test_an_emit_writes_an_execution_record_and_so_does_one_whose_payload_is_refused(hooks: Factory) -> None:
    state = await hooks()
    emitted = await state.emit(idempotency_key="k")
    again = await state.emit(idempotency_key="k")
    with pytest.raises(InvalidArgumentError):
        await state.emit({"amount": 1})  # the event's schema requires orderId
    listed = await state.running.client.logs.list_executions(product="shop", resource="orders:paid")
    records = {e.process_id: e for e in listed.executions}
    assert emitted.process_id and again.process_id and len(records) == 3
    first, repeat = records[emitted.process_id], records[again.process_id]
    assert (first.kind, first.resource, first.env, first.status) == (
        "webhook",
        "orders:paid",
        "dev",
        log_pb2.EXECUTION_STATUS_SUCCESS,
    )
    assert json.loads(first.detail) == {"message_id": emitted.message_id, "deliveries": 1}
    assert json.loads(repeat.detail) == {"message_id": emitted.message_id, "deliveries": 1, "duplicate": True}
    [refused] = [e for e in records.values() if e.status == log_pb2.EXECUTION_STATUS_FAIL]
    assert refused.error_reason == "INVALID_INPUT" and refused.detail == ""


async def test_a_rate_limit_spaces_the_sends_and_a_long_queue_waits_in_the_store_unattempted(hooks: Factory) -> None:
    state = await hooks(rate=2)  # a slot every 0.5 s; an attempt waits at most 5 s for one
    emitted = [await state.emit({"orderId": str(n)}) for n in range(14)]
    for one in emitted:
        delivery = await state.settled(one.delivery_ids[0], 1, DELIVERED, timeout=20)
        assert delivery.status == DELIVERED
        assert delivery.attempts == 1 and len(delivery.attempt_details) == 1  # a deferral is not an attempt
    arrivals = state.endpoint.arrivals
    assert len(arrivals) == 14
    # Sends start on a 0.5 s grid; a send that a loaded machine delays may arrive just before the next one, so the
    # spacing is checked two slots apart (1 s nominal) and over the whole run: without the limit all 14 come at once.
    assert min(b - a for a, b in zip(arrivals, arrivals[2:], strict=False)) >= 0.5, arrivals
    assert arrivals[-1] - arrivals[0] >= 13 * 0.45, arrivals
