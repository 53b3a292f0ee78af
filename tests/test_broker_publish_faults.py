"""Publishing through broker faults: replies lost after the broker stored a message, and brokers that stop answering.

The processor reaches each real broker through `FaultyLink`, a TCP proxy on loopback that this test controls: it
can drop the broker's replies (the broker accepted the write, the processor never hears so), stop forwarding
anything (a broker that accepts connections and never answers), and cut every connection. Subscribers use a second
environment that reaches the broker directly. The machine's shared brokers are never stopped or paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from ductape.processor.brokers import outgoing
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc

from ductape_processor.adapters.brokers.base import BrokerUnavailable, SubscribeOptions
from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker
from ductape_processor.adapters.brokers.rabbitmq_queue import queue_name
from ductape_processor.runtime.brokers.messages import OutgoingEvent, OutgoingMessage
from ductape_processor.runtime.brokers.publisher import PUBLISH_LIMIT_S
from ductape_processor.runtime.policies import Deadline
from tests.conftest import Running, ServerFactory, require_tcp
from tests.faulty_link import FaultyLink
from tests.test_broker_rabbitmq import _rabbitmqctl, _require_rabbitmqctl
from tests.test_brokers import SERVERS, _forget_run, delete_rabbitmq, opened, take

pytestmark = pytest.mark.faults

DURABLE = ["redis", "rabbitmq", "nats"]


def _url(kind: str, port: int) -> str:
    return str(SERVERS[kind][3]["url"]).replace(f":{SERVERS[kind][2]}", f":{port}")


def _manifest(kind: str, run: str, dev_port: int, prd_port: int) -> bytes:
    def config(port: int) -> dict[str, Any]:
        settings: dict[str, Any] = {**SERVERS[kind][3], "url": _url(kind, port)}
        if kind == "nats":
            settings["stream"] = f"t_{run}"
        return settings

    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}, {"slug": "prd"}],
        "brokers": [
            {
                "tag": "events",
                "envs": {"dev": config(dev_port), "prd": config(prd_port)},
                "topics": [{"tag": "orders", "name": f"orders.{run}"}],
            }
        ],
    }
    return json.dumps(document).encode()


@pytest.fixture(params=DURABLE)
async def faulty(
    request: pytest.FixtureRequest, start_server: ServerFactory, made_queues: set[str]
) -> AsyncIterator[tuple[Running, FaultyLink]]:
    """A processor whose `dev` environment reaches the broker through a FaultyLink and `prd` directly."""
    kind: str = request.param
    name, host, port, _ = SERVERS[kind]
    await require_tcp(name, host, port)
    link = FaultyLink(host, port)
    await link.start()
    running = await start_server()
    running.kind = kind  # type: ignore[attr-defined]
    running.run = secrets.token_hex(4)  # type: ignore[attr-defined]
    await running.client.product.apply(_manifest(kind, running.run, link.listen_port, port))  # type: ignore[attr-defined]
    yield running, link
    await link.close()
    await _forget_run(kind, running.run, made_queues)  # type: ignore[attr-defined]


async def _publish(running: Running, body: bytes, key: str = "", timeout: float | None = None) -> str:
    async with grpc.aio.insecure_channel(running.address) as channel:
        response = await broker_pb2_grpc.BrokerServiceStub(channel).Publish(
            broker_pb2.PublishRequest(
                product="shop", env="dev", event="events:orders", message=outgoing(body, idempotency_key=key)
            ),
            timeout=timeout,
        )
    return str(response.message_id)


async def test_a_retry_with_the_same_key_after_a_lost_confirmation_keeps_one_id(
    faulty: tuple[Running, FaultyLink],
) -> None:
    running, link = faulty
    sub = running.client.message_broker.subscribe(
        product="shop", env="prd", event="events:orders", group="g", ack_deadline=30
    )
    messages = await opened(sub)
    await _publish(running, b"warm-up")  # connection, stream and exchange are set up through the link
    [warm] = await take(messages, 1)
    await warm.ack()

    link.mode = "drop-replies"  # the broker stores the message; the processor never hears it
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _publish(running, b"order-1", key="order-1", timeout=2.0)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    link.cut()
    link.mode = "pass"
    retried = await _publish(running, b"order-1", key="order-1", timeout=15.0)
    assert await _publish(running, b"order-1", key="order-1") == retried

    copies = await take(messages, 1)
    with contextlib.suppress(AssertionError):
        copies += await take(messages, 1, timeout=2.0)
    for copy in copies:
        await copy.ack()
    print(f"\n{running.kind}: {len(copies)} cop(ies) delivered, ids {sorted({c.id for c in copies})}")  # type: ignore[attr-defined]
    assert {copy.id for copy in copies} == {retried}  # one id, however many copies
    if running.kind == "nats":  # type: ignore[attr-defined]
        assert len(copies) == 1  # JetStream dropped the second copy (Nats-Msg-Id)
    await sub.close()


async def test_a_publish_to_a_broker_that_stopped_answering_honours_the_limit_and_the_deadline(
    faulty: tuple[Running, FaultyLink],
) -> None:
    running, link = faulty
    await _publish(running, b"warm-up")
    link.mode = "blackhole"

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _publish(running, b"no deadline")
    unbounded = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    runtime = running.app.components.brokers
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as unconfirmed:
        await runtime.publish(
            "shop", "dev", "events:orders", OutgoingMessage(b"2 s", "text/plain", {}), deadline=Deadline(2)
        )
    bounded = time.monotonic() - started
    assert "may or may not have been stored" in unconfirmed.value.message

    started = time.monotonic()
    entries = [OutgoingMessage(b"a", "text/plain", {}), OutgoingMessage(b"b", "text/plain", {}, idempotency_key="b")]
    results = await runtime.publish_batch("shop", "dev", "events:orders", entries, deadline=Deadline(2))
    batch = time.monotonic() - started
    assert [isinstance(result, BrokerUnavailable) for result in results] == [True, True]
    print(f"\n{running.kind}: no deadline {unbounded:.2f}s, 2 s deadline {bounded:.2f}s, batch {batch:.2f}s")  # type: ignore[attr-defined]
    assert unbounded <= PUBLISH_LIMIT_S + 1.0
    assert bounded <= 2.5
    assert batch <= 2.5


async def test_a_connection_closed_by_rabbitmq_logs_one_warning_and_no_driver_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, host, port, settings = SERVERS["rabbitmq"]
    await require_tcp(name, host, port)
    _require_rabbitmqctl()
    run = secrets.token_hex(4)
    adapter = RabbitMQBroker(f"{settings['url']}?name=pf-{run}", "", f"shop/dev/logs-{run}")
    topic = f"logs.{run}"
    sent = OutgoingEvent(id="m", source="s", type=topic, time=datetime.now(UTC), data=b"x", content_type="text/plain")
    try:
        await adapter.publish(topic, sent)
        subscription = await adapter.subscribe(topic, "g", SubscribeOptions(prefetch=10, ack_deadline_s=10))
        listed = await _rabbitmqctl("-q", "list_connections", "pid", "client_properties", "--no-table-headers")
        [pid] = [line.split("\t")[0] for line in listed.splitlines() if f'"pf-{run}"' in line]
        caplog.clear()
        with caplog.at_level(logging.INFO):
            await _rabbitmqctl("close_connection", pid, "test: forced close")  # only this test's connection
            async with asyncio.timeout(10):
                while adapter.reconnections < 1:
                    await asyncio.sleep(0.05)
            await adapter.publish(topic, sent)  # handled: publishing goes on
        driver = [
            r for r in caplog.records if r.name.startswith(("aiormq", "aio_pika")) and r.levelno >= logging.WARNING
        ]
        ours = [r for r in caplog.records if r.name == "ductape_processor.adapters.brokers.rabbitmq"]
        print(f"\ndriver records: {[str(r.msg)[:60] for r in driver]}\nours: {[r.getMessage() for r in ours]}")
        assert driver == []
        [lost] = [r for r in ours if r.levelno == logging.WARNING]
        assert "CONNECTION_FORCED" in lost.getMessage() and "guest:guest" not in lost.getMessage()
        await subscription.close()
    finally:
        await adapter.close()
        await delete_rabbitmq([queue_name(topic, "g")], [topic])


class RestartingJetStream:
    """A NATS server as one looks while JetStream is coming back after a restart: the connection works, a publish
    gets a "no responders" (503) status, and JetStream API requests ($JS.API...) get no answer at all."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "restarting", "version": "2.10.0", "proto": 1, "headers": True, "max_payload": 1 << 20}
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        subscriptions: dict[str, str] = {}  # subject pattern -> sid
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb, *args = line.decode().split()
                if verb == "PING":
                    writer.write(b"PONG\r\n")
                elif verb == "SUB":
                    subscriptions[args[0]] = args[-1]
                elif verb in ("PUB", "HPUB"):
                    await reader.readexactly(int(args[-1]) + 2)
                    subject, reply = args[0], args[1] if len(args) > (3 if verb == "HPUB" else 2) else ""
                    if reply and not subject.startswith("$JS.API"):
                        sid = next((s for p, s in subscriptions.items() if reply.startswith(p.rstrip("*"))), None)
                        if sid is not None:
                            status = b"NATS/1.0 503\r\n\r\n"
                            writer.write(b"HMSG %s %s %d %d\r\n%s\r\n" % (reply.encode(), sid.encode(), 16, 16, status))
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_nats_publish_while_jetstream_comes_back_honours_the_limit(start_server: ServerFactory) -> None:
    name, host, port, _ = SERVERS["nats"]
    await require_tcp(name, host, port)
    link = FaultyLink(host, port)
    await link.start()
    fake = RestartingJetStream()
    await fake.start()
    running = await start_server()
    run = secrets.token_hex(4)
    await running.client.product.apply(_manifest("nats", run, link.listen_port, port))
    try:
        await _publish(running, b"warm-up")  # connected, stream set up
        link.port = fake.port  # the server "restarts": the client reconnects to one whose JetStream is not back
        link.cut()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _publish(running, b"during the restart")
        took = time.monotonic() - started
        print(f"\nnats, JetStream not answering after a reconnect: publish took {took:.2f}s")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert took <= PUBLISH_LIMIT_S + 1.0
    finally:
        await link.close()
        await fake.close()
        await _forget_run("nats", run)
