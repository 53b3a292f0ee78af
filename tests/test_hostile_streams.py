"""Hostile and unlucky clients of the streaming RPCs, through the raw generated stubs: stale-ack notices grown by acks
nobody reads, Receive batches larger than a response may be, upload messages carrying nothing."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from ductape.processor.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

from ductape_processor.runtime.brokers import subscriptions
from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import _forget_run, manifest
from tests.test_storage import PRODUCT, TAG
from tests.test_storage import manifest as storage_manifest

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


RECEIVE_MANIFEST = {
    "product": "shop",
    "environments": [{"slug": "dev"}],
    "brokers": [{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": [{"tag": "hooks", "name": "hooks"}]}],
    "webhooks": [
        {
            "tag": "big",
            "receive": {
                "dev": {
                    "path": "/big",
                    "verify": "none",
                    "max_body_bytes": 8 * MIB,
                    "dispatch": {"publish": "events:hooks"},
                }
            },
        }
    ],
}


@pytest.fixture
async def hooks(start_server: ServerFactory) -> AsyncIterator[tuple[Running, aiohttp.ClientSession, str]]:
    # Received webhooks are published to the receive's topic: the publish limit must let their bodies through.
    running = await start_server(broker_max_message_bytes=16 * MIB)
    await running.client.product.apply(json.dumps(RECEIVE_MANIFEST).encode())
    http = running.app.components.webhook_http
    assert http is not None
    await http.ensure()
    async with aiohttp.ClientSession() as session:
        yield running, session, f"http://127.0.0.1:{http.port}/webhooks/shop/dev/big"


async def _post(session: aiohttp.ClientSession, url: str, size: int, mark: str) -> None:
    body = json.dumps({"mark": mark, "pad": "p" * size}).encode()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        assert response.status == 200, await response.text()


async def _receive_stream(channel: grpc.aio.Channel) -> Stream:
    stream = Stream.receive(channel, "big", "watchers")
    await stream.ready()
    return stream


def _marks(response: webhook_pb2.ReceiveResponse) -> list[str]:
    return [json.loads(delivery.webhook.body)["mark"] for delivery in response.batch.deliveries]


async def test_a_receive_batch_larger_than_a_response_may_be_arrives_in_parts(
    hooks: tuple[Running, aiohttp.ClientSession, str],
) -> None:
    # Six received webhooks of 900 KB (each within the receive's max_body_bytes) in one batch: a 5.4 MB response.
    # Before, gRPC refused to send it (RESOURCE_EXHAUSTED "Sent message larger than max"), the stream ended, the
    # webhooks went back, and every next Receive stream of the group got the same batch: none was ever received.
    running, session, url = hooks
    async with grpc.aio.insecure_channel(running.address) as channel:
        opening = await _receive_stream(channel)  # the group exists from here on
        assert await opening.close() == grpc.StatusCode.OK
        for n in range(6):
            await _post(session, url, 900_000, f"w{n}")
        stream = await _receive_stream(channel)
        marks: list[str] = []
        while len(marks) < 6:
            response = await stream.read()
            assert response.HasField("batch") and response.ByteSize() <= 4 * MIB
            marks += _marks(response)
            assert {d.delivery_attempt for d in response.batch.deliveries} == {1}
            stream.ack([delivery.ack_id for delivery in response.batch.deliveries])
        assert sorted(marks) == [f"w{n}" for n in range(6)]
        assert await stream.close() == grpc.StatusCode.OK


async def test_a_received_webhook_too_large_for_any_response_is_given_back_and_the_stream_goes_on(
    hooks: tuple[Running, aiohttp.ClientSession, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 5 MB body (the receive allows 8 MiB) can never fit a 4 MiB response: Receive streams have no dead-letter
    # topic, so it goes back to the group for a while and the stream delivers the others. Before, it ended every
    # Receive stream of the group with RESOURCE_EXHAUSTED, one after the other.
    monkeypatch.setattr(subscriptions, "TOO_LARGE_RETRY_S", 0.5)
    running, session, url = hooks
    async with grpc.aio.insecure_channel(running.address) as channel:
        stream = await _receive_stream(channel)
        await _post(session, url, 5 * MIB, "huge")
        await _post(session, url, 10, "small")
        response = await stream.read()
        assert _marks(response) == ["small"]
        stream.ack([delivery.ack_id for delivery in response.batch.deliveries])
        # The huge one comes back each 0.5 s and is given back again: never a response, never the stream's end.
        # (A read is not cancelled: that would cancel the call.)
        reading = asyncio.ensure_future(stream.call.read())
        done, _ = await asyncio.wait({reading}, timeout=1.5)
        assert not done
        assert await stream.close() == grpc.StatusCode.OK
        assert await reading is grpc.aio.EOF


async def test_an_upload_message_carrying_nothing_is_refused_on_kind_not_as_a_second_header(
    start_server: ServerFactory,
) -> None:
    # Before, an UploadRequest with neither header nor chunk after the header was refused as "header: an upload
    # takes its header once", naming a field the client never sent twice.
    running = await start_server()
    await running.client.product.apply(storage_manifest({"provider": "fs"}))
    header = storage_pb2.UploadHeader(product=PRODUCT, env="dev", event=TAG, file_name="nothing.bin")
    requests = [storage_pb2.UploadRequest(header=header), storage_pb2.UploadRequest()]
    async with grpc.aio.insecure_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage_pb2_grpc.StorageServiceStub(channel).Upload(iter(requests), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("kind:")
    listed = await running.client.storage.list(product=PRODUCT, env="dev", event=TAG)
    assert not listed.files
