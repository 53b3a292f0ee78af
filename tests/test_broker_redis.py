"""The Redis Streams adapter against the local Redis server: connection drops, durability across a restart,
exact delivery attempts, abandoned consumers, housekeeping and the CloudEvents field mapping.

Needs Redis at 127.0.0.1:6379 (skipped without it; under CI=true a missing server fails the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from ductape.processor.brokers import Message

from ductape_processor.adapters.brokers import redis as redis_broker
from ductape_processor.adapters.brokers.base import BrokerSubscription, BrokerUnavailable, SubscribeOptions
from ductape_processor.adapters.brokers.redis import PARK_CONSUMER, RedisBroker, stream_key
from ductape_processor.adapters.brokers.redis_entries import xack, xadd, xadd_plain
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent, PlainEvents
from ductape_processor.runtime.brokers.subscriptions import Limits, Subscription
from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import manifest, opened, pending_first, publish, subscribe, take

URL = "redis://127.0.0.1:6379/0"


CREATED: list[str] = []  # streams the running test created; deleted after it


@pytest.fixture(autouse=True)
async def _forget_pending_reads() -> AsyncIterator[None]:
    yield
    for future in pending_first.values():
        future.cancel()
        with contextlib.suppress(BaseException):
            await future
    pending_first.clear()


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A separate client: inspects streams, kills the adapter's connections, deletes the test's streams."""
    await require_tcp("Redis", "127.0.0.1", 6379)
    client = aioredis.Redis.from_url(URL)
    yield client
    if CREATED:
        await client.delete(*CREATED)
        CREATED.clear()
    await client.aclose()


@pytest.fixture
async def adapter(admin: aioredis.Redis) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(URL, "test/redis")
    yield broker
    await broker.close()


def topic() -> str:
    name = f"t.{secrets.token_hex(4)}"
    CREATED.append(stream_key(name))
    return name


def message(body: bytes, **fields: Any) -> OutgoingEvent:
    return OutgoingEvent(
        id=secrets.token_hex(12),
        source="/ductape/shop/dev/events",
        type="orders",
        time=datetime.now(UTC),
        data=body,
        content_type="application/octet-stream",
        **fields,
    )


async def started(start_server: ServerFactory, admin: aioredis.Redis, **settings: Any) -> Running:
    running = await start_server(**settings)
    run = secrets.token_hex(4)
    running.run = run  # type: ignore[attr-defined]
    CREATED.extend(stream_key(f"{name}.{run}") for name in ("orders", "dead", "other"))
    await running.client.product.apply(manifest("redis", run))
    return running


async def kill_adapter_connections(admin: aioredis.Redis) -> int:
    """CLIENT KILL every connection of the processors' Redis broker adapters (by id, so nothing else is hit)."""
    killed = 0
    for client in await admin.client_list():
        if client.get("name") == "ductape:shop/dev/events":
            killed += await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
    return killed


# -- through the server ---------------------------------------------------------------------------------------------


async def test_a_subscriber_survives_killed_connections_with_nothing_lost(
    start_server: ServerFactory, admin: aioredis.Redis
) -> None:
    running = await started(start_server, admin)
    sub = subscribe(running, "survivor", ack_deadline=2.0, max_in_flight=50)
    messages = await opened(sub)
    received: list[str] = []

    async def consume() -> None:
        while True:
            [got] = await take(messages, 1, timeout=30)
            received.append(got.data.decode())
            await got.ack()

    consumer = asyncio.ensure_future(consume())
    sent: list[str] = []
    kills = 0
    try:
        for n in range(120):
            await publish(running, f"m{n:03d}")
            sent.append(f"m{n:03d}")
            if n % 30 == 15:  # mid-stream, while the subscriber is blocked reading
                kills += await kill_adapter_connections(admin)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(12):
            while not set(sent) <= set(received):
                await asyncio.sleep(0.05)
    finally:
        consumer.cancel()
        with contextlib.suppress(BaseException):
            await consumer
        pending_first.pop(id(messages), None)
    duplicates = sum(count - 1 for count in Counter(received).values())
    assert kills >= 4, "the adapter's connections (publisher and blocked reader) were killed"
    assert set(received) == set(sent) and len(sent) == 120
    assert duplicates <= 10, f"{duplicates} duplicates"
    await sub.close()


async def test_a_group_keeps_collecting_while_nobody_listens_and_across_a_restart(
    start_server: ServerFactory, admin: aioredis.Redis
) -> None:
    first = await started(start_server, admin)
    sub = subscribe(first, "durable", reconnect=False)
    messages = await opened(sub)  # the group exists from here on
    await publish(first, "before")
    [before] = await take(messages, 1)
    await before.ack()
    await publish(first, "held")
    [held] = await take(messages, 1)  # not acked: the shutdown gives it back
    await sub.close()
    pending_first.pop(id(messages), None)
    offline = [f"offline{n}" for n in range(10)]
    await publish(first, *offline[:5])  # no subscriber connected
    await first.app.stop(grace=1)

    second = await start_server(data_dir=first.app.settings.data_dir)  # same store, same Redis
    second.run = first.run  # type: ignore[attr-defined]
    await publish(second, *offline[5:])
    again = second.client.message_broker.subscribe(product="shop", env="dev", event="events:orders", group="durable")
    got: list[Message] = await take(await opened(again), 11)
    assert sorted(m.data.decode() for m in got) == sorted([*offline, "held"]), "every publish, none twice"
    [redelivered] = [m for m in got if m.data == b"held"]
    assert redelivered.id == held.id and redelivered.delivery_attempt == 2
    assert all(m.delivery_attempt == 1 for m in got if m is not redelivered)
    for m in got:
        await m.ack()
    key = stream_key(f"orders.{first.run}")  # type: ignore[attr-defined]
    async with asyncio.timeout(5):  # acks travel on the stream; wait until the server applied them
        while (await admin.xpending(key, "durable"))["pending"]:
            await asyncio.sleep(0.05)
    consumers = {c["name"].decode() for c in await admin.xinfo_consumers(key, "durable")} - {PARK_CONSUMER}
    assert len(consumers) == 1, f"only the second processor's consumer is there, not the first's: {consumers}"
    await again.close()
    await asyncio.sleep(0.2)
    assert {c["name"].decode() for c in await admin.xinfo_consumers(key, "durable")} <= {PARK_CONSUMER}


# -- the adapter itself ---------------------------------------------------------------------------------------------


async def test_cloudevents_fields_round_trip_binary_data_and_colliding_attribute_names(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    sent = message(
        bytes(range(256)),
        attributes={"id": "mine", "data": "x", "type": "t", "attr-x": "y"},
        ordering_key="customer-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    broker_id = await adapter.publish(name, sent)
    [got] = await sub.fetch(10, 2)
    assert got.handle.startswith(broker_id) and got.id == sent.id and got.data == sent.data
    assert (got.source, got.type, got.time, got.content_type) == (sent.source, sent.type, sent.time, sent.content_type)
    assert got.attributes == dict(sent.attributes)
    assert (got.ordering_key, got.traceparent, got.delivery_attempt) == (sent.ordering_key, sent.traceparent, 1)
    [(_, fields)] = await admin.xrange(stream_key(name))
    assert fields[b"specversion"] == b"1.0" and fields[b"attr-id"] == b"mine" and fields[b"id"] == sent.id.encode()
    await sub.ack([got.handle])
    await sub.close()


async def test_payloads_and_ids_of_any_length_are_written_whole(adapter: RedisBroker, admin: aioredis.Redis) -> None:
    # The XADD encoder picks the length heads of short values from a table and formats the others: both sides of
    # its edge, an empty payload, a large one, and a long id (a dead letter keeps another producer's id).
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))  # kept: it has a group
    sizes = [0, 1, 1023, 1024, 70_000]
    sent = [message(bytes([n % 251]) * n) for n in sizes]
    sent.append(message(b"long id"))
    sent[-1].id = "i" * 1500
    for item in sent[1:]:
        item.time = sent[0].time
    assert await adapter.publish_batch(name, sent) == {}, "no failures"
    raw = await admin.xrange(stream_key(name))
    assert [(fields[b"id"].decode(), fields[b"data"]) for _, fields in raw] == [(m.id, m.data) for m in sent]
    await sub.close()


async def test_a_batch_is_written_with_the_documented_fields_and_entries_of_any_shape_are_read(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    plain, other_type = message(b"plain"), message(b"other")
    plain.content_type, other_type.content_type, other_type.type = "application/json", "text/plain\u00e9", "orders.v2"
    extras = message(
        b'{"a":1}',
        attributes={"k": "v\u00fc"},
        ordering_key="o",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="x=1",
        json_payload=True,
    )
    other_type.time = extras.time = plain.time  # as the messages of one publish
    assert await adapter.publish_batch(name, [plain, other_type, extras]) == {}, "no failures"
    stamp = plain.time.isoformat().encode()

    def head(sent: OutgoingEvent, content_type: bytes) -> list[bytes]:
        fields = [b"specversion", b"1.0", b"id", sent.id.encode(), b"source", sent.source.encode(), b"type"]
        return [*fields, sent.type.encode(), b"time", stamp, b"datacontenttype", content_type]

    extra_fields = [b"orderingkey", b"o", b"traceparent", extras.traceparent.encode(), b"tracestate", b"x=1"]
    extra_fields += [b"ductapepayload", b"json", b"attr-k", "v\u00fc".encode()]
    expected = [
        [*head(plain, b"application/json"), b"data", b"plain"],
        [*head(other_type, "text/plain\u00e9".encode()), b"data", b"other"],
        [*head(extras, b"application/octet-stream"), *extra_fields, b"data", b'{"a":1}'],
    ]
    raw = await admin.xrange(stream_key(name))
    assert [[part for pair in fields.items() for part in pair] for _, fields in raw] == expected  # in their order
    # Another producer's entries: only a payload; the fields in another order, an empty id and an unreadable time.
    foreign_id = await admin.xadd(stream_key(name), {"data": b"bare"})
    shuffled_id = await admin.xadd(
        stream_key(name),
        {"type": "t", "data": b"x", "id": "", "time": "yesterday", "source": "s", "specversion": "1.0"},
    )
    got = await sub.fetch(10, 2)
    assert [m.data for m in got] == [b"plain", b"other", b'{"a":1}', b"bare", b"x"]
    for sent, received in zip([plain, other_type, extras], got, strict=False):
        assert (received.id, received.source, received.type, received.time) == (
            sent.id,
            sent.source,
            sent.type,
            sent.time,
        )
        assert (received.content_type, received.attributes, received.json_payload) == (
            sent.content_type,
            dict(sent.attributes),
            sent.json_payload,
        )
        assert (received.ordering_key, received.traceparent, received.tracestate) == (
            sent.ordering_key,
            sent.traceparent,
            sent.tracestate,
        )
    # Every field of a plain entry's message is set, as the dataclass's own `__init__` sets them (the reader sets
    # them in place).
    assert got[0] == IncomingEvent(
        plain.id, plain.source, plain.type, plain.time, b"plain", "application/json", got[0].handle, {}, "", "", 1
    )
    foreign, shuffled = got[3], got[4]
    assert (foreign.id, foreign.source, foreign.type) == (foreign_id.decode(), "", name)
    assert (foreign.content_type, foreign.attributes) == ("application/octet-stream", {})
    assert foreign.time == datetime.fromtimestamp(int(foreign_id.split(b"-")[0]) / 1000, UTC)
    assert (shuffled.id, shuffled.source, shuffled.type) == (shuffled_id.decode(), "s", "t")
    assert shuffled.time == datetime.fromtimestamp(int(shuffled_id.split(b"-")[0]) / 1000, UTC)
    await sub.ack([m.handle for m in got])
    await sub.close()


async def test_a_plain_entry_s_id_that_is_not_utf8_is_read_with_replacement_characters(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    # A plain entry's id is decoded strictly first and with replacement characters only when that fails: both ways
    # give what `decode("utf-8", "replace")` gives, and an empty id is the entry id, as for any other entry.
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    sent = message(b"x")
    ids = [b"\xffnot utf-8\xc3", "caf\u00e9 \U0001f600".encode(), b"plain", b""]
    stored = []
    for raw_id in ids:
        fields = {"specversion": "1.0", "id": raw_id, "source": sent.source, "type": sent.type}
        fields |= {"time": sent.time.isoformat(), "datacontenttype": "text/plain", "data": raw_id}
        stored.append(await admin.xadd(stream_key(name), fields))  # type: ignore[arg-type]
    got = await sub.fetch(10, 2)
    expected = [raw.decode("utf-8", "replace") or entry.decode() for raw, entry in zip(ids, stored, strict=True)]
    assert [m.id for m in got] == expected
    assert expected[0] == "\ufffdnot utf-8\ufffd" and expected[1] == "caf\u00e9 \U0001f600"
    assert [(m.data, m.source, m.type, m.time, m.content_type) for m in got] == [
        (raw_id, sent.source, sent.type, sent.time, "text/plain") for raw_id in ids
    ]
    assert all(m.attributes == {} for m in got)
    await sub.ack([m.handle for m in got])
    await sub.close()


async def test_delivery_attempts_count_every_redelivery_and_delays_hold(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    name = topic()
    options = SubscribeOptions(prefetch=10, ack_deadline_s=5)
    one, two = await adapter.subscribe(name, "g", options), await adapter.subscribe(name, "g", options)
    await adapter.publish(name, message(b"x"))
    [first] = await one.fetch(1, 2)
    await one.nack([first.handle])
    [second] = await two.fetch(1, 2)  # any consumer of the group
    assert (second.id, second.delivery_attempt) == (first.id, 2)
    await two.nack([second.handle], delay_s=0.6)
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    assert await one.fetch(1, 0.3) == []
    third = await one.fetch(1, 2)
    assert [m.delivery_attempt for m in third] == [3] and loop.time() - started_at >= 0.55
    await one.nack([first.handle])  # a stale handle (an earlier delivery) is ignored
    await one.ack([third[0].handle])
    assert await two.fetch(1, 0.3) == []
    summary = await admin.xpending(stream_key(name), "g")
    assert summary["pending"] == 0
    await one.close()
    await two.close()


async def test_a_delivery_claimed_again_by_its_own_consumer_is_settled_by_its_new_handle_only(
    adapter: RedisBroker, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "GRACE_MS", 0)
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=0.1))
    await adapter.publish(name, message(b"x"))
    [first] = await sub.fetch(1, 2)
    await asyncio.sleep(0.3)  # past its deadline (0.1 s, no grace here): the consumer's next look claims it again
    [again] = await sub.fetch(1, 2)
    assert (again.id, again.delivery_attempt) == (first.id, 2) and again.handle != first.handle
    calls = adapter.call

    async def refused(what: str, op: Any, budget_s: float | None = None) -> Any:
        raise BrokerUnavailable("Redis refused acknowledging (XACK)")

    monkeypatch.setattr(adapter, "call", refused)
    with pytest.raises(BrokerUnavailable):
        await sub.ack([first.handle, again.handle])  # failed: the current delivery stays held, under its handle
    monkeypatch.setattr(adapter, "call", calls)
    await sub.ack([first.handle])  # the earlier delivery's handle settles nothing
    assert (await admin.xpending(stream_key(name), "g"))["pending"] == 1
    await sub.ack([again.handle])
    assert (await admin.xpending(stream_key(name), "g"))["pending"] == 0
    await sub.close()


async def test_an_ack_that_fails_leaves_its_messages_held_to_ack_again(
    adapter: RedisBroker, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    await adapter.publish_batch(name, [message(b"a"), message(b"b")])
    got = await sub.fetch(2, 2)
    assert len(got) == 2
    calls = adapter.call

    async def refused(what: str, op: Any, budget_s: float | None = None) -> Any:
        raise BrokerUnavailable("Redis refused acknowledging (XACK)")

    monkeypatch.setattr(adapter, "call", refused)
    with pytest.raises(BrokerUnavailable):
        await sub.ack([m.handle for m in got])
    monkeypatch.setattr(adapter, "call", calls)
    assert (await admin.xpending(stream_key(name), "g"))["pending"] == 2
    await sub.ack([m.handle for m in got])  # still held: acked now
    assert (await admin.xpending(stream_key(name), "g"))["pending"] == 0
    await sub.close()


class CountedFetches(BrokerSubscription):
    """A subscription that counts the fetches the engine makes of it."""

    def __init__(self, inner: BrokerSubscription) -> None:
        self.inner = inner
        self.fetches = 0

    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        self.fetches += 1
        return await self.inner.fetch(max_messages, timeout_s)

    async def ack(self, handles: list[str]) -> None:
        await self.inner.ack(handles)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        await self.inner.nack(handles, delay_s)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_batch_that_trickles_in_is_taken_in_two_fetches(adapter: RedisBroker) -> None:
    # Each fetch is a script and a read: the first waits for a message, the second takes what came during max_wait.
    name = topic()
    counted = CountedFetches(await adapter.subscribe(name, "g", SubscribeOptions(prefetch=100, ack_deadline_s=5)))
    engine = Subscription(counted, Limits.checked(max_batch=100, max_wait_s=0.5), None)

    async def trickle() -> None:
        for n in range(10):
            await adapter.publish(name, message(f"m{n}".encode()))
            await asyncio.sleep(0.01)

    publishing = asyncio.ensure_future(trickle())
    batch = await engine.next_batch()
    await publishing
    assert counted.fetches == 2
    assert len(batch) > 1, "the messages that came while the batch filled"
    await engine.close()


async def test_overlapping_next_batch_calls_fetch_in_turn_in_order_within_credit(adapter: RedisBroker) -> None:
    # The Subscribe stream asks for the next batch before it took the one before: the calls fetch one after the
    # other, in the order made, each within the credit the batches before it left.
    name = topic()
    counted = CountedFetches(await adapter.subscribe(name, "g", SubscribeOptions(prefetch=100, ack_deadline_s=5)))
    engine = Subscription(counted, Limits.checked(max_in_flight=150, max_batch=100, max_wait_s=0.05), None)
    assert await adapter.publish_batch(name, [message(b"%d" % n) for n in range(300)]) == {}
    calls = [asyncio.ensure_future(engine.next_batch()) for _ in range(3)]
    first, second = await asyncio.wait_for(asyncio.gather(*calls[:2]), 10)
    assert [m.data for m in first + second] == [b"%d" % n for n in range(150)]
    assert engine.in_flight == 150
    await asyncio.sleep(0.2)
    assert not calls[2].done(), "no credit left: the third call waits for an ack"
    await engine.ack([m.handle for m in first])
    third = await asyncio.wait_for(calls[2], 10)
    assert [m.data for m in third] == [b"%d" % n for n in range(150, 250)]
    assert counted.fetches == 3
    await engine.close()


async def test_a_read_is_the_xreadgroup_hiredis_packs_kept_for_each_count_and_block(adapter: RedisBroker) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "gr\u00f6up", SubscribeOptions(prefetch=100, ack_deadline_s=5))
    assert isinstance(sub, redis_broker.RedisSubscription)
    for count, block_ms in [(100, 500), (99, None), (100, 500), (1, 0)]:
        block = () if block_ms is None else (b"BLOCK", block_ms)
        head = (b"XREADGROUP", b"GROUP", "gr\u00f6up", sub.consumer, b"COUNT", count)
        expected = hiredis.pack_command((*head, *block, b"STREAMS", stream_key(name), b">"))
        assert sub._read_command(count, block_ms) == expected
    assert len(sub._read_commands) == 3
    for count in range(redis_broker.READ_COMMANDS_KEPT + 1):
        sub._read_command(count, None)
    assert len(sub._read_commands) <= redis_broker.READ_COMMANDS_KEPT, "bounded"
    await sub.close()


def test_an_xack_is_the_command_hiredis_packs_with_its_entry_ids_in_their_order() -> None:
    # Runs of ids of one length are joined in one step each: ids whose lengths change back and forth, the shortest
    # and the longest a stream id can be, one longer than any (past the table of heads), and a single id.
    ids = [b"1733355555555-%d" % n for n in (5, 10, 7, 100, 11, 9)] + [b"1733355555556-0", b"17333555555560-3"]
    ids += [b"0-1", b"18446744073709551615-18446744073709551615", b"9" * 60, b"1-1"]
    expected = hiredis.pack_command((b"XACK", "k\u00e9y", "gr\u00f6up", *ids))
    assert xack("k\u00e9y", "gr\u00f6up", ids) == expected
    assert xack("k", "g", ids[:1]) == hiredis.pack_command((b"XACK", "k", "g", ids[0]))


async def test_a_batch_publish_that_wakes_a_blocked_read_fills_a_batch_at_once(adapter: RedisBroker) -> None:
    # The first XADD of a batch wakes the blocked XREADGROUP, which takes that entry alone: the fetch reads the rest
    # at once (one more read, not blocking), so a batch that fills is not held max_wait for messages already stored.
    name = topic()
    counted = CountedFetches(await adapter.subscribe(name, "g", SubscribeOptions(prefetch=20, ack_deadline_s=5)))
    engine = Subscription(counted, Limits.checked(max_batch=20, max_wait_s=5), None)
    fetching = asyncio.ensure_future(engine.next_batch())
    await asyncio.sleep(0.2)  # the read is blocked by now
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await adapter.publish_batch(name, [message(b"%d" % n) for n in range(30)]) == {}
    batch = await asyncio.wait_for(fetching, 10)
    assert [m.data for m in batch] == [b"%d" % n for n in range(20)]
    assert loop.time() - started < 2.5, "not held max_wait"
    assert counted.fetches == 1
    await engine.close()


async def test_a_failed_read_for_the_rest_of_a_batch_hands_out_what_the_woken_read_took(
    adapter: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=20, ack_deadline_s=5))
    assert isinstance(sub, redis_broker.RedisSubscription)
    real = sub._read

    async def read(count: int, block_ms: int | None) -> list[Any]:
        if block_ms is None:  # the read for the rest, once the blocked one was woken
            raise BrokerUnavailable("Redis is unreachable (reading messages (XREADGROUP) failed 3 time(s))")
        return await real(count, block_ms)

    monkeypatch.setattr(sub, "_read", read)
    fetching = asyncio.ensure_future(sub.fetch(20, 2))
    await asyncio.sleep(0.2)  # the read is blocked by now
    assert await adapter.publish_batch(name, [message(b"%d" % n) for n in range(5)]) == {}
    got = await asyncio.wait_for(fetching, 5)
    assert [m.data for m in got] == [b"0"], "handed out, not lost with the failure"
    await sub.ack([m.handle for m in got])
    await sub.close()


async def test_close_hands_back_what_it_took_and_deletes_its_consumer(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    name = topic()
    options = SubscribeOptions(prefetch=10, ack_deadline_s=5)
    leaving = await adapter.subscribe(name, "g", options)
    for n in range(3):
        await adapter.publish(name, message(b"%d" % n))
    held = await leaving.fetch(2, 2)
    # A read whose result never reached the engine (a cancelled fetch): taken in Redis, not handed out.
    lost = await admin.xreadgroup("g", leaving.consumer, {stream_key(name): ">"}, count=1)
    assert lost
    await leaving.close()
    consumers = [c["name"].decode() for c in await admin.xinfo_consumers(stream_key(name), "g")]
    assert leaving.consumer not in consumers
    assert await leaving.fetch(5, 0.1) == [], "a closed subscription takes nothing"
    staying = await adapter.subscribe(name, "g", options)
    again = await staying.fetch(5, 2)
    attempts = {m.data: m.delivery_attempt for m in again}
    assert attempts == {held[0].data: 2, held[1].data: 2, b"2": 1}, "the never-delivered one keeps attempt 1"
    await staying.ack([m.handle for m in again])
    await staying.close()


async def test_messages_of_a_crashed_consumer_come_back_after_its_deadline(
    adapter: RedisBroker, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "GRACE_MS", 200)
    name = topic()
    crashed = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=1, ack_deadline_s=0.3))
    patient = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=1, ack_deadline_s=30))
    await adapter.publish(name, message(b"orphan"))
    [taken] = await crashed.fetch(1, 2)  # ...and the process dies: no nack, no close
    assert await patient.fetch(1, 0.2) == [], "not before the owner's ack deadline + grace"
    [back] = await patient.fetch(1, 2)
    assert (back.id, back.delivery_attempt) == (taken.id, 2)
    # The patient one's long deadline protects what it holds from consumers with short deadlines.
    await asyncio.sleep(0.6)
    assert await crashed.fetch(1, 0.2) == []
    await patient.ack([back.handle])
    await patient.close()


async def test_housekeeping_trims_what_every_group_has_done_with(adapter: RedisBroker, admin: aioredis.Redis) -> None:
    name = topic()
    key = stream_key(name)
    options = SubscribeOptions(prefetch=500, ack_deadline_s=5)
    fast, slow = await adapter.subscribe(name, "fast", options), await adapter.subscribe(name, "slow", options)
    assert await adapter.publish_batch(name, [message(b"%d" % n) for n in range(450)]) == {}, "no failures"
    done = []
    while len(done) < 450:
        done += await fast.fetch(450, 1)
    await fast.ack([m.handle for m in done])
    adapter._maintained.clear()
    await fast.fetch(1, 0.05)
    assert await admin.xlen(key) == 450, "the slow group has not read anything yet"
    slow_done = []
    while len(slow_done) < 300:
        slow_done += await slow.fetch(300 - len(slow_done), 1)
    await slow.ack([m.handle for m in slow_done])
    adapter._maintained.clear()
    await slow.fetch(1, 0.05)  # takes one more, pending: it and everything after must stay
    left = await admin.xlen(key)
    assert 150 <= left < 450
    remaining = [m.data for m in await slow.fetch(500, 1)]
    assert len(remaining) == 149 and b"449" in remaining
    await fast.close()
    await slow.close()
    unheard = topic()  # no group: nobody can ever receive these (a group starts at the end)
    await adapter.publish_batch(unheard, [message(b"%d" % n) for n in range(450)])
    assert await admin.xlen(stream_key(unheard)) < 450


async def test_an_unreachable_server_is_broker_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_broker, "RETRY_BUDGET_S", 0.3)
    broker = RedisBroker("redis://127.0.0.1:1/0", "test/unreachable")
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await broker.publish("t", message(b"x"))
        assert caught.value.reason == "BROKER_UNAVAILABLE" and "unreachable" in caught.value.message
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("t", "g", SubscribeOptions(prefetch=1, ack_deadline_s=1))
    finally:
        await broker.close()
    with pytest.raises(BrokerUnavailable):
        await broker.publish("t", message(b"x"))


async def test_concurrent_publishes_share_one_connection_and_each_gets_its_own_id(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    # Replies are matched to callers by order on the shared connection: a caller that gave up (cancelled) must not
    # shift the replies of the others.
    name = topic()
    await adapter.ensure_group(stream_key(name), "g")  # a stream without a group is trimmed to nothing
    sent = [message(b"m%03d" % n) for n in range(200)]
    tasks = [asyncio.ensure_future(adapter.publish(name, m)) for m in sent]
    await asyncio.sleep(0)
    for task in tasks[::3]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    kept = {m.id: task.result() for m, task in zip(sent, tasks, strict=True) if not task.cancelled()}
    kept[sent[0].id] = await adapter.publish(name, sent[0])  # the connection is still in step
    stored = {fields[b"id"].decode(): entry_id.decode() for entry_id, fields in await admin.xrange(stream_key(name))}
    assert all(stored[message_id] == entry_id for message_id, entry_id in kept.items() if message_id != sent[0].id)
    assert kept[sent[0].id] in stored.values()
    names = [client.get("name") for client in await admin.client_list()]
    assert names.count(adapter.client_name) == 1, "every publish went over the one shared connection"


async def test_a_cancelled_blocking_fetch_takes_nothing_afterwards(adapter: RedisBroker, admin: aioredis.Redis) -> None:
    name = topic()
    options = SubscribeOptions(prefetch=10, ack_deadline_s=30)
    waiting = await adapter.subscribe(name, "g", options)
    fetching = asyncio.ensure_future(waiting.fetch(10, 5))
    await asyncio.sleep(0.2)  # blocked in XREADGROUP
    fetching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await fetching
    await adapter.publish(name, message(b"later"))
    await asyncio.sleep(0.3)
    assert (await admin.xpending(stream_key(name), "g"))["pending"] == 0, "the cancelled read took nothing"
    other = await adapter.subscribe(name, "g", options)
    [got] = await other.fetch(10, 2)
    assert (got.data, got.delivery_attempt) == (b"later", 1)
    await other.ack([got.handle])
    await other.close()
    await waiting.close()


def test_a_batch_is_encoded_as_its_messages_one_by_one_whatever_they_share() -> None:
    # A batch's encoding shares the pieces of consecutive messages with the same source, type, time and content type;
    # this pins that it is still each message's own XADD when those change in the middle, when equal values are
    # other objects, and when a message with optional fields (or an empty attributes dict) comes between plain ones.
    def event(data: bytes, content_type: str, **fields: Any) -> OutgoingEvent:
        sent = message(data)
        sent.content_type = content_type
        for name, value in fields.items():
            setattr(sent, name, value)
        return sent

    first = event(b"a", "application/json")
    later = datetime.fromtimestamp(first.time.timestamp() + 1, UTC)
    batch = [
        first,
        event(b"b" * 1500, "application/" + "json".lower(), time=first.time),
        event(b"", "application/json", time=first.time, attributes={}),
        event(b"c", "application/json", time=first.time, ordering_key="o", json_payload=True),
        event(b"d", "application/json", time=later),
        event(b"e", "text/plain", time=later, attributes={"k": "v"}),
        event(b"f", "text/plain", time=first.time),
        event(b"g", "text/plain", time=first.time, source="/elsewhere"),
    ]
    assert xadd("k", batch) == b"".join(xadd("k", [one]) for one in batch)
    assert xadd("k", []) == b""


def test_plain_columns_are_encoded_as_their_events_and_as_hiredis_packs_each_xadd() -> None:
    # `publish_plain` writes the columns without making the events: the bytes must be those of `xadd` of the same
    # events and those of hiredis' `pack_command` of each XADD with the documented fields in their order, for
    # payloads empty, short, at the length table's edge and large, ids of any length, many distinct or
    # non-ASCII content types, and with and without trace context.
    moment = datetime(2026, 12, 5, 21, 30, 1, 234567, UTC)
    sizes = [0, 1, 127, 1023, 1024, 20_000, 70_000, 5]
    data = [bytes([n % 251]) * n for n in sizes] + [b"\r\n$3\r\n*\r\n", "\u00e9\u4e2d".encode()]
    kinds = ["application/json", "text/plain", "t\u00e9xt/\u00fc", "application/json", "a" * 300]
    content_types = [kinds[n % len(kinds)] for n in range(len(data))]
    ids = [secrets.token_hex(12) for _ in data]
    ids[3], ids[4] = "i" * 1500, "x"
    trace = [("", ""), ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", ""), ("00-ab-cd-01", "k=v,\u00e9=1")]
    # Columns of every shape: one message; mixed lengths and content types; all of one length (short, and past the
    # table's edge) with one content type (each its own string, as a request gives them).
    shapes = [(ids[:count], data[:count], content_types[:count]) for count in (1, 2, len(data))]
    same = [secrets.token_hex(12) for _ in range(5)]
    for size in (3, 2000):
        shapes.append(
            (same, [bytes([n]) * size for n in range(5)], ["application/" + "json"[:n] + "json"[n:] for n in range(5)])
        )
    for traceparent, tracestate in trace:
        for shape_ids, shape_data, shape_content_types in shapes:
            events = PlainEvents(
                shape_ids, "/ductape/shop/dev/\u00e9v", "orders", moment, shape_data, shape_content_types,
                traceparent, tracestate,
            )  # fmt: skip
            encoded = xadd_plain("ductape:topic:t\u00e9", events)
            assert encoded == xadd("ductape:topic:t\u00e9", events.events())
            packed = []
            for event in events.events():
                fields = [b"specversion", b"1.0", b"id", event.id, b"source", event.source, b"type", event.type]
                fields += [b"time", moment.isoformat(), b"datacontenttype", event.content_type]
                fields += [b"traceparent", traceparent] if traceparent else []
                fields += [b"tracestate", tracestate] if tracestate else []
                packed.append(
                    hiredis.pack_command((b"XADD", "ductape:topic:t\u00e9", b"*", *fields, b"data", event.data))
                )
            assert encoded == b"".join(packed)
    assert xadd_plain("k", PlainEvents([], "s", "t", moment, [], [], "", "")) == b""


async def test_plain_columns_are_stored_as_the_same_events_published_as_a_batch(
    adapter: RedisBroker, admin: aioredis.Redis
) -> None:
    name = topic()
    sub = await adapter.subscribe(name, "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    events = PlainEvents(
        [secrets.token_hex(12) for _ in range(3)], "/ductape/shop/dev/events", "orders", datetime.now(UTC),
        [b"a", b"", b"c" * 2000], ["application/json", "text/plain", "application/json"], "00-ab-cd-01", "",
    )  # fmt: skip
    assert await adapter.publish_plain(name, events) == {}, "no failures"
    assert await adapter.publish_batch(name, events.events()) == {}, "no failures"
    raw = [fields for _, fields in await admin.xrange(stream_key(name))]
    assert [list(fields.items()) for fields in raw[:3]] == [list(fields.items()) for fields in raw[3:]]
    got = await sub.fetch(10, 2)
    assert [(m.id, m.data, m.content_type, m.traceparent) for m in got[:3]] == [
        (e.id, e.data, e.content_type, e.traceparent) for e in events.events()
    ]
    await sub.ack([m.handle for m in got])
    await sub.close()
