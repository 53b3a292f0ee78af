"""kill -9 of a processor (a real `ductape-processor serve` process on the PostgreSQL store) after it answered 200 to
a received webhook and before the webhook's dispatch reached the broker: the webhook is stored with its dispatch
pending, so the restarted processor publishes it once the dead one's lease has run out. And the same kill after the
dispatch started its feature run: the restarted processor's dispatch finds that run (its idempotency key is the
received webhook's id) and starts no other.

The broker (the machine's Redis) is reached through a link the test controls: it holds the dead processor's publish
(accepted, never forwarded), so the kill falls between accepting and dispatching every time."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from ductape.processor.features import FeatureRun
from ductape.processor.v1 import webhook_pb2

from ductape_processor.adapters.brokers.redis import stream_key
from tests.conftest import require_tcp
from tests.faults.replicas import Replica, serve
from tests.faulty_link import FaultyLink
from tests.features_harness import Ops, op, step
from tests.features_harness import manifest as features_manifest

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

LEASE_S = 2.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def product(redis_port: int, topic: str) -> bytes:
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "brokers": [
            {
                "tag": "events",
                "envs": {"dev": {"type": "redis", "url": f"redis://127.0.0.1:{redis_port}/0"}},
                "topics": [{"tag": "payments", "name": topic}],
            }
        ],
        "webhooks": [
            {
                "tag": "payments",
                "receive": {"dev": {"path": "/payments", "verify": "none", "dispatch": {"publish": "events:payments"}}},
            }
        ],
    }
    return json.dumps(document).encode()


async def dispatch_of(replica: Replica, received_id: str) -> webhook_pb2.ReceivedDispatch:
    listed = await replica.client.webhook.list_received(product="shop", env="dev")
    return next(r.dispatch for r in listed.received if r.id == received_id)


async def settled(replica: Replica, received_id: str, since: float) -> webhook_pb2.ReceivedDispatch:
    """The dispatch once it is no longer pending (its end is written just after it is made)."""
    done = await dispatch_of(replica, received_id)
    while done.status == webhook_pb2.DISPATCH_STATUS_PENDING:
        assert time.monotonic() - since < 30, "the restarted processor did not dispatch the webhook"
        await asyncio.sleep(0.05)
        done = await dispatch_of(replica, received_id)
    return done


@dataclass
class Broker:
    """Redis behind a link that holds every publish (`blackhole`) until the test lets them `pass`, a fresh topic
    whose stream keeps what is published (a group exists from the start), and the listener's port and settings of
    the replicas."""

    link: FaultyLink
    topic: str
    watcher: redis.Redis
    http_port: int

    @property
    def env(self) -> dict[str, str]:
        return {
            "PROCESSOR_WEBHOOK_HTTP_ADDRESS": f"127.0.0.1:{self.http_port}",
            "PROCESSOR_WEBHOOK_DISPATCH_LEASE_S": str(LEASE_S),
        }

    async def post(self, body: bytes) -> str:
        """POST a webhook to the payments receive; its received id."""
        url = f"http://127.0.0.1:{self.http_port}/webhooks/shop/dev/payments"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=body, headers={"content-type": "application/json"}) as answer,
        ):
            assert answer.status == 200
            return str((await answer.json())["id"])


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    await require_tcp("Redis", "127.0.0.1", 6379)
    link = FaultyLink("127.0.0.1", 6379)
    await link.start()
    link.mode = "blackhole"
    topic = f"webhooks.kill.{secrets.token_hex(4)}"
    watcher = redis.from_url("redis://127.0.0.1:6379/0")
    await watcher.xgroup_create(stream_key(topic), "watcher", id="$", mkstream=True)  # keeps what is published
    try:
        yield Broker(link, topic, watcher, free_port())
    finally:
        await link.close()
        await watcher.delete(stream_key(topic))
        await watcher.aclose()


async def test_kill_9_between_accepting_and_dispatching_publishes_after_the_restart(
    pg_schema: str, tmp_path: Path, replicas: list[Replica], broker: Broker
) -> None:
    manifest = tmp_path / "shop.json"
    manifest.write_bytes(product(broker.link.listen_port, broker.topic))
    first = await serve(manifest, pg_schema, tmp_path / "first", broker.env)
    replicas.append(first)
    received_id = await broker.post(b'{"id":"pay_1"}')
    answered_at = time.monotonic()
    await asyncio.sleep(0.5)  # the publish is under way, held by the link
    held = await dispatch_of(first, received_id)
    assert held.status == webhook_pb2.DISPATCH_STATUS_PENDING and held.attempts == 1 and not held.error

    first.process.kill()  # SIGKILL: no shutdown, no flush
    await first.process.wait()
    killed_at = time.monotonic()
    broker.link.cut()
    broker.link.mode = "pass"
    assert await broker.watcher.xrange(stream_key(broker.topic)) == []

    restarted = await serve(manifest, pg_schema, tmp_path / "restarted", broker.env)
    replicas.append(restarted)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    while not entries:
        assert time.monotonic() - killed_at < 30, "the restarted processor did not dispatch the webhook"
        await asyncio.sleep(0.1)
        entries = await broker.watcher.xrange(stream_key(broker.topic))
    published_at = time.monotonic()
    [(_, fields)] = entries  # the dead processor's publish never reached the broker: one copy
    assert fields[b"attr-webhook_received_id"] == received_id.encode() and fields[b"data"] == b'{"id":"pay_1"}'
    done = await settled(restarted, received_id, killed_at)
    assert done.status == webhook_pb2.DISPATCH_STATUS_DISPATCHED and done.attempts == 2 and done.message_id
    print(
        f"\nFAULT kill -9 before a received webhook's dispatch: published {published_at - killed_at:.2f} s after "
        f"the kill, {published_at - answered_at:.2f} s after the 200 (lease {LEASE_S:g} s)"
    )
    assert published_at - answered_at >= LEASE_S - 0.2  # not before the dead processor's lease ran out


async def test_kill_9_after_the_dispatch_started_its_feature_run_starts_no_second_run_after_the_restart(
    pg_schema: str, tmp_path: Path, replicas: list[Replica], broker: Broker, ops: Ops
) -> None:
    # The receive starts a feature run, then publishes (the job and the feature go before the publish): the link holds
    # the publish, so the processor is killed after its run was started and before its dispatch was recorded.
    brokers = json.loads(product(broker.link.listen_port, broker.topic))["brokers"]
    receive = {"path": "/payments", "verify": "none", "dispatch": {"feature": "paid", "publish": "events:payments"}}
    paid = {"tag": "paid", "sequence": [step("record", op("record", body={"amount": "$Input{amount}"}))]}
    manifest = tmp_path / "shop.json"
    manifest.write_bytes(
        features_manifest(ops.url, paid, brokers=brokers, webhooks=[{"tag": "payments", "receive": {"dev": receive}}])
    )
    first = await serve(manifest, pg_schema, tmp_path / "first", broker.env)
    replicas.append(first)
    received_id = await broker.post(b'{"amount":7}')
    runs: list[FeatureRun] = []
    while not runs or runs[0].status != "completed":
        await asyncio.sleep(0.05)
        runs = (await first.client.feature.list(product="shop", env="dev")).runs
    [run] = runs
    held = await dispatch_of(first, received_id)
    assert held.status == webhook_pb2.DISPATCH_STATUS_PENDING and held.attempts == 1, "the publish is held"

    first.process.kill()  # SIGKILL: the run is stored and ended, the dispatch is not recorded
    await first.process.wait()
    killed_at = time.monotonic()
    broker.link.cut()
    broker.link.mode = "pass"

    restarted = await serve(manifest, pg_schema, tmp_path / "restarted", broker.env)
    replicas.append(restarted)
    done = await settled(restarted, received_id, killed_at)
    assert done.status == webhook_pb2.DISPATCH_STATUS_DISPATCHED and done.attempts == 2 and done.message_id
    assert done.process_id == run.process_id, "the dispatch made again found the run the dead processor started"
    listed = await restarted.client.feature.list(product="shop", env="dev")
    assert [r.process_id for r in listed.runs] == [run.process_id]
    assert ops.count["record"] == 1 and ops.bodies["record"] == [{"amount": 7}]
