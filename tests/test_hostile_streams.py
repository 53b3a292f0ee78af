"""Hostile and unlucky clients of the streaming RPCs, through the raw generated stubs: stale-ack notices grown by acks
nobody reads, Receive batches larger than a response may be, upload messages carrying nothing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from ductape.processor.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import _forget_run, manifest

MIB = 1024 * 1024


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest, start_server: ServerFactory) -> AsyncIterator[Running]:
    kind: str = request.param
    if kind == "redis":
        await require_tcp("Redis", "127.0.0.1", 6379)
    running = await start_server()
    run = secrets.token_hex(4)
    await running.client.product.apply(manifest(kind, run))
    yield running
    await _forget_run(kind, run)


class Stream:
    """A Subscribe or Receive call whose requests the test sends one at a time."""

    def __init__(self, call: Any, requests: asyncio.Queue[Any], request_type: Any) -> None:
        self.call, self.requests, self.request_type = call, requests, request_type

    @classmethod
    def subscribe(cls, channel: grpc.aio.Channel, group: str) -> Stream:
        requests: asyncio.Queue[Any] = asyncio.Queue()
        opening = broker_pb2.SubscribeInit(product="shop", env="dev", event="events:orders", group=group)
        requests.put_nowait(broker_pb2.SubscribeRequest(init=opening))
        call = broker_pb2_grpc.BrokerServiceStub(channel).Subscribe(_sent(requests), timeout=60)
        return cls(call, requests, broker_pb2.SubscribeRequest)

    @classmethod
    def receive(cls, channel: grpc.aio.Channel, webhook: str, group: str) -> Stream:
        requests: asyncio.Queue[Any] = asyncio.Queue()
        opening = webhook_pb2.ReceiveInit(product="shop", env="dev", webhook=webhook, group=group)
        requests.put_nowait(webhook_pb2.ReceiveRequest(init=opening))
        call = webhook_pb2_grpc.WebhookServiceStub(channel).Receive(_sent(requests), timeout=60)
        return cls(call, requests, webhook_pb2.ReceiveRequest)

    async def ready(self) -> None:
        assert (await asyncio.wait_for(self.call.read(), 10)).HasField("ready")

    def ack(self, ack_ids: list[str]) -> None:
        self.requests.put_nowait(self.request_type(ack=broker_pb2.Acknowledge(ack_ids=ack_ids)))

    async def read(self, timeout: float = 10) -> Any:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF
        return response

    async def close(self) -> grpc.StatusCode:
        self.requests.put_nowait(None)
        return await asyncio.wait_for(self.call.code(), 10)  # type: ignore[no-any-return]


async def _sent(requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (request := await requests.get()) is not None:
        yield request


async def test_stale_acks_nobody_reads_stay_bounded_and_fit_in_a_response(broker: Running) -> None:
    # Acks of ids the server never issued, 3 MB each, sent while the client reads nothing: the server reports them
    # in one notice. Before, the notice grew by every id (10 x 3 MB here, up to 10,000 ids of 4 MB: the server's
    # RSS went from 92 to 340 MB for 60 such ids), and gRPC refused to send it (RESOURCE_EXHAUSTED "Sent message
    # larger than max (25165869 vs. 4194304)"), ending the stream.
    async with grpc.aio.insecure_channel(
        broker.address, options=[("grpc.max_receive_message_length", 64 * MIB)]
    ) as channel:
        stream = Stream.subscribe(channel, "stale")
        await stream.ready()
        for n in range(10):
            stream.ack([str(n) * (3 * MIB)])
        stream.ack(["short"])
        await asyncio.sleep(1.5)  # the server reads them all while nothing is read here
        await broker.client.message_broker.publish(product="shop", env="dev", event="events:orders", data=b"after")
        notices: list[broker_pb2.StaleAcks] = []
        while not (response := await stream.read()).HasField("batch"):
            assert response.HasField("stale_acks")
            assert response.ByteSize() <= 2 * MIB
            notices.append(response.stale_acks)
        assert "short" in [ack_id for notice in notices for ack_id in notice.ack_ids]
        [message] = response.batch.messages
        assert message.data == b"after"
        stream.ack([message.ack_id])
        assert await stream.close() == grpc.StatusCode.OK
