"""A message the processor fetched but gave back before any client saw it (`release`) keeps its delivery attempt.

On every broker type, against the adapter directly: one subscription of a group takes a message and releases it
unseen; another subscription of the group then gets it with attempt 1, not 2, so a group with `max_deliveries` never
dead-letters a message for returns no client took part in. A real nack still counts. JetStream and RabbitMQ count
every return on the broker; their adapters subtract the returns they made unseen (`UnseenReturns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

import pytest

from ductape_processor.adapters.brokers.base import BrokerAdapter, BrokerSubscription, SubscribeOptions
from ductape_processor.runtime.brokers.messages import IncomingEvent
from tests.conftest import require_tcp
from tests.test_broker_redis import message
from tests.test_brokers import KINDS, SERVERS, delete_rabbitmq

OPTIONS = SubscribeOptions(prefetch=1, ack_deadline_s=10.0)


def _open(kind: str, run: str) -> BrokerAdapter:
    if kind == "memory":
        from ductape_processor.adapters.brokers.memory import MemoryBroker

        return MemoryBroker()
    url = str(SERVERS[kind][3]["url"])
    if kind == "redis":
        from ductape_processor.adapters.brokers.redis import RedisBroker

        return RedisBroker(url, "test")
    if kind == "rabbitmq":
        from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(url, "", "test")
    from ductape_processor.adapters.brokers.nats import NatsBroker

    return NatsBroker(url, f"t_{run}", "test")


async def _forget(kind: str, run: str, topic: str, group: str) -> None:
    """Delete what the durable brokers keep for this run."""
    if kind == "redis":
        import redis.asyncio as redis

        client = redis.from_url(str(SERVERS["redis"][3]["url"]))
        try:
            await client.delete(f"ductape:topic:{topic}")
        finally:
            await client.aclose()
    elif kind == "nats":
        import nats

        connection = await nats.connect(str(SERVERS["nats"][3]["url"]))
        try:
            with contextlib.suppress(Exception):
                await connection.jetstream().delete_stream(f"t_{run}")
        finally:
            await connection.close()
    elif kind == "rabbitmq":
        from ductape_processor.adapters.brokers.rabbitmq_queue import queue_name

        await delete_rabbitmq([queue_name(topic, group)], [topic])


@pytest.fixture(params=KINDS)
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[tuple[BrokerAdapter, str, str]]:
    kind: str = request.param
    if kind != "memory":
        name, host, port, _ = SERVERS[kind]
        await require_tcp(name, host, port)
    run = secrets.token_hex(4)
    topic, group = f"unseen.{run}", "workers"
    broker = _open(kind, run)
    try:
        yield broker, topic, group
    finally:
        await broker.close()
        await _forget(kind, run, topic, group)


async def _one(subscription: BrokerSubscription, within: float = 10.0) -> IncomingEvent:
    async with asyncio.timeout(within):
        while True:
            if messages := await subscription.fetch(1, 0.2):
                [message] = messages
                return message


async def _give_back_and_take_again(
    adapter: tuple[BrokerAdapter, str, str], give_back: Callable[[BrokerSubscription, str], object]
) -> tuple[IncomingEvent, IncomingEvent]:
    broker, topic, group = adapter
    first = await broker.subscribe(topic, group, OPTIONS)
    second = await broker.subscribe(topic, group, OPTIONS)
    try:
        await broker.publish(topic, message(b"one"))
        taken = await _one(first)
        await give_back(first, taken.handle)  # type: ignore[misc]
        await first.close()  # the message must go to the group's other subscriber
        again = await _one(second)
        await second.ack([again.handle])
        return taken, again
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(("give_back", "attempt"), [("release", 1), ("nack", 2)])
async def test_only_returns_a_client_took_part_in_count_as_deliveries(
    adapter: tuple[BrokerAdapter, str, str], give_back: str, attempt: int
) -> None:
    """A release (fetched, never written to a client) keeps the attempt; a nack counts one."""

    async def back(subscription: BrokerSubscription, handle: str) -> None:
        await getattr(subscription, give_back)([handle])

    taken, again = await _give_back_and_take_again(adapter, back)
    assert taken.delivery_attempt == 1
    assert again.id == taken.id
    assert again.delivery_attempt == attempt
