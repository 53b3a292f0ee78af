"""Subscribe responses stay within the size gRPC lets the server send, on every broker.

A batch of large messages is written in several responses; a message that alone is larger than a response may be
(a JSON payload grows as a `Value`; another producer may write anything to the broker) goes to the dead-letter topic,
or back to the group for a while, and the stream goes on. Before, either ended the stream with RESOURCE_EXHAUSTED
("Sent message larger than max"), and the messages, delivered again, ended every stream that followed."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from ductape.processor.brokers import Message
from ductape.processor.v1 import broker_pb2

from ductape_processor.runtime.brokers import subscriptions
from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import (
    KINDS,
    SERVERS,
    _forget_pending_reads,  # noqa: F401 - the autouse fixture that ends reads left pending by `take`
    _forget_run,
    broker,  # noqa: F401 - the fixture: a server with the `shop` manifest on each broker
    manifest,
    nothing_more,
    opened,
    publish,
    subscribe,
    take,
)

SMALL = 64 * 1024  # a server's max_message_bytes, within which a publish fits and its delivery does not


async def test_a_batch_larger_than_a_response_may_be_arrives_whole_over_several_responses(
    broker: Running,  # noqa: F811
) -> None:
    # max_wait lets the batch fill with all ten (9 MB, over twice the limit) before it is written.
    sub = subscribe(broker, max_batch=10, max_wait=3.0)
    messages = await opened(sub)
    bodies = [bytes([65 + i]) * (900 * 1024) for i in range(10)]
    await asyncio.gather(
        *(
            broker.client.message_broker.publish(
                product="shop", env="dev", event="events:orders", data=body, content_type="text/plain"
            )
            for body in bodies
        )
    )
    got = await take(messages, 10, timeout=20)
    assert sorted(m.data for m in got) == bodies  # every one, whole, once, on the same stream
    assert {m.delivery_attempt for m in got} == {1}
    for message in got:
        await message.ack()
    await nothing_more(messages)
    await sub.close()


def _filling(limit: int) -> bytes:
    """A payload whose Publish request is a few bytes under `limit`: it is accepted, and its delivery (which adds an
    ack id, an id, a source, a type and a publish time) is larger than `limit`."""

    def size(data: bytes) -> int:
        message = broker_pb2.OutgoingMessage(data=data, content_type="text/plain")
        request = broker_pb2.PublishRequest(product="shop", env="dev", event="events:orders", message=message)
        return request.ByteSize()

    data = b"x" * (limit - size(b"") - 16)
    while size(data + b"x") <= limit - 4:
        data += b"x"
    return data


@pytest.fixture(params=[kind for kind in KINDS if kind != "memory"])  # a second processor shares the broker
async def small_and_large(
    request: pytest.FixtureRequest, start_server: ServerFactory, made_queues: set[str]
) -> AsyncIterator[tuple[Running, Running]]:
    """Two processors on one broker: one that sends responses of at most 64 KiB, one with the default 4 MiB."""
    kind: str = request.param
    name, host, port, _ = SERVERS[kind]
    await require_tcp(name, host, port)
    run = secrets.token_hex(4)
    small, large = await start_server(max_message_bytes=SMALL), await start_server()
    for running in (small, large):
        await running.client.product.apply(manifest(kind, run))
    yield small, large
    await _forget_run(kind, run, made_queues)


async def _too_large_then_one_more(small: Running, messages: AsyncIterator[Message]) -> bytes:
    """Publish a message too large for `small`'s responses, then a small one: the stream, left open, delivers the
    small one (acked here); returns the large one's payload."""
    big = _filling(SMALL)
    await small.client.message_broker.publish(
        product="shop", env="dev", event="events:orders", data=big, content_type="text/plain"
    )
    await publish(small, "after")
    [after] = await take(messages, 1, timeout=20)
    assert after.data == b"after" and after.delivery_attempt == 1
    await after.ack()
    return big


async def test_a_message_too_large_for_a_response_is_dead_lettered_and_the_stream_goes_on(
    small_and_large: tuple[Running, Running],
) -> None:
    small, large = small_and_large
    dead = subscribe(large, "dl", event="events:dead")
    dead_messages = await opened(dead)
    sub = subscribe(small, dead_letter_event="events:dead")
    messages = await opened(sub)
    big = await _too_large_then_one_more(small, messages)
    [buried] = await take(dead_messages, 1, timeout=20)
    assert buried.data == big
    assert buried.attributes["dead_letter_from"] == "events:orders"
    assert buried.attributes["dead_letter_reason"] == "too_large"
    await buried.ack()
    await nothing_more(messages)
    await sub.close()
    await dead.close()


async def test_without_a_dead_letter_topic_a_message_too_large_comes_back_later_and_is_not_lost(
    small_and_large: tuple[Running, Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscriptions, "TOO_LARGE_RETRY_S", 1.0)
    small, large = small_and_large
    sub = subscribe(small)
    messages = await opened(sub)
    big = await _too_large_then_one_more(small, messages)
    await sub.close()
    # The group still has it: a stream of the processor that may send it gets it, given back once.
    elsewhere = subscribe(large)
    again = await opened(elsewhere)
    [kept] = await take(again, 1, timeout=20)
    assert kept.data == big and kept.delivery_attempt >= 2
    await kept.ack()
    await elsewhere.close()
