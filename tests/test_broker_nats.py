"""The NATS JetStream adapter against the local server: connection drops, durability across a processor restart,
the CloudEvents header mapping, consumer naming and an unreachable server.

Needs NATS with JetStream at 127.0.0.1:4222 (skipped without it; under CI=true a missing server fails the run).
The connection drop goes through a TCP proxy the test cuts, so the shared NATS server itself is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from ductape.processor import UnavailableError
from ductape.processor.brokers import Message

from ductape_processor.adapters.brokers import nats as nats_broker
from ductape_processor.adapters.brokers import nats_pull
from ductape_processor.adapters.brokers.base import BrokerUnavailable, SubscribeOptions
from ductape_processor.adapters.brokers.nats import NatsBroker
from ductape_processor.adapters.brokers.nats_headers import outgoing_headers, prepared_headers
from ductape_processor.adapters.brokers.nats_names import consumer_name, subject_covered
from ductape_processor.adapters.brokers.nats_publish import write
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import ServerFactory, require_tcp
from tests.test_brokers import manifest, opened, pending_first, publish, subscribe, take

URL = "nats://127.0.0.1:4222"
STREAMS: list[str] = []  # streams the running test created; deleted after it


@pytest.fixture(autouse=True)
async def _forget_pending_reads() -> AsyncIterator[None]:
    yield
    for future in pending_first.values():
        future.cancel()
        with contextlib.suppress(BaseException):
            await future
    pending_first.clear()


@pytest.fixture
async def nats_up() -> AsyncIterator[None]:
    """The local server is there; afterwards, delete the streams the test made."""
    await require_tcp("NATS", "127.0.0.1", 4222)
    yield
    if STREAMS:
        nc = await nats.connect(URL)
        try:
            js = nc.jetstream()
            for stream in STREAMS:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        finally:
            STREAMS.clear()
            await nc.close()


def _run() -> str:
    run = secrets.token_hex(4)
    STREAMS.append(f"t_{run}")
    return run


def _message(body: str, **fields: object) -> OutgoingEvent:
    values: dict[str, object] = {
        "id": secrets.token_hex(12),
        "source": "/ductape/shop/dev/events",
        "type": "orders",
        "time": datetime.now(UTC),
        "data": body.encode(),
        "content_type": "text/plain",
    }
    values.update(fields)
    return OutgoingEvent(**values)  # type: ignore[arg-type]


class CuttableProxy:
    """A TCP proxy in front of NATS whose connections the test can cut, and that can refuse for a while."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.connections = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = {writer, up_writer}
        self._writers |= pair

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= pair

    async def wait_for_connections(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while self.connections < count:
                await asyncio.sleep(0.02)

    def cut(self) -> None:
        """Drop every proxied connection at once (both sides see a reset)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.refusing = True
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# -- through a processor ---------------------------------------------------------------------------------------


async def test_a_dropped_connection_is_restored_and_the_subscriber_keeps_receiving(
    nats_up: None, start_server: ServerFactory
) -> None:
    proxy = CuttableProxy("127.0.0.1", 4222)
    port = await proxy.start()
    try:
        running = await start_server()
        run = _run()
        document = json.loads(manifest("nats", run))
        for config in document["brokers"][0]["envs"].values():
            config["url"] = f"nats://127.0.0.1:{port}"
        await running.client.product.apply(json.dumps(document).encode())
        # reconnect=False: the processor's stream itself must survive the drop, not a client-side resubscribe
        sub = subscribe(running, "through-drops", ack_deadline=1.5, reconnect=False)
        messages = await opened(sub)
        received: list[str] = []

        async def consume() -> None:
            while True:
                [message] = await take(messages, 1, timeout=60)
                received.append(message.data.decode())
                await message.ack()

        sent: list[str] = []
        retries = 0

        stop = asyncio.Event()

        async def produce() -> None:  # keeps publishing through both drops
            nonlocal retries
            for n in itertools.count():
                if stop.is_set():
                    return
                body = f"m{n:05d}"
                while True:
                    try:
                        await publish(running, body)
                        break
                    except UnavailableError:
                        retries += 1
                        await asyncio.sleep(0.1)
                sent.append(body)
                await asyncio.sleep(0.01)

        consumer = asyncio.ensure_future(consume())
        producer = asyncio.ensure_future(produce())
        try:
            await asyncio.sleep(0.5)
            proxy.refusing = True  # down for a second: reconnect attempts fail and back off
            proxy.cut()
            await asyncio.sleep(1.0)
            proxy.refusing = False
            await proxy.wait_for_connections(2, within=10)
            await asyncio.sleep(0.3)
            proxy.cut()  # and a plain drop that reconnects at once
            at_last_cut = len(sent)
            await proxy.wait_for_connections(3, within=10)
            await asyncio.sleep(0.3)
            stop.set()
            async with asyncio.timeout(20):
                await producer
                while not set(sent) <= set(received):
                    assert not consumer.done(), consumer.exception()
                    await asyncio.sleep(0.05)
        finally:
            producer.cancel()
            consumer.cancel()
            with contextlib.suppress(BaseException):
                await consumer
        duplicates = sum(count - 1 for count in Counter(received).values())
        assert 0 < at_last_cut < len(sent), "messages were published before, across and after the drops"
        assert sorted(set(received)) == sorted(sent), "every confirmed publish arrived"
        assert duplicates <= 20, f"{duplicates} duplicates ({retries} publish retries)"
        assert sub.reconnects == 0, "the Subscribe stream stayed open across the drops"
        await sub.close()
    finally:
        await proxy.close()


async def test_a_group_keeps_its_messages_across_a_processor_restart(
    nats_up: None, start_server: ServerFactory, tmp_path: Path
) -> None:
    run = _run()
    first = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    await first.client.product.apply(manifest("nats", run))
    created = subscribe(first, "durable", reconnect=False)
    await opened(created)  # the group exists from here on
    await asyncio.sleep(0.2)
    await created.close()
    await asyncio.sleep(0.3)
    bodies = [f"while-away-{n:02d}" for n in range(20)]
    await publish(first, *bodies)  # nobody subscribed: the group keeps them
    held_stream = subscribe(first, "durable", reconnect=False, max_batch=1, max_in_flight=1)
    [held] = await take(await opened(held_stream), 1)  # taken and never acked when the processor stops
    assert held.delivery_attempt == 1
    await first.app.stop(grace=5)

    second = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    resumed = subscribe(second, "durable", reconnect=False)
    messages = await opened(resumed)
    got: list[Message] = await take(messages, len(bodies), timeout=10)
    assert sorted(m.data.decode() for m in got) == bodies
    attempts = {m.data.decode(): m.delivery_attempt for m in got}
    assert attempts[held.data.decode()] >= 2, "the message held at shutdown came back with the next attempt"
    assert all(attempt == 1 for body, attempt in attempts.items() if body != held.data.decode())
    for message in got:
        await message.ack()
    await publish(second, "after-restart")
    [after] = await take(messages, 1)
    assert after.data == b"after-restart" and after.delivery_attempt == 1
    await after.ack()
    await resumed.close()


# -- the adapter itself ----------------------------------------------------------------------------------------


async def test_cloudevents_fields_and_awkward_attribute_values_round_trip(nats_up: None) -> None:
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    try:
        topic = f"orders.{run}"
        sub = await adapter.subscribe(topic, "fields", SubscribeOptions(prefetch=10, ack_deadline_s=5))
        attributes = {
            "Case.Key_x-y": "Mixed Case",
            "crlf": "a\r\nNats-Msg-Id: forged",
            "unicode": "Zürich — 東京 ✓",
            "percent": '100% %41 "quoted"',
            "spaces": "  padded  ",
            "empty": "",
        }
        sent = _message(
            "payload",
            attributes=attributes,
            ordering_key="customer 7/ä",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            content_type="application/json; charset=utf-8",
        )
        broker_id = await adapter.publish(topic, sent)
        assert broker_id.startswith(f"t_{run}:")
        [got] = await sub.fetch(1, 5)
        assert (got.id, got.source, got.type, got.time) == (sent.id, sent.source, sent.type, sent.time)
        assert got.attributes == attributes
        assert got.ordering_key == sent.ordering_key and got.traceparent == sent.traceparent
        assert got.content_type == sent.content_type and got.data == b"payload" and got.delivery_attempt == 1
        await sub.ack([got.handle])
        # a re-sent copy (same id, same topic) is dropped by JetStream's duplicate window
        await adapter.publish(topic, sent)
        assert await sub.fetch(1, 0.5) == []
        await sub.close()
    finally:
        await adapter.close()


async def test_the_adapters_own_hpub_is_what_nats_py_would_write_and_queue(nats_up: None) -> None:
    # The adapter writes its HPUB itself (nats_publish.write), through nats-py's command queue, which is not public
    # API: the bytes queued and the counters must be what `Client.publish` gives for the same headers, and a
    # closed connection must refuse it alike.
    message = _message(
        "payload",
        attributes={"crlf": "a\r\nNats-Msg-Id: forged", "unicode": "Zürich ✓", "spaces": "  padded  ", "empty": ""},
        ordering_key="customer 7/ä",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    nc = await nats.connect(URL)
    try:
        queued: list[bytes] = []
        send_command = nc._send_command

        async def capture(cmd: bytes, priority: bool = False) -> None:
            queued.append(cmd)
            await send_command(cmd, priority)

        nc._send_command = capture  # type: ignore[method-assign]
        head = prepared_headers(nc.max_payload, "orders.hpub", message, "t_hpub")
        await nc.publish(
            "orders.hpub", message.data, "_INBOX.r.1", headers=outgoing_headers("orders.hpub", message, "t_hpub")
        )
        stats = dict(nc.stats)
        await write(nc, "orders.hpub", "_INBOX.r.1", head, message.data)
        assert len(queued) == 2 and queued[0] == queued[1]
        assert nc.stats["out_msgs"] == stats["out_msgs"] + 1
        assert nc.stats["out_bytes"] == stats["out_bytes"] + len(message.data)
    finally:
        await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await write(nc, "orders.hpub", "_INBOX.r.1", head, message.data)


async def test_a_topic_that_is_no_nats_subject_is_refused_before_anything_is_written(nats_up: None) -> None:
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    try:
        for topic in (f"orders {run}", f"orders.{run}\r\nPUB x 1", f"orders..{run}"):
            with pytest.raises(InvalidArgument):
                await adapter.publish(topic, _message("payload"))
    finally:
        await adapter.close()


async def test_concurrent_first_publishes_and_a_batch_are_each_confirmed_once_in_order(nats_up: None) -> None:
    # The first publishes of a connection race to set up publish_async's reply subscription: each must still get
    # its own PubAck, and a batch's messages are stored in the order given.
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    try:
        topic = f"orders.{run}"
        sub = await adapter.subscribe(topic, "all", SubscribeOptions(prefetch=500, ack_deadline_s=5))
        singles = [_message(f"single {n}") for n in range(20)]
        ids = await asyncio.gather(*(adapter.publish(topic, message) for message in singles))
        batch = [_message(f"batch {n}") for n in range(300)]
        assert await adapter.publish_batch(topic, batch) == {}, "no failures"
        assert len(set(ids)) == 20, "one stream sequence per message"
        got = []
        while len(got) < 320:
            fetched = await sub.fetch(320 - len(got), 5)
            assert fetched, f"only {len(got)} of 320 messages arrived"
            got += fetched
        assert await sub.fetch(1, 0.3) == [], "each message stored once"
        bodies = [message.data.decode() for message in got]
        assert sorted(bodies[:20]) == sorted(m.data.decode() for m in singles)
        assert bodies[20:] == [m.data.decode() for m in batch]
        await sub.ack([message.handle for message in got])
        await sub.close()
    finally:
        await adapter.close()


async def test_groups_are_distinct_per_topic_and_names_are_valid(nats_up: None) -> None:
    assert consumer_name("orders.eu", "billing") != consumer_name("orders.us", "billing")
    assert consumer_name("a.b", "c") != consumer_name("a", "b.c")
    for name in (consumer_name("orders.eu", "g.with*odd>chars/and spaces"), consumer_name("x" * 255, "y" * 255)):
        assert all(ch.isalnum() or ch in "_-" for ch in name) and len(name) <= 130
    assert subject_covered("orders.eu", ["orders.*"]) and subject_covered("orders.eu.x", ["orders.>"])
    assert not subject_covered("orders", ["orders.>"]) and not subject_covered("orders.eu", ["orders"])
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    try:
        options = SubscribeOptions(prefetch=10, ack_deadline_s=5)
        eu = await adapter.subscribe(f"orders.eu.{run}", "same", options)
        us = await adapter.subscribe(f"orders.us.{run}", "same", options)
        await adapter.publish(f"orders.eu.{run}", _message("eu"))
        await adapter.publish(f"orders.us.{run}", _message("us"))
        [from_eu] = await eu.fetch(5, 5)
        [from_us] = await us.fetch(5, 5)
        assert (from_eu.data, from_us.data) == (b"eu", b"us")
        await eu.ack([from_eu.handle])
        await us.ack([from_us.handle])
        await eu.close()
        await us.close()
    finally:
        await adapter.close()


async def test_an_unreachable_server_is_broker_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_broker, "CONNECT_DEADLINE_S", 1.0)
    proxy = CuttableProxy("127.0.0.1", 4222)
    port = await proxy.start()
    proxy.refusing = True
    adapter = NatsBroker(f"nats://user:secret@127.0.0.1:{port}", "t_unreachable", "test/nats")
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await adapter.publish("orders", _message("x"))
        assert "cannot connect" in caught.value.message and "secret" not in caught.value.message
        with pytest.raises(BrokerUnavailable):
            await adapter.subscribe("orders", "g", SubscribeOptions(prefetch=1, ack_deadline_s=1))
    finally:
        await adapter.close()
        await proxy.close()


async def test_a_pull_request_that_outlives_its_closed_subscriber_loses_nothing(nats_up: None) -> None:
    """A closed subscriber's pull request can still be open on the server (its end arrived late under load, or the
    server received it late). A redelivery the server picks for it must come back to the group at once: with the
    inbox unsubscribed, nats-server 2.9 loses it until ack_wait (here 15 s) and hands a newer message out twice."""
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    other = await nats.connect(URL)
    try:
        topic = f"orders.{run}"
        options = SubscribeOptions(prefetch=1, ack_deadline_s=10)
        first = await adapter.subscribe(topic, "late", options)
        await adapter.publish(topic, _message("one"))
        [taken] = await first.fetch(1, 5)
        await first.nack([taken.handle])  # a redelivery is now due, attempt 2
        await first.close()
        inbox = first._inbox  # type: ignore[attr-defined]
        consumer = first._consumer  # type: ignore[attr-defined]
        # the request the server still had for the closed subscriber's inbox
        await other.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.t_{run}.{consumer}",
            json.dumps({"batch": 1, "expires": 10**9}).encode(),
            f"{inbox}.late",
        )
        await other.flush()
        await adapter.publish(topic, _message("two"))
        second = await adapter.subscribe(topic, "late", options)
        got: list[tuple[str, int]] = []
        async with asyncio.timeout(5):  # well before ack_wait
            while len(got) < 2:
                for message in await second.fetch(2, 0.5):
                    got.append((message.data.decode(), message.delivery_attempt))
                    await second.ack([message.handle])
        assert sorted(got) == [("one", 2), ("two", 1)], "the redelivery once, counting only the client's nack"
        assert await second.fetch(1, 1.0) == [], "no message handed out twice"
        await second.close()
    finally:
        await other.close()
        await adapter.close()


async def test_a_redelivery_the_server_loses_costs_no_attempt_and_its_repeat_is_not_handed_out(nats_up: None) -> None:
    """nats-server before 2.10.16 counts a redelivery it picks for a pull request that is gone (expired but not yet
    swept, or without a subscriber) and sends it nowhere: the message comes back after ack_wait one attempt higher,
    and before 2.10.14 the newest message goes out again with num_delivered 1. Here a request without a subscriber
    meets a nak'd message: the message must come back as attempt 2 (one client had it), and the acked message must
    not be handed out again. (Before the adapter kept its own count: ("two", 1) again, then ("one", 3), which a
    group with max_deliveries 2 dead-lettered unprocessed.)"""
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    other = await nats.connect(URL)
    try:
        topic = f"orders.{run}"
        subscription = await adapter.subscribe(topic, "lost", SubscribeOptions(prefetch=2, ack_deadline_s=1))
        ack_wait = 1 + nats_broker.ACK_WAIT_MARGIN_S
        await adapter.publish(topic, _message("one"))
        await adapter.publish(topic, _message("two"))
        taken: list[IncomingEvent] = []
        async with asyncio.timeout(5):
            while len(taken) < 2:
                taken += await subscription.fetch(2 - len(taken), 1.0)
        one, two = sorted(taken, key=lambda message: message.data)
        await subscription.ack([two.handle])
        await subscription.nack([one.handle])  # no request of ours is open: the redelivery waits for one
        await asyncio.sleep(0.3)
        consumer = subscription._consumer  # type: ignore[attr-defined]
        await other.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.t_{run}.{consumer}",
            json.dumps({"batch": 1, "expires": 10**10}).encode(),
            "_INBOX.nobody_listens_here",
        )
        await other.flush()
        got: list[tuple[str, int]] = []
        async with asyncio.timeout(ack_wait + 4):
            while ("one", 2) not in got:
                for message in await subscription.fetch(2, 0.5):
                    got.append((message.data.decode(), message.delivery_attempt))
                    await subscription.ack([message.handle])
                assert ("two", 1) not in got, "an acked message handed out again"
        assert await subscription.fetch(2, 1.0) == []
        assert got == [("one", 2)], "the lost redelivery counts only the client's delivery"
        await subscription.close()
    finally:
        await other.close()
        await adapter.close()


async def test_the_late_end_of_an_earlier_pull_request_does_not_end_the_open_one(
    nats_up: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a request's 408 can arrive after the local grace ended it and a newer request went out. Taken for
    the newer one's end, it had the subscriber send a third while the second was still open on the server: two
    requests at once (beyond the engine's credit), one of them unseen here, so a nak'd message could land in it.
    Each request answers to its own subject now: the server holds one request of this subscriber, never two."""
    monkeypatch.setattr(nats_pull, "PULL_EXPIRES_MAX_S", 2.0)
    run = _run()
    adapter = NatsBroker(URL, f"t_{run}", "test/nats")
    other = await nats.connect(URL)
    try:
        topic = f"orders.{run}"
        subscription = await adapter.subscribe(topic, "late", SubscribeOptions(prefetch=5, ack_deadline_s=10))
        consumer = subscription._consumer  # type: ignore[attr-defined]
        js = other.jetstream()
        fetching = asyncio.ensure_future(subscription.fetch(5, 5.0))
        async with asyncio.timeout(2):
            while (await js.consumer_info(f"t_{run}", consumer)).num_waiting != 1:
                await asyncio.sleep(0.02)
        inbox = subscription._inbox  # type: ignore[attr-defined]
        await other.publish(f"{inbox}.0", b"", headers={"Status": "408", "Description": "Request Timeout"})
        await other.flush()
        await asyncio.sleep(0.3)
        assert (await js.consumer_info(f"t_{run}", consumer)).num_waiting == 1
        await adapter.publish(topic, _message("one"))
        [message] = await fetching
        assert message.data == b"one"
        await subscription.close()
    finally:
        await other.close()
        await adapter.close()
