"""Received webhooks' dispatches, durable: a publish that fails is kept pending in the store and made again later (the
broker reached through a link this test breaks), a job dispatch runs the receive's action with the webhook's body,
and what ListReceived says of each dispatch. The kill -9 between accepting and dispatching is in
tests/faults/test_webhook_dispatch_kill.py."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from ductape.processor.v1 import webhook_pb2
from standardwebhooks import Webhook as StandardWebhook

from ductape_processor.adapters.brokers.redis import stream_key
from ductape_processor.store import Store
from ductape_processor.store.webhook_records import DispatchEnd, DispatchStatus, ReceivedRecord
from tests.conftest import Running, ServerFactory, require_tcp
from tests.faulty_link import FaultyLink
from tests.test_manifest import problems
from tests.upstream import Upstream

SECRET = "whsec_" + base64.b64encode(b"the payment provider's secret!!!").decode()
PENDING = webhook_pb2.DISPATCH_STATUS_PENDING
DISPATCHED = webhook_pb2.DISPATCH_STATUS_DISPATCHED
FAILED = webhook_pb2.DISPATCH_STATUS_FAILED


def manifest(redis_port: int, topic: str, upstream: str) -> str:
    return f"""
product: shop
environments: [{{slug: dev}}]
apps:
  - tag: billing
    envs: {{dev: {{base_url: "{upstream}"}}}}
    retry: {{max: 0}}
    actions:
      - {{tag: record, method: POST, path: /record}}
brokers:
  - tag: events
    envs: {{dev: {{type: redis, url: "redis://127.0.0.1:{redis_port}/0"}}}}
    topics: [{{tag: payments, name: "{topic}"}}]
webhooks:
  - tag: payments
    receive:
      dev: {{path: /payments, secret: "$Secret{{PAY}}", dispatch: {{publish: "events:payments"}}}}
  - tag: invoices
    receive:
      dev: {{path: /invoices, verify: none, dispatch: {{job: {{kind: action, event: "billing:record"}}}}}}
"""


def signed(body: bytes, msg_id: str) -> dict[str, str]:
    moment = datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": StandardWebhook(SECRET).sign(msg_id, moment, body.decode()),
        "content-type": "application/json",
    }


class Setup:
    def __init__(self, running: Running, base: str, http: aiohttp.ClientSession, link: FaultyLink, topic: str):
        self.running, self.base, self.http, self.link, self.topic = running, base, http, link, topic

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> str:
        async with self.http.post(f"{self.base}{path}", data=body, headers=headers) as answer:
            assert answer.status == 200, await answer.text()
            return str((await answer.json())["id"])

    async def dispatch_of(self, received_id: str) -> webhook_pb2.ReceivedDispatch:
        listed = await self.running.client.webhook.list_received(product="shop", env="dev")
        return next(r.dispatch for r in listed.received if r.id == received_id)

    async def settled(
        self, received_id: str, done: Callable[[webhook_pb2.ReceivedDispatch], bool], timeout: float = 20.0
    ) -> webhook_pb2.ReceivedDispatch:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            dispatch = await self.dispatch_of(received_id)
            if done(dispatch):
                return dispatch
            assert loop.time() < end, f"the dispatch did not settle: {dispatch}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def setup(start_server: ServerFactory, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Setup]:
    await require_tcp("Redis", "127.0.0.1", 6379)
    link = FaultyLink("127.0.0.1", 6379)
    await link.start()
    topic = f"webhooks.{secrets.token_hex(4)}"
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"PAY={SECRET}\n")
    client = redis.from_url("redis://127.0.0.1:6379/0")
    await client.xgroup_create(stream_key(topic), "watcher", id="$", mkstream=True)  # keeps what is published
    running = await start_server(secrets_file=secrets_file)
    await running.client.product.apply(manifest(link.listen_port, topic, upstream.url).encode())
    listener = running.app.components.webhook_http
    assert listener is not None
    await listener.ensure()
    async with aiohttp.ClientSession() as http:
        yield Setup(running, f"http://127.0.0.1:{listener.port}/webhooks/shop/dev", http, link, topic)
    await link.close()
    await client.delete(stream_key(topic))
    await client.aclose()


async def published(topic: str) -> list[dict[bytes, bytes]]:
    """What the topic's stream holds (a group exists from the start, so the adapter trims nothing unread)."""
    client = redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return [fields for _, fields in await client.xrange(stream_key(topic))]
    finally:
        await client.aclose()


async def test_a_publish_that_fails_stays_pending_in_the_store_and_is_made_once_the_broker_answers(
    setup: Setup,
) -> None:
    setup.link.mode = "blackhole"  # the broker accepts connections and never answers: the publish gives up (8 s)
    body = b'{"type":"payment.succeeded","data":{"id":"pay_1"}}'
    received_id = await setup.post("/payments", body, signed(body, "evt_1"))
    first = await setup.dispatch_of(received_id)
    assert first.status == PENDING and first.attempts == 1 and not first.message_id
    failed = await setup.settled(received_id, lambda d: bool(d.error))
    assert failed.status == PENDING and failed.HasField("next_attempt_time") and "broker" in failed.error.lower()
    assert await published(setup.topic) == []
    setup.link.cut()
    setup.link.mode = "pass"
    done = await setup.settled(received_id, lambda d: d.status == DISPATCHED)
    assert done.attempts >= 2 and done.message_id and not done.error and not done.HasField("next_attempt_time")
    [fields] = await published(setup.topic)
    assert fields[b"attr-webhook_received_id"] == received_id.encode() and fields[b"data"] == body


async def test_a_job_dispatch_runs_the_receives_action_with_the_webhooks_body(setup: Setup, upstream: Upstream) -> None:
    body = b'{"invoice":"in_1","total":12}'
    received_id = await setup.post("/invoices", body, {"content-type": "application/json"})
    done = await setup.settled(received_id, lambda d: d.status == DISPATCHED)
    assert done.job_id and not done.message_id
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not upstream.hits("/record"):
        assert loop.time() < end, "the job did not call the action"
        await asyncio.sleep(0.05)
    [hit] = upstream.hits("/record")
    assert json.loads(hit.body) == {"invoice": "in_1", "total": 12}
    job = await setup.running.client.job.get(product="shop", env="dev", job_id=done.job_id)
    assert job.job_id == done.job_id


async def test_a_body_a_job_cannot_take_fails_the_dispatch_at_once(setup: Setup, upstream: Upstream) -> None:
    received_id = await setup.post("/invoices", b"not json", {"content-type": "text/plain"})
    failed = await setup.settled(received_id, lambda d: d.status == FAILED)
    assert failed.attempts == 1 and "not a JSON object" in failed.error and not failed.job_id
    assert upstream.hits("/record") == []


@pytest.mark.parametrize(
    ("dispatch", "field", "says"),
    [
        ({"feature": "onboarding"}, "webhooks[0].receive.dev.dispatch.feature", "'onboarding' is not a feature"),
        ({"feature": "a:b"}, "webhooks[0].receive.dev.dispatch.feature", "must be a tag"),
        ({}, "webhooks[0].receive.dev.dispatch", "give publish"),
        ({"job": {"kind": "action", "event": "billing:nope"}}, "webhooks[0].receive.dev.dispatch.job.event", "nope"),
        ({"job": {"kind": "notification", "event": "n:m"}}, "webhooks[0].receive.dev.dispatch.job.kind", ""),
    ],
)
def test_a_dispatch_to_nothing_or_to_an_unknown_feature_or_job_target_is_a_manifest_problem(
    dispatch: dict[str, Any], field: str, says: str
) -> None:
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "apps": [
            {
                "tag": "billing",
                "envs": {"dev": {"base_url": "http://127.0.0.1:1"}},
                "actions": [{"tag": "r", "method": "POST", "path": "/r"}],
            }
        ],
        "webhooks": [{"tag": "w", "receive": {"dev": {"path": "/w", "verify": "none", "dispatch": dispatch}}}],
    }
    found = problems(document)
    assert field in found, found
    assert says in found[field]


async def test_a_dispatch_held_by_a_replica_is_claimed_by_another_only_once_its_lease_has_run_out(
    store_factory: Callable[[], Awaitable[Store]],
) -> None:
    store = await store_factory()
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    lease = timedelta(seconds=30)
    record = ReceivedRecord(
        "rcv_1", "shop", "dev", "payments", "evt_1", now, "application/json", "{}", b"{}",
        DispatchStatus.PENDING, 1, now, "", "a", now + lease,
    )  # fmt: skip
    assert await store.insert_received(record)
    assert await store.next_dispatch_moment() == now + lease
    assert await store.claim_dispatches("b", now + lease / 2, now + lease * 1.5, 10) == []
    [claimed] = await store.claim_dispatches("b", now + lease, now + lease * 2, 10)
    assert (claimed.received_id, claimed.dispatch_attempts, claimed.lease_owner) == ("rcv_1", 2, "b")
    assert claimed.body == b"{}" and claimed.headers == "{}"
    late = DispatchEnd("rcv_1", "a", DispatchStatus.DISPATCHED, None, '{"message_id":"m-a"}')
    await store.end_dispatches([late])  # the first holder's end, after its lease: not recorded
    [listed] = await store.list_received("shop", "dev", "", after=None, limit=5)
    assert listed.dispatch_status == DispatchStatus.PENDING and listed.lease_owner == "b"
    retry_at = now + lease * 3
    await store.end_dispatches([DispatchEnd("rcv_1", "b", DispatchStatus.PENDING, retry_at, '{"error":"down"}')])
    assert await store.next_dispatch_moment() == retry_at
    [again] = await store.claim_dispatches("b", retry_at, retry_at + lease, 10)
    assert again.dispatch_attempts == 3
    await store.end_dispatches([DispatchEnd("rcv_1", "b", DispatchStatus.DISPATCHED, None, '{"message_id":"m-b"}')])
    [done] = await store.list_received("shop", "dev", "", after=None, limit=5)
    assert (done.dispatch_status, done.dispatch_result, done.lease_owner) == (
        DispatchStatus.DISPATCHED,
        '{"message_id":"m-b"}',
        None,
    )
    assert await store.next_dispatch_moment() is None


async def test_the_retention_purge_deletes_received_webhooks_but_those_whose_dispatch_is_pending(
    store_factory: Callable[[], Awaitable[Store]],
) -> None:
    store = await store_factory()
    then = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    states = {"rcv_none": DispatchStatus.NONE, "rcv_done": DispatchStatus.DISPATCHED, "rcv_due": DispatchStatus.PENDING}
    for received_id, status in states.items():
        due = then if status == DispatchStatus.PENDING else None
        record = ReceivedRecord(received_id, "shop", "dev", "w", received_id, then, "", "{}", b"", status, 1, due)
        assert await store.insert_received(record)
    later = then + timedelta(days=1)
    assert await store.insert_received(ReceivedRecord("rcv_new", "shop", "dev", "w", "rcv_new", later, "", "{}", b""))
    assert await store.purge_webhooks(then + timedelta(seconds=1), 10) == (0, 2)
    left = await store.list_received("shop", "dev", "", after=None, limit=10)
    assert sorted(r.received_id for r in left) == ["rcv_due", "rcv_new"]
