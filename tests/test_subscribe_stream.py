"""The Subscribe stream's edges: stale acks, tasks left behind, closing from another task (memory broker)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import warnings
from collections.abc import AsyncIterator

import grpc
import pytest
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from google.protobuf import duration_pb2

from tests.conftest import Running, ServerFactory
from tests.test_brokers import (  # noqa: F401 - `_forget_pending_reads` ends the reads `take` leaves pending
    _forget_pending_reads,
    manifest,
    publish,
    subscribe,
    take,
)


@pytest.fixture
async def memory(start_server: ServerFactory) -> Running:
    running = await start_server()
    running.kind = "memory"  # type: ignore[attr-defined]
    running.run = secrets.token_hex(4)  # type: ignore[attr-defined]
    await running.client.product.apply(manifest("memory", running.run))
    return running


async def test_closing_a_subscription_from_another_task_ends_the_iteration_quietly(
    memory: Running, caplog: pytest.LogCaptureFixture
) -> None:
    sub = subscribe(memory)
    got: list[str] = []

    async def consume() -> None:
        async for message in sub:
            got.append(message.data.decode())
            await message.ack()

    loop = asyncio.get_running_loop()
    problems: list[str] = []
    loop.set_exception_handler(lambda _, context: problems.append(str(context.get("message"))))
    consumer = asyncio.ensure_future(consume())
    for _ in range(200):
        if sub._call is not None:
            break
        await asyncio.sleep(0.01)
    await publish(memory, "one")
    for _ in range(200):
        if got:
            break
        await asyncio.sleep(0.01)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        await sub.close()
        await asyncio.wait_for(consumer, 5)  # the `async for` ends by itself, without an error
        gc.collect()
        await asyncio.sleep(0.1)
    texts = [str(w.message) for w in caught] + problems + [r.getMessage() for r in caplog.records]
    assert got == ["one"]
    assert not [t for t in texts if "already running" in t or "was never awaited" in t], texts


def _stream_tasks() -> list[str]:
    """Pending tasks that belong to a Subscribe stream on the server (this test's process and loop)."""
    left = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        where = f"{getattr(code, 'co_filename', '')}:{getattr(coro, '__qualname__', '')}"
        if "Queue.get" in where or "api/broker.py" in where or "runtime/brokers/" in where:
            left.append(where)
    return left


async def _from(requests: asyncio.Queue[broker_pb2.SubscribeRequest]) -> AsyncIterator[broker_pb2.SubscribeRequest]:
    while True:
        yield await requests.get()


async def test_a_client_dropping_its_stream_leaves_no_task_behind(memory: Running) -> None:
    init = broker_pb2.SubscribeRequest(
        init=broker_pb2.SubscribeInit(product="shop", env="dev", event="events:orders", group="drop")
    )
    runtime = memory.app.components.brokers  # type: ignore[attr-defined]
    problems: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: problems.append(str(context.get("message"))))
    for _ in range(3):
        requests: asyncio.Queue[broker_pb2.SubscribeRequest] = asyncio.Queue()
        await requests.put(init)

        async with grpc.aio.insecure_channel(memory.address) as channel:
            call = broker_pb2_grpc.BrokerServiceStub(channel).Subscribe(_from(requests), timeout=20)
            assert (await call.read()).HasField("ready")
            await publish(memory, "m")
            assert len((await call.read()).batch.messages) >= 1
            call.cancel()  # the client drops the stream while the server waits for more to send
        for _ in range(200):
            if not runtime._subscriptions and not _stream_tasks():
                break
            await asyncio.sleep(0.01)
        assert not runtime._subscriptions
        gc.collect()  # a task nobody references any more is destroyed here, pending or not
    await asyncio.sleep(0.1)
    assert _stream_tasks() == []
    assert problems == []


@pytest.mark.faults
async def test_a_stream_its_client_stops_reading_is_closed_and_its_messages_go_to_the_group(
    memory: Running,
) -> None:
    from ductape.processor.brokers import outgoing

    runtime = memory.app.components.brokers  # type: ignore[attr-defined]
    options = {"product": "shop", "env": "dev", "event": "events:orders", "group": "stall"}
    init = broker_pb2.SubscribeRequest(
        init=broker_pb2.SubscribeInit(max_batch=1, ack_deadline=duration_pb2.Duration(seconds=1), **options)
    )
    requests: asyncio.Queue[broker_pb2.SubscribeRequest] = asyncio.Queue()
    await requests.put(init)
    async with grpc.aio.insecure_channel(memory.address) as channel:
        call = broker_pb2_grpc.BrokerServiceStub(channel).Subscribe(_from(requests), timeout=60)
        assert (await call.read()).HasField("ready")
        payload = b"x" * 900_000
        for _ in range(4):
            results = await memory.client.message_broker.publish_batch(
                product="shop", env="dev", event="events:orders", messages=[outgoing(payload) for _ in range(4)]
            )
            assert all(result.ok for result in results)
        # The client reads nothing more: once its buffers are full the server's write stays pending.
        started = asyncio.get_running_loop().time()
        for _ in range(1500):
            if not runtime._subscriptions:
                break
            await asyncio.sleep(0.01)
        assert not runtime._subscriptions, "the stream is still open"
        closed_after = asyncio.get_running_loop().time() - started
        assert closed_after < 10
        responses: list[object] = []

        async def read_all() -> None:
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
        read = len(responses)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not read" in (caught.value.details() or "")
    assert 0 < read < 16
    # Everything the stalled stream held goes back to the group: another subscriber gets all of it.
    other = subscribe(memory, "stall", max_batch=1)
    iterator = other.__aiter__()
    got = await take(iterator, 16 - read, timeout=10)
    assert all(m.data == payload for m in got)
    await other.close()


async def test_closing_after_a_reconnect_leaves_no_request_stream_behind(start_server: ServerFactory) -> None:
    first = await start_server()
    run = secrets.token_hex(4)
    await first.client.product.apply(manifest("memory", run))
    problems: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: problems.append(str(context.get("message"))))
    from ductape.processor import Processor

    client = Processor(first.address, timeout=10)
    sub = client.message_broker.subscribe(product="shop", env="dev", event="events:orders", group="re")
    consumer = asyncio.ensure_future(anext(sub.__aiter__()))
    for _ in range(200):
        if sub._call is not None:
            break
        await asyncio.sleep(0.01)
    await first.app.stop(grace=0)  # the stream ends with UNAVAILABLE: the subscription keeps reconnecting
    for _ in range(300):
        if sub.reconnects >= 2:
            break
        await asyncio.sleep(0.01)
    assert sub.reconnects >= 2
    await sub.close()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(consumer, 5)
    await client.close()
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() if "_consume_request_iterator" in repr(t.get_coro())]
    assert left == [] and problems == [], (left, problems)
