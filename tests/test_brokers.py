"""BrokerService through a real server, once per broker type: memory, Redis, RabbitMQ and NATS.

Every broker passes the same behaviour tests (the contract); broker-specific tests (connection drops, durability
across a restart) sit at the end. Topic and group names are unique per test, so durable brokers never mix runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from ductape.processor import InvalidArgumentError, NotFoundError, ProcessorError, UnavailableError
from ductape.processor.brokers import Message, Subscription, outgoing
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc

from tests.conftest import Running, ServerFactory, require_tcp

SERVERS = {
    "redis": ("Redis", "127.0.0.1", 6379, {"type": "redis", "url": "redis://127.0.0.1:6379/0"}),
    "rabbitmq": ("RabbitMQ", "127.0.0.1", 5672, {"type": "rabbitmq", "url": "amqp://guest:guest@127.0.0.1:5672/"}),
    "nats": ("NATS", "127.0.0.1", 4222, {"type": "nats", "url": "nats://127.0.0.1:4222"}),
}
MODULES = {
    "memory": "ductape_processor.adapters.brokers.memory",
    "redis": "ductape_processor.adapters.brokers.redis",
    "rabbitmq": "ductape_processor.adapters.brokers.rabbitmq",
    "nats": "ductape_processor.adapters.brokers.nats",
}


def _available(kind: str) -> bool:
    try:
        importlib.import_module(MODULES[kind])
    except ModuleNotFoundError:
        return False
    return True


KINDS = [kind for kind in MODULES if _available(kind)]


def manifest(kind: str, run: str) -> bytes:
    config: dict[str, Any] = {"type": "memory"} if kind == "memory" else dict(SERVERS[kind][3])
    if kind == "nats":
        config["stream"] = f"t_{run}"
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}, {"slug": "prd", "name": "production"}],
        "brokers": [
            {
                "tag": "events",
                "envs": {"dev": config, "prd": config},
                "topics": [
                    {"tag": "orders", "name": f"orders.{run}"},
                    {"tag": "dead", "name": f"dead.{run}"},
                    {"tag": "other", "name": f"other.{run}"},
                ],
            }
        ],
    }
    return json.dumps(document).encode()


@pytest.fixture(autouse=True)
async def _forget_pending_reads() -> AsyncIterator[None]:
    yield
    for future in pending_first.values():
        future.cancel()
        with contextlib.suppress(BaseException):
            await future
    pending_first.clear()


@pytest.fixture(params=KINDS)
async def broker(
    request: pytest.FixtureRequest, start_server: ServerFactory, made_queues: set[str]
) -> AsyncIterator[Running]:
    kind: str = request.param
    if kind != "memory":
        name, host, port, _ = SERVERS[kind]
        await require_tcp(name, host, port)
    running = await start_server()
    running.kind = kind  # type: ignore[attr-defined]
    running.run = secrets.token_hex(4)  # type: ignore[attr-defined]
    await running.client.product.apply(manifest(kind, running.run))  # type: ignore[attr-defined]
    yield running
    await _forget_run(kind, running.run, made_queues)  # type: ignore[attr-defined]


async def delete_rabbitmq(queues: Iterable[str], exchanges: Iterable[str]) -> None:
    """Delete queues and exchanges on the local RabbitMQ; those already gone are skipped."""
    import aio_pika

    connection = await aio_pika.connect(str(SERVERS["rabbitmq"][3]["url"]))
    try:
        channel = await connection.channel()
        for name in queues:
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
        for name in exchanges:
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


async def _forget_run(kind: str, run: str, queues: Iterable[str] = ()) -> None:
    """Delete what a durable broker keeps for this test's topics, so runs do not pile up on the servers."""
    if kind == "redis":
        import redis.asyncio as redis

        client = redis.from_url("redis://127.0.0.1:6379/0")
        try:
            keys = [key async for key in client.scan_iter(match=f"ductape:topic:*.{run}")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    elif kind == "nats":
        import nats

        connection = await nats.connect("nats://127.0.0.1:4222")
        try:
            with contextlib.suppress(Exception):
                await connection.jetstream().delete_stream(f"t_{run}")
        finally:
            await connection.close()
    elif kind == "rabbitmq":
        await delete_rabbitmq(queues, [f"{tag}.{run}" for tag in ("orders", "dead", "other")])


def subscribe(running: Running, group: str = "g", **options: Any) -> Subscription:
    options.setdefault("ack_deadline", 10.0)
    return running.client.message_broker.subscribe(
        product="shop", env="dev", event=options.pop("event", "events:orders"), group=group, **options
    )


async def opened(subscription: Subscription) -> AsyncIterator[Message]:
    """Open the stream (the server created the group once `ready` came) and return its message iterator."""
    iterator = subscription.__aiter__()
    reader = asyncio.ensure_future(anext(iterator))
    for _ in range(200):
        if subscription._call is not None:
            break
        await asyncio.sleep(0.01)
    pending_first[id(iterator)] = reader
    return iterator


pending_first: dict[int, asyncio.Future[Message]] = {}


def _next(iterator: AsyncIterator[Message]) -> asyncio.Future[Message]:
    # A pending read is kept, never cancelled: cancelling it would end the subscription's generator.
    future = pending_first.get(id(iterator))
    if future is None:
        future = pending_first[id(iterator)] = asyncio.ensure_future(anext(iterator))
    return future


async def take(iterator: AsyncIterator[Message], count: int, timeout: float = 10.0) -> list[Message]:
    """The next `count` messages (fails after `timeout`)."""
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while len(got) < count:
        future = _next(iterator)
        done, _ = await asyncio.wait({future}, timeout=max(until - loop.time(), 0))
        if not done:
            raise AssertionError(f"got {len(got)} of {count} messages within {timeout}s")
        del pending_first[id(iterator)]
        got.append(future.result())
    return got


async def nothing_more(iterator: AsyncIterator[Message], wait: float = 0.7) -> None:
    future = _next(iterator)
    done, _ = await asyncio.wait({future}, timeout=wait)
    if done:
        message = future.result()
        raise AssertionError(f"unexpected message {message.data!r} (attempt {message.delivery_attempt})")


async def publish(running: Running, *bodies: str, event: str = "events:orders", **options: Any) -> list[str]:
    return [
        await running.client.message_broker.publish(
            product="shop", env="dev", event=event, data=body.encode(), content_type="text/plain", **options
        )
        for body in bodies
    ]


async def test_roundtrip_with_attributes_and_trace_context(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        response = await stub.Publish(
            broker_pb2.PublishRequest(
                product="shop",
                env="dev",
                event="events:orders",
                message=outgoing(json={"order": 7}, attributes={"region": "eu", "kind": "created"}),
            ),
            metadata=(("traceparent", traceparent),),
        )
    [message] = await take(messages, 1)
    assert message.id == response.message_id
    assert message.json() == {"order": 7} and message.content_type == "application/json"
    assert message.attributes == {"region": "eu", "kind": "created"}
    assert message.traceparent == traceparent
    assert message.source == "/ductape/shop/dev/events" and message.type == f"orders.{broker.run}"  # type: ignore[attr-defined]
    assert message.delivery_attempt == 1 and message.publish_time.year >= 2026
    await message.ack()
    await sub.close()


async def test_json_payloads_arrive_as_the_values_they_were_published_as(broker: Running) -> None:
    values, raw = subscribe(broker, "values"), subscribe(broker, "bytes", json_values=False)
    as_values, as_bytes = await opened(values), await opened(raw)
    published: list[Any] = [{"big": 2**40, "list": [1, "two", None], "empty": {}}, None, {}, [], "text", 1.5]
    messages = [outgoing(json=value) for value in published]
    messages.append(outgoing(b'{"as": "bytes"}', content_type="application/json"))
    results = await broker.client.message_broker.publish_batch(
        product="shop", env="dev", event="events:orders", messages=messages
    )
    assert all(result.ok for result in results)
    got, got_bytes = await take(as_values, len(messages)), await take(as_bytes, len(messages))
    assert [m.published_as_json for m in got] == [True] * len(published) + [False]
    assert [m.json() for m in got] == [*published, {"as": "bytes"}]
    assert [m.published_as_json for m in got_bytes] == [False] * len(messages)
    assert [m.json() for m in got_bytes] == [*published, {"as": "bytes"}]
    assert [json.loads(m.data) for m in (got[0], got_bytes[0])] == [published[0]] * 2
    assert b" " not in got_bytes[0].data, "compact UTF-8 JSON"
    assert got[-1].data == got_bytes[-1].data == b'{"as": "bytes"}'
    for message in [*got, *got_bytes]:
        await message.ack()
    await values.close()
    await raw.close()


async def test_a_dead_lettered_json_message_stays_a_json_value(broker: Running) -> None:
    dead = subscribe(broker, "dead", event="events:dead")
    dead_messages = await opened(dead)
    sub = subscribe(broker, max_deliveries=1, dead_letter_event="events:dead")
    messages = await opened(sub)
    await broker.client.message_broker.publish(product="shop", env="dev", event="events:orders", json={"n": 1})
    [message] = await take(messages, 1)
    await message.nack()
    [buried] = await take(dead_messages, 1)
    assert buried.published_as_json and buried.json() == {"n": 1}
    await buried.ack()
    await sub.close()
    await dead.close()


async def test_a_new_manifest_version_routes_its_topics_at_once(start_server: ServerFactory) -> None:
    running = await start_server()
    run = secrets.token_hex(4)
    await running.client.product.apply(manifest("memory", run))
    await publish(running, "before", event="events:other")
    document = json.loads(manifest("memory", run))
    document["brokers"][0]["topics"] = [t for t in document["brokers"][0]["topics"] if t["tag"] != "other"]
    await running.client.product.apply(json.dumps(document).encode())
    with pytest.raises(NotFoundError) as refused:
        await publish(running, "after", event="events:other")
    assert refused.value.reason == "TOPIC_NOT_FOUND"
    await publish(running, "still", event="events:orders")


async def test_one_group_shares_and_two_groups_each_get_everything(broker: Running) -> None:
    a, b, other = (
        subscribe(broker, "shared", max_batch=1),
        subscribe(broker, "shared", max_batch=1),
        subscribe(broker, "solo"),
    )
    ia, ib, io = await opened(a), await opened(b), await opened(other)
    bodies = [f"m{n}" for n in range(20)]
    await publish(broker, *bodies)
    everything = await take(io, 20)
    assert sorted(m.data.decode() for m in everything) == sorted(bodies)
    got: list[Message] = []

    async def drain(iterator: AsyncIterator[Message]) -> None:
        while True:
            [message] = await take(iterator, 1)
            got.append(message)
            await message.ack()

    tasks = [asyncio.ensure_future(drain(ia)), asyncio.ensure_future(drain(ib))]
    try:
        async with asyncio.timeout(10):
            while len(got) < 20:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    finally:
        for task in tasks:
            task.cancel()
    assert sorted(m.data.decode() for m in got) == sorted(bodies), "shared, with no duplicates in a clean run"
    for sub in (a, b, other):
        await sub.close()


async def test_nack_redelivers_with_the_next_attempt(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    await publish(broker, "again")
    [first] = await take(messages, 1)
    await first.nack()
    [second] = await take(messages, 1)
    assert second.id == first.id and second.delivery_attempt == first.delivery_attempt + 1
    await second.nack(delay=0.5)
    [third] = await take(messages, 1, timeout=10)
    assert third.delivery_attempt == 3
    await third.ack()
    await nothing_more(messages)
    await sub.close()


async def acks_reported(sub: Subscription, counts: tuple[int, int]) -> None:
    """Wait (up to 10 s) until the server has reported these (stale, expired) acks on the stream: its reports come
    on the stream as they are made, after messages already on their way."""
    async with asyncio.timeout(10):
        while (sub.stale_acks, sub.expired_acks) != counts:
            assert sub.stale_acks <= counts[0] and sub.expired_acks <= counts[1], (sub.stale_acks, sub.expired_acks)
            await asyncio.sleep(0.01)


async def test_an_expired_ack_deadline_redelivers_and_a_late_ack_keeps_the_stream(broker: Running) -> None:
    sub = subscribe(broker, ack_deadline=1.5)  # long enough for `other`'s ack to land in time on a loaded machine
    messages = await opened(sub)
    await publish(broker, "slow", "next")
    first, other = await take(messages, 2)
    await other.ack()
    await asyncio.sleep(2.5)  # past the deadline: `first` went back to the group
    await first.ack()  # too late: ignored and reported, and the stream goes on
    [second] = await take(messages, 1, timeout=10)
    assert second.id == first.id and second.delivery_attempt == 2
    await acks_reported(sub, (1, 1))  # the redelivery may arrive before the server's word on the late ack
    await second.nack()
    await second.ack()  # already nacked: ignored too (not expired)
    [third] = await take(messages, 1, timeout=10)
    assert third.id == first.id and third.delivery_attempt == 3
    await third.ack()
    await publish(broker, "after")
    [after] = await take(messages, 1)
    assert after.data == b"after"
    await acks_reported(sub, (2, 1))
    await after.ack()
    await sub.close()


async def test_dead_letter_after_max_deliveries(broker: Running) -> None:
    dead = subscribe(broker, "dl", event="events:dead")
    dead_messages = await opened(dead)
    sub = subscribe(broker, max_deliveries=2, dead_letter_event="events:dead")
    messages = await opened(sub)
    await publish(broker, "poison")
    for attempt in (1, 2):
        [message] = await take(messages, 1)
        assert message.delivery_attempt == attempt
        await message.nack()
    [buried] = await take(dead_messages, 1)
    assert buried.data == b"poison" and buried.attributes["dead_letter_from"] == "events:orders"
    await nothing_more(messages)
    await buried.ack()
    await sub.close()
    await dead.close()


async def test_a_subscriber_leaving_mid_batch_hands_its_messages_to_the_group(broker: Running) -> None:
    leaving = subscribe(broker, "team", max_batch=10)
    leaving_messages = await opened(leaving)
    await publish(broker, *[f"m{n}" for n in range(5)])
    held = await take(leaving_messages, 5)
    await held[0].ack()
    await asyncio.sleep(0.1)
    await leaving.close()
    staying = subscribe(broker, "team")
    staying_messages = await opened(staying)
    redelivered = await take(staying_messages, 4)
    assert sorted(m.data.decode() for m in redelivered) == ["m1", "m2", "m3", "m4"]
    assert all(m.delivery_attempt == 2 for m in redelivered)
    await staying.close()


async def test_max_in_flight_is_never_exceeded(broker: Running) -> None:
    sub = subscribe(broker, max_in_flight=3, max_batch=10)
    messages = await opened(sub)
    await publish(broker, *[f"m{n}" for n in range(8)])
    first = await take(messages, 3)
    await nothing_more(messages, 0.5)
    for message in first:
        await message.ack()
    rest = await take(messages, 3)
    assert {m.data for m in rest}.isdisjoint({m.data for m in first})
    await sub.close()


async def test_batches_honour_max_batch_and_max_wait(broker: Running) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        requests: asyncio.Queue[broker_pb2.SubscribeRequest | None] = asyncio.Queue()
        init = broker_pb2.SubscribeInit(product="shop", env="dev", event="events:orders", group="batching", max_batch=4)
        init.max_wait.FromMilliseconds(300)
        await requests.put(broker_pb2.SubscribeRequest(init=init))

        async def feed() -> AsyncIterator[broker_pb2.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        call = stub.Subscribe(feed())
        assert (await call.read()).WhichOneof("kind") == "ready"
        await publish(broker, *[f"m{n}" for n in range(6)])
        sizes = []
        for _ in range(2):
            batch = await asyncio.wait_for(call.read(), 10)
            sizes.append(len(batch.batch.messages))
        assert sizes == [4, 2], "full batches of max_batch, the rest after max_wait"
        await publish(broker, "late")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await publish(broker, "later")
        batch = await asyncio.wait_for(call.read(), 10)
        assert len(batch.batch.messages) >= 1 and loop.time() - started < 2
        await requests.put(None)
        call.cancel()


async def test_a_closed_stream_leaves_no_consumer_behind(broker: Running) -> None:
    gone = subscribe(broker, "pair")
    await opened(gone)
    stays = subscribe(broker, "pair")
    stays_messages = await opened(stays)
    await asyncio.sleep(0.2)
    await gone.close()
    await asyncio.sleep(0.3)
    bodies = [f"after{n}" for n in range(10)]
    await publish(broker, *bodies)
    received = await take(stays_messages, 10)
    assert sorted(m.data.decode() for m in received) == sorted(bodies), "nothing went to the closed stream"
    assert all(m.delivery_attempt == 1 for m in received)
    await stays.close()


async def test_one_ordering_key_keeps_publish_order_for_one_consumer(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    bodies = [f"m{n:02d}" for n in range(30)]
    await publish(broker, *bodies, ordering_key="customer-1")
    received = await take(messages, 30)
    assert [m.data.decode() for m in received] == bodies
    assert {m.ordering_key for m in received} == {"customer-1"}
    await sub.close()


async def test_publish_batch_reports_each_entry(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    results = await broker.client.message_broker.publish_batch(
        product="shop",
        env="dev",
        event="events:orders",
        messages=[
            outgoing(b"a"),
            outgoing(b"x" * (2 * 1024 * 1024)),
            outgoing(json=[1, 2]),
            outgoing(b"b", attributes={"bad key": "v"}),
        ],
    )
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].reason == "MESSAGE_TOO_LARGE" and results[3].reason == "INVALID_ARGUMENT"
    received = await take(messages, 2)
    assert sorted(m.id for m in received) == sorted([results[0].message_id, results[2].message_id])
    await sub.close()


async def test_a_batch_that_all_went_out_answers_each_entry_with_the_id_its_subscriber_sees(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    batch = [outgoing(b"%d" % n) for n in range(5)]
    batch.append(outgoing(b"keyed", idempotency_key="k-" + broker.run))  # type: ignore[attr-defined]
    results = await broker.client.message_broker.publish_batch(
        product="shop", env="dev", event="events:orders", messages=batch
    )
    assert all(r.ok and len(r.message_id) == 24 and not r.reason for r in results)
    received = {m.data: m.id for m in await take(messages, len(batch))}
    assert [received[message.data] for message in batch] == [r.message_id for r in results]
    await sub.close()


async def test_publish_batch_names_each_failed_entry_by_its_own_position(broker: Running) -> None:
    await publish(broker, "taken", idempotency_key="batch-k")
    results = await broker.client.message_broker.publish_batch(
        product="shop",
        env="dev",
        event="events:orders",
        messages=[
            broker_pb2.OutgoingMessage(),  # no payload
            outgoing(b"ok-1"),
            outgoing(b"b", attributes={"bad key": "v"}),
            outgoing(b"other", idempotency_key="batch-k"),  # fails after validation: the key was used for another
            outgoing(b"x" * (2 * 1024 * 1024)),
            outgoing(b"c", ordering_key="k" * 300),
            outgoing(b"ok-2"),
        ],
    )
    assert [r.ok for r in results] == [False, True, False, False, False, False, True]
    assert [r.reason for r in results] == [
        "INVALID_ARGUMENT",
        "",
        "INVALID_ARGUMENT",
        "IDEMPOTENCY_KEY_REUSED",
        "MESSAGE_TOO_LARGE",
        "INVALID_ARGUMENT",
        "",
    ]
    # Every validation failure reads `<field of that entry>: <why>`, whatever layer found it.
    assert results[0].message == "messages[0].payload: give data (bytes) or json"
    assert results[2].message.startswith("messages[2].attributes.bad key: ")
    assert results[4].message == "messages[4].data: is 2097152 bytes; the limit is 1048576"
    assert results[5].message == "messages[5].ordering_key: is longer than 256 characters"
    assert "idempotency key" in results[3].message


async def test_a_batch_of_plain_messages_carries_each_payload_and_content_type_and_refuses_one_too_large(
    broker: Running,
) -> None:
    # A batch whose messages are bytes and a content type only goes from the servicer to the adapter as columns:
    # each message still arrives with its own payload, content type (the default where none was given) and the id
    # answered at its position; a message too large is refused at its position and the others are published.
    sub = subscribe(broker)
    messages = await opened(sub)
    kinds = ["application/json", "", "text/plain; charset=utf-8", "t\u00e9xt/\u00fcnicode", "application/json"]
    batch = [outgoing(b"p%d" % n + b"\x00\xff" * n, content_type=kinds[n % len(kinds)]) for n in range(12)]
    batch.append(outgoing(b"L" * 70_000, content_type="application/octet-stream"))
    results = await broker.client.message_broker.publish_batch(
        product="shop", env="dev", event="events:orders", messages=batch
    )
    assert all(r.ok for r in results) and len({r.message_id for r in results}) == len(batch)
    received = {m.id: m for m in await take(messages, len(batch))}
    for sent, result in zip(batch, results, strict=True):
        got = received[result.message_id]
        assert (got.data, got.content_type) == (sent.data, sent.content_type or "application/octet-stream")
        assert (got.attributes, got.ordering_key) == ({}, "")
    too_large = [outgoing(b"a"), outgoing(b"x" * (2 * 1024 * 1024)), outgoing(b"b")]
    results = await broker.client.message_broker.publish_batch(
        product="shop", env="dev", event="events:orders", messages=too_large
    )
    assert [(r.ok, r.reason) for r in results] == [(True, ""), (False, "MESSAGE_TOO_LARGE"), (True, "")]
    assert results[1].message == "messages[1].data: is 2097152 bytes; the limit is 1048576"
    received = {m.id: m.data for m in await take(messages, 2)}
    assert received == {results[0].message_id: b"a", results[2].message_id: b"b"}
    await sub.close()


async def test_an_idempotency_key_publishes_once(broker: Running) -> None:
    sub = subscribe(broker)
    messages = await opened(sub)
    first = await publish(broker, "once", idempotency_key="k-1")
    again = await publish(broker, "once", idempotency_key="k-1")
    assert first == again
    await take(messages, 1)
    await nothing_more(messages)
    with pytest.raises(ProcessorError) as caught:
        await publish(broker, "different", idempotency_key="k-1")
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    await sub.close()


async def test_shutdown_ends_streams_with_unavailable_and_keeps_unacked_messages(
    broker: Running, start_server: ServerFactory
) -> None:
    if broker.kind == "memory":  # type: ignore[attr-defined]
        pytest.skip("the in-process broker keeps nothing across processes")
    sub = subscribe(broker, "drain", reconnect=False)
    messages = await opened(sub)
    await publish(broker, "in-flight")
    [held] = await take(messages, 1)
    stopping = asyncio.ensure_future(broker.app.stop(grace=5))
    with pytest.raises(UnavailableError):
        await take(messages, 1, timeout=10)
    pending_first.pop(id(messages), None)
    await stopping
    other = await start_server(data_dir=broker.app.settings.data_dir)
    again = other.client.message_broker.subscribe(product="shop", env="dev", event="events:orders", group="drain")
    [redelivered] = await take(await opened(again), 1)
    assert redelivered.id == held.id and redelivered.delivery_attempt >= 2
    await redelivered.ack()
    await again.close()


@pytest.mark.parametrize(
    ("init", "reason"),
    [
        ({"event": "events"}, "INVALID_ARGUMENT"),
        ({"event": "nope:orders"}, "BROKER_NOT_FOUND"),
        ({"event": "events:nope"}, "TOPIC_NOT_FOUND"),
        ({"env": "staging"}, "ENV_NOT_FOUND"),
        ({"group": ""}, "INVALID_ARGUMENT"),
        ({"max_in_flight": -1}, "INVALID_ARGUMENT"),
        ({"max_deliveries": 3}, "INVALID_ARGUMENT"),
    ],
)
async def test_bad_subscriptions_are_refused_with_a_reason(broker: Running, init: dict[str, Any], reason: str) -> None:
    fields = {"product": "shop", "env": "dev", "event": "events:orders", "group": "g", **init}
    sub = broker.client.message_broker.subscribe(reconnect=False, **fields)
    iterator = sub.__aiter__()
    with pytest.raises(ProcessorError) as caught:
        await take(iterator, 1, timeout=10)
    pending_first.pop(id(iterator), None)
    assert caught.value.reason == reason


async def test_protocol_errors_on_the_stream(broker: Running) -> None:
    init = broker_pb2.SubscribeRequest(
        init=broker_pb2.SubscribeInit(product="shop", env="dev", event="events:orders", group="proto")
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        call = stub.Subscribe(iter([init, init]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        call = stub.Subscribe(iter([broker_pb2.SubscribeRequest(ack=broker_pb2.Acknowledge(ack_ids=["x"]))]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_unknown_ack_id_is_reported_and_the_stream_goes_on(broker: Running) -> None:
    init = broker_pb2.SubscribeRequest(
        init=broker_pb2.SubscribeInit(product="shop", env="dev", event="events:orders", group="proto")
    )
    requests: asyncio.Queue[broker_pb2.SubscribeRequest | None] = asyncio.Queue()

    async def outgoing_requests() -> AsyncIterator[broker_pb2.SubscribeRequest]:
        while (request := await requests.get()) is not None:
            yield request

    await requests.put(init)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        call = broker_pb2_grpc.BrokerServiceStub(channel).Subscribe(outgoing_requests(), timeout=20)
        assert (await call.read()).HasField("ready")
        await requests.put(broker_pb2.SubscribeRequest(ack=broker_pb2.Acknowledge(ack_ids=["nope", "ff"])))
        notice = await call.read()
        assert list(notice.stale_acks.ack_ids) == ["nope", "ff"] and not notice.stale_acks.expired_ack_ids
        await publish(broker, "still here")
        batch = await call.read()
        [message] = batch.batch.messages
        assert message.data == b"still here"
        ack = broker_pb2.Acknowledge(ack_ids=[message.ack_id])
        await requests.put(broker_pb2.SubscribeRequest(ack=ack))
        await requests.put(broker_pb2.SubscribeRequest(nack=broker_pb2.NegativeAcknowledge(ack_ids=[message.ack_id])))
        notice = await call.read()
        assert list(notice.stale_acks.ack_ids) == [message.ack_id]
        await requests.put(None)
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_bad_publishes_are_refused(broker: Running) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await publish(broker, "x" * (2 * 1024 * 1024))
    assert caught.value.reason == "MESSAGE_TOO_LARGE"
    with pytest.raises(NotFoundError) as missing:
        await publish(broker, "x", event="events:nope")
    assert missing.value.reason == "TOPIC_NOT_FOUND"
    with pytest.raises(InvalidArgumentError):
        await publish(broker, "x", event="no-colon")
    with pytest.raises(InvalidArgumentError) as long_key:
        await publish(broker, "x", idempotency_key="k" * 257)
    assert long_key.value.field_violations[0].field == "message.idempotency_key"
    assert long_key.value.field_violations[0].description == "is longer than 256 characters"


def test_publish_batch_responses_encoded_by_the_servicer_pass_through_and_messages_are_serialized() -> None:
    from ductape_processor.api.broker import PUBLISH_BATCH, BrokerServicer, add_to_server

    class Collected:
        def __init__(self) -> None:
            self.handlers: list[grpc.GenericRpcHandler] = []

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.handlers.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            pass

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method

    server = Collected()
    add_to_server(BrokerServicer(runtime=None), server)  # type: ignore[arg-type]
    [generic] = server.handlers
    batch = generic.service(Details(PUBLISH_BATCH))
    assert batch is not None and batch.response_serializer is not None
    response = broker_pb2.PublishBatchResponse(results=[broker_pb2.PublishResult(message_id="a" * 24)])
    assert batch.response_serializer(response.SerializeToString()) == response.SerializeToString()  # as it is
    assert batch.response_serializer(response) == response.SerializeToString()  # a batch with refused entries
    single = generic.service(Details(PUBLISH_BATCH.replace("PublishBatch", "Publish")))
    assert single is not None and single.response_serializer is not None
    with pytest.raises(TypeError):  # the generated serializer, which wants a message
        single.response_serializer(b"")


@pytest.mark.parametrize(
    "ids",
    [
        ["a" * 24, "b" * 24, "c" * 24],  # the runtime's ids: passed through as one join
        ["a" * 23, "b" * 25],  # lengths that add up to two ids' worth: must not be framed by the fixed heads
        ["é" * 24],  # not ASCII: more bytes than characters
        ["a" * 24, ""],
    ],
)
def test_publish_batch_response_holds_exactly_the_ids_given_whatever_their_lengths(ids: list[str]) -> None:
    from ductape_processor.api.broker import _published, serialized

    wire = serialized(_published(ids))
    assert [result.message_id for result in broker_pb2.PublishBatchResponse.FromString(wire).results] == ids


def test_a_batch_is_passed_on_as_columns_only_when_nothing_but_payloads_and_content_types_is_set() -> None:
    # PublishBatch tells a plain batch from the request's size instead of reading each message's other fields; it
    # must never take a batch with anything else set for a plain one (that message's attributes, ordering key,
    # idempotency key or an unknown field would be lost), and should take a plain one whose lengths share their
    # varint sizes. Checked against the fields themselves, across the varint boundaries of each length.
    from google.protobuf.unknown_fields import UnknownFieldSet

    from ductape_processor.api.broker import _only_columns

    def read(request: broker_pb2.PublishBatchRequest) -> tuple[list[bytes], list[str], int]:
        return [m.data for m in request.messages], [m.content_type for m in request.messages], request.ByteSize()

    def plain(request: broker_pb2.PublishBatchRequest) -> bool:
        return all(
            m.WhichOneof("payload") == "data"
            and m.data
            and not m.attributes
            and not m.ordering_key
            and not m.idempotency_key
            and not len(UnknownFieldSet(m))
            for m in request.messages
        ) and not len(UnknownFieldSet(request))

    def batch(*messages: broker_pb2.OutgoingMessage, event: str = "events:orders") -> broker_pb2.PublishBatchRequest:
        return broker_pb2.PublishBatchRequest(product="shop", env="d\u00e9v", event=event, messages=messages)

    taken = []
    for size in (1, 127, 128, 16383, 16384, 70_000):
        for kind in ("", "a", "x" * 127, "x" * 128):
            for count in (1, 3):
                taken.append(batch(*[outgoing(b"p" * size, content_type=kind) for _ in range(count)]))
    taken.append(batch(*[outgoing(b"p" * n, content_type="t/" + "x" * n) for n in range(1, 60)], event="e" * 200))
    refused = [
        batch(outgoing(b"a"), outgoing(b"b", attributes={"k": "v"})),
        batch(outgoing(b"a", ordering_key="o")),
        batch(outgoing(b"a"), outgoing(b"b", idempotency_key="k")),
        batch(outgoing(b"a"), outgoing(json={"a": 1})),
        batch(outgoing(b"a"), outgoing(b"")),  # data set, empty
        batch(outgoing(b"a"), broker_pb2.OutgoingMessage()),
        batch(outgoing(b"a", content_type="t\u00e9xt/plain")),  # not ASCII: read the whole way
        batch(outgoing(b"a" * 127), outgoing(b"b" * 128)),  # lengths of two varint sizes
        batch(outgoing(b"a", content_type="t"), outgoing(b"b")),  # a content type and none
    ]
    # An unknown field (a newer client's) in a message and in the request, each adding as few bytes as possible.
    unknown = batch(outgoing(b"a"))
    unknown.messages[0].MergeFromString(b"\x38\x00")  # field 7, varint 0
    refused.append(unknown)
    refused.append(broker_pb2.PublishBatchRequest.FromString(batch(outgoing(b"a")).SerializeToString() + b"\x28\x00"))
    # As received, the size is that of the client's encoding: one longer than the shortest (an overlong length, a
    # field written twice, the last one kept) is read the whole way too.
    target = batch().SerializeToString()
    for encoded in (b"\x0a\x81\x00a", b"\x0a\x01b\x0a\x01a", b"\x1a\x00\x0a\x01a"):
        raw = target + b"\x22" + bytes([len(encoded)]) + encoded
        request = broker_pb2.PublishBatchRequest.FromString(raw)
        assert plain(request) and [m.data for m in request.messages] == [b"a"]
        assert not _only_columns(request, *read(request)[:2], len(raw))
        assert _only_columns(request, *read(request))  # as upb encodes it
    for request in taken:
        assert plain(request) and _only_columns(request, *read(request)), request.messages[0].content_type
    for request in refused:
        assert not _only_columns(request, *read(request)), request
    assert not any(plain(request) for request in refused[:6]) and plain(refused[6]) and plain(refused[7])
