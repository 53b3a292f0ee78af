"""Webhook deliveries are durable and claimed once: they survive a restart of the processor, and two replicas on one
PostgreSQL store make each attempt of each delivery once per schedule step (the endpoint counts them)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from ductape.processor.v1 import webhook_pb2

from ductape_processor.store import Store
from ductape_processor.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN, ServerFactory
from tests.jobs_harness import FakeClock
from tests.test_webhooks import Endpoint, manifest, secrets_file
from tests.test_webhooks import endpoint as endpoint  # the fixture


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_a_pending_delivery_survives_a_restart(
    store_factory: Callable[[], Awaitable[Store]], start_server: ServerFactory, endpoint: Endpoint, tmp_path: Path
) -> None:
    clock = FakeClock()
    first = await start_server(store=await store_factory(), clock=clock, secrets_file=secrets_file(tmp_path))
    await first.client.product.apply(manifest(endpoint.url, schedule="[10s]").encode())
    emitted = await first.client.webhook.emit(product="shop", env="dev", event="orders:paid", payload={"orderId": "1"})
    await first.app.stop(grace=0)
    assert endpoint.received == []

    second = await start_server(store=await store_factory(), clock=clock, secrets_file=secrets_file(tmp_path))
    clock.advance(timedelta(seconds=10))
    await wait_for(lambda: len(endpoint.received) == 1)
    assert endpoint.received[0][0]["webhook-id"] == emitted.message_id
    statuses: list[int] = []

    async def succeeded() -> bool:  # the attempt's end is written a moment after the endpoint answered
        ref = {"product": "shop", "env": "dev", "delivery_id": emitted.delivery_ids[0]}
        statuses.append((await second.client.webhook.get_delivery(**ref)).status)
        return statuses[-1] == webhook_pb2.DELIVERY_STATUS_SUCCEEDED

    for _ in range(200):
        if await succeeded():
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == webhook_pb2.DELIVERY_STATUS_SUCCEEDED


async def test_two_replicas_on_postgresql_attempt_each_delivery_once_per_schedule_step(
    pg_schema: str, start_server: ServerFactory, endpoint: Endpoint, tmp_path: Path
) -> None:
    clock = FakeClock()
    replicas = [
        await start_server(
            store=PostgresStore(POSTGRES_DSN, pg_schema), clock=clock, secrets_file=secrets_file(tmp_path)
        )
        for _ in range(2)
    ]
    await replicas[0].client.product.apply(manifest(endpoint.url, schedule="[0, 5s, 5s, 5s]").encode())
    endpoint.answers = [500] * 1000
    messages = 40
    emitted = await asyncio.gather(
        *(
            replicas[n % 2].client.webhook.emit(
                product="shop", env="dev", event="orders:paid", payload={"orderId": str(n)}
            )
            for n in range(messages)
        )
    )
    ids = {e.message_id for e in emitted}
    for step in range(1, 5):
        await wait_for(lambda step=step: len(endpoint.received) >= messages * step)  # type: ignore[misc]
        await asyncio.sleep(0.3)  # a second attempt of any of them would arrive now
        counts = Counter(headers["webhook-id"] for headers, _ in endpoint.received)
        assert set(counts) == ids
        assert set(counts.values()) == {step}, f"step {step}: {Counter(counts.values())}"
        clock.advance(timedelta(seconds=5))
    owners = {replica.app.components.webhooks.worker.owner for replica in replicas}
    assert len(owners) == 2
    failed = await replicas[1].client.webhook.list_deliveries(
        product="shop", env="dev", status=webhook_pb2.DELIVERY_STATUS_FAILED, page_size=100
    )
    assert len(failed.deliveries) == messages
