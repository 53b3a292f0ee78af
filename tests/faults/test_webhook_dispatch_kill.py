"""kill -9 of a processor (a real `ductape-processor serve` process on the PostgreSQL store) after it answered 200 to
a received webhook and before the webhook's dispatch reached the broker: the webhook is stored with its dispatch
pending, so the restarted processor publishes it once the dead one's lease has run out.

The broker (the machine's Redis) is reached through a link the test controls: it holds the dead processor's publish
(accepted, never forwarded), so the kill falls between accepting and dispatching every time."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from ductape.processor.v1 import webhook_pb2

from ductape_processor.adapters.brokers.redis import stream_key
from tests.conftest import require_tcp
from tests.faults.replicas import Replica, serve
from tests.faulty_link import FaultyLink

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


async def test_kill_9_between_accepting_and_dispatching_publishes_after_the_restart(
    pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    await require_tcp("Redis", "127.0.0.1", 6379)
    link = FaultyLink("127.0.0.1", 6379)
    await link.start()
    link.mode = "blackhole"
    topic = f"webhooks.kill.{secrets.token_hex(4)}"
    watcher = redis.from_url("redis://127.0.0.1:6379/0")
    await watcher.xgroup_create(stream_key(topic), "watcher", id="$", mkstream=True)  # keeps what is published
    manifest = tmp_path / "shop.json"
    manifest.write_bytes(product(link.listen_port, topic))
    http_port = free_port()
    env = {
        "PROCESSOR_WEBHOOK_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "PROCESSOR_WEBHOOK_DISPATCH_LEASE_S": str(LEASE_S),
    }
    try:
        first = await serve(manifest, pg_schema, tmp_path / "first", env)
        replicas.append(first)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{http_port}/webhooks/shop/dev/payments",
                data=b'{"id":"pay_1"}',
                headers={"content-type": "application/json"},
            ) as answer,
        ):
            assert answer.status == 200
            received_id = (await answer.json())["id"]
        answered_at = time.monotonic()
        await asyncio.sleep(0.5)  # the publish is under way, held by the link
        held = await dispatch_of(first, received_id)
        assert held.status == webhook_pb2.DISPATCH_STATUS_PENDING and held.attempts == 1 and not held.error

        first.process.kill()  # SIGKILL: no shutdown, no flush
        await first.process.wait()
        killed_at = time.monotonic()
        link.cut()
        link.mode = "pass"
        assert await watcher.xrange(stream_key(topic)) == []

        restarted = await serve(manifest, pg_schema, tmp_path / "restarted", env)
        replicas.append(restarted)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        while not entries:
            assert time.monotonic() - killed_at < 30, "the restarted processor did not dispatch the webhook"
            await asyncio.sleep(0.1)
            entries = await watcher.xrange(stream_key(topic))
        published_at = time.monotonic()
        [(_, fields)] = entries  # the dead processor's publish never reached the broker: one copy
        assert fields[b"attr-webhook_received_id"] == received_id.encode() and fields[b"data"] == b'{"id":"pay_1"}'
        done = await dispatch_of(restarted, received_id)
        while done.status == webhook_pb2.DISPATCH_STATUS_PENDING:  # its end is written just after the publish
            await asyncio.sleep(0.05)
            done = await dispatch_of(restarted, received_id)
        assert done.status == webhook_pb2.DISPATCH_STATUS_DISPATCHED and done.attempts == 2 and done.message_id
        print(
            f"\nFAULT kill -9 before a received webhook's dispatch: published {published_at - killed_at:.2f} s after "
            f"the kill, {published_at - answered_at:.2f} s after the 200 (lease {LEASE_S:g} s)"
        )
        assert published_at - answered_at >= LEASE_S - 0.2  # not before the dead processor's lease ran out
    finally:
        await link.close()
        await watcher.delete(stream_key(topic))
        await watcher.aclose()
