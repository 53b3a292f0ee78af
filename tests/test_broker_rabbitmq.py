"""RabbitMQ-specific behaviour against the local server (127.0.0.1:5672, guest/guest): what the contract tests in
test_brokers.py cannot show. A connection closed by the server while a subscriber is attached and publishing goes
on; a group that keeps its messages while no processor is running; the CloudEvents headers on the wire; and a
broker that cannot be reached.

Queues and exchanges made here are deleted afterwards. Under CI=true, those that earlier runs of the contract
tests left behind (a durable quorum queue per test group, named after the run) are deleted when this module
starts, so a machine that runs CI often does not pile them up; elsewhere that is skipped, not to pull queues from
under a run going on beside this one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from ductape.processor import UnavailableError

from ductape_processor.adapters.brokers.base import BrokerUnavailable, SubscribeOptions
from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker
from ductape_processor.adapters.brokers.rabbitmq_queue import queue_name
from ductape_processor.runtime.brokers.messages import OutgoingEvent
from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import (
    _forget_pending_reads,  # noqa: F401 - the autouse fixture that ends reads left pending by `take`
    _forget_run,
    delete_rabbitmq,
    manifest,
    opened,
    publish,
    subscribe,
    take,
)

URL = "amqp://guest:guest@127.0.0.1:5672/"
_LEFTOVER_QUEUE = re.compile(r"^ductape\.(orders|dead|other)\.[0-9a-f]{8}:")
_LEFTOVER_EXCHANGE = re.compile(r"^(orders|dead|other)\.[0-9a-f]{8}$")
_purged = False


def _require_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is None:
        why = "rabbitmqctl is not installed: the RabbitMQ server must be local to close its connections"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI=true: a missing server is a failure)")
        pytest.skip(why)


async def _rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {err.decode()}"
    return out.decode()


async def _purge_leftovers() -> None:
    """Delete the test-named queues (without consumers) and exchanges that earlier runs of the suite left."""
    global _purged
    if _purged or os.environ.get("CI") != "true":
        return
    _purged = True
    _require_rabbitmqctl()
    listed = json.loads(await _rabbitmqctl("-q", "list_queues", "name", "consumers", "--formatter", "json") or "[]")
    queues = [q["name"] for q in listed if _LEFTOVER_QUEUE.match(q["name"]) and not q["consumers"]]
    exchanges = json.loads(await _rabbitmqctl("-q", "list_exchanges", "name", "--formatter", "json") or "[]")
    await delete_rabbitmq(queues, [e["name"] for e in exchanges if _LEFTOVER_EXCHANGE.match(e["name"])])


@pytest.fixture
async def rabbit(start_server: ServerFactory, made_queues: set[str]) -> AsyncIterator[Running]:
    """A processor with test_brokers' manifest on RabbitMQ; the queues it declared and the run's exchanges are
    deleted after."""
    await require_tcp("RabbitMQ", "127.0.0.1", 5672)
    await _purge_leftovers()
    running = await start_server()
    running.run = secrets.token_hex(4)  # type: ignore[attr-defined]
    await running.client.product.apply(manifest("rabbitmq", running.run))  # type: ignore[attr-defined]
    yield running
    await _forget_run("rabbitmq", running.run, made_queues)  # type: ignore[attr-defined]


def _adapter(running: Running) -> RabbitMQBroker:
    [adapter] = running.app.components.brokers._adapters.open_adapters()  # the one broker environment the tests use
    assert isinstance(adapter, RabbitMQBroker)
    return adapter


async def test_a_connection_closed_by_the_server_is_restored_and_the_subscriber_continues(rabbit: Running) -> None:
    _require_rabbitmqctl()
    sub = subscribe(rabbit, "drop", max_in_flight=20, max_batch=5)
    messages = await opened(sub)
    received: collections.Counter[str] = collections.Counter()

    async def consume() -> None:
        while True:
            [message] = await take(messages, 1, timeout=60)
            received[message.data.decode()] += 1
            await message.ack()

    consumer = asyncio.ensure_future(consume())
    sent: list[str] = []
    failed = 0
    try:

        async def send(count: int) -> None:
            nonlocal failed
            for _ in range(count):
                body = f"m{len(sent) + failed:03d}"
                try:
                    await publish(rabbit, body)
                    sent.append(body)
                except UnavailableError:
                    failed += 1
                await asyncio.sleep(0.02)

        await send(20)
        assert _adapter(rabbit).reconnections == 0
        # A real server-side close of every connection (the processor's included), while publishing goes on.
        drop = asyncio.ensure_future(_rabbitmqctl("close_all_connections", "test: connection drop"))
        while not drop.done():
            await send(1)
        await drop
        await send(30)
        async with asyncio.timeout(10):
            while not set(sent) <= set(received):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # late redeliveries of messages acked on the lost channel
    finally:
        consumer.cancel()
        with contextlib.suppress(BaseException):
            await consumer
    assert _adapter(rabbit).reconnections >= 1, "the connection was not dropped"
    assert failed == 0, "publishes wait for the connection to come back"
    assert set(received) == set(sent), "every confirmed publish reached the subscriber"
    duplicates = sum(received.values()) - len(received)
    print(f"sent {len(sent)}, received {sum(received.values())} ({len(received)} distinct), {duplicates} duplicates")
    # Only messages delivered on the lost channel come again: at most max_in_flight, plus a publish retried after
    # a lost confirm.
    assert duplicates <= 25, f"{duplicates} duplicates"
    await sub.close()


async def test_a_group_keeps_its_messages_while_no_processor_runs(rabbit: Running, start_server: ServerFactory) -> None:
    first = subscribe(rabbit, "durable")
    await opened(first)  # the group exists from here on
    await first.close()
    await asyncio.sleep(0.2)
    ids = await publish(rabbit, *[f"kept{n}" for n in range(10)])  # nobody is subscribed now
    await rabbit.app.stop(grace=1)

    again = await start_server(data_dir=rabbit.app.settings.data_dir)  # a new process on the same store
    sub = again.client.message_broker.subscribe(
        product="shop", env="dev", event="events:orders", group="durable", ack_deadline=10.0
    )
    received = await take(await opened(sub), 10)
    assert sorted(m.id for m in received) == sorted(ids)
    assert sorted(m.data.decode() for m in received) == [f"kept{n}" for n in range(10)]
    assert all(m.delivery_attempt == 1 for m in received), "never delivered before"
    for message in received:
        await message.ack()
    await sub.close()


async def test_messages_carry_cloudevents_headers_on_the_wire() -> None:
    await require_tcp("RabbitMQ", "127.0.0.1", 5672)
    topic = f"wire.{secrets.token_hex(4)}"
    adapter = RabbitMQBroker(URL, "", "test/wire")
    connection = await aio_pika.connect(URL)
    try:
        subscription = await adapter.subscribe(topic, "g", SubscribeOptions(prefetch=10, ack_deadline_s=10))
        # A second, raw queue on the same exchange shows what other AMQP consumers see.
        channel = await connection.channel()
        raw = await channel.declare_queue(exclusive=True)
        await raw.bind(topic, routing_key=topic)
        sent = OutgoingEvent(
            id="abc123",
            source="/ductape/shop/dev/events",
            type=topic,
            time=datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC),
            data=b'{"n": 1}',
            content_type="application/json",
            attributes={"region": "eu", "x.y-z_1": "v"},
            ordering_key="customer-1",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        assert await adapter.publish(topic, sent) == "abc123"
        wire = await raw.get(timeout=5)
        assert wire is not None
        await wire.ack()
        assert wire.content_type == "application/json" and wire.message_id == "abc123"
        assert wire.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert wire.headers == {
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": "abc123",
            "cloudEvents_source": "/ductape/shop/dev/events",
            "cloudEvents_type": topic,
            "cloudEvents_time": "2026-05-04T03:02:01.123456+00:00",
            "cloudEvents_partitionkey": "customer-1",
            "traceparent": sent.traceparent,
            "attr-region": "eu",
            "attr-x.y-z_1": "v",
        }
        [received] = await subscription.fetch(10, 5)
        assert (received.id, received.source, received.type, received.time) == (sent.id, sent.source, topic, sent.time)
        assert received.attributes == sent.attributes and received.data == sent.data
        assert (received.ordering_key, received.traceparent) == (sent.ordering_key, sent.traceparent)
        assert received.delivery_attempt == 1
        # nack then close, as the engine ends a stream: returned once, so the next attempt is 2.
        await subscription.nack([received.handle])
        await subscription.close()
        later = await adapter.subscribe(topic, "g", SubscribeOptions(prefetch=10, ack_deadline_s=10))
        [again] = await later.fetch(10, 5)
        assert again.id == "abc123" and again.delivery_attempt == 2
        await later.ack([again.handle])
        await later.ack([again.handle])  # a handle already settled is ignored
        await later.close()
    finally:
        await adapter.close()
        await connection.close()
        await delete_rabbitmq([queue_name(topic, "g")], [topic])


async def test_an_unreachable_broker_is_unavailable_with_a_clear_message() -> None:
    adapter = RabbitMQBroker("amqp://guest:s3cret@127.0.0.1:1/", "", "shop/dev/events")
    message = OutgoingEvent(id="x", source="/s", type="t", time=datetime.now(UTC), data=b"", content_type="text/plain")
    try:
        with pytest.raises(BrokerUnavailable) as publishing:
            await adapter.publish("t", message)
        with pytest.raises(BrokerUnavailable) as subscribing:
            await adapter.subscribe("t", "g", SubscribeOptions(prefetch=1, ack_deadline_s=1))
    finally:
        await adapter.close()
    for caught in (publishing, subscribing):
        assert caught.value.reason == "BROKER_UNAVAILABLE"
        assert "127.0.0.1:1" in str(caught.value) and "s3cret" not in str(caught.value)
