"""The jobs tests' harness: a clock the test moves on, a processor serving a test product whose action calls a
real upstream and whose topic is on the memory broker, and waits bounded in real time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ductape.processor.v1 import job_pb2, job_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from ductape_processor.store import Store
from tests.conftest import Running, ServerFactory
from tests.upstream import Upstream

START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock the test moves on; a scheduler waiting for a moment wakes once the clock reaches it."""

    def __init__(self, now: datetime = START) -> None:
        self._now = now
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    async def wait_until(self, moment: datetime, wake: asyncio.Event) -> None:
        while self._now < moment and not wake.is_set():
            moved = asyncio.ensure_future(self._moved.wait())
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
            for task in (moved, woken):
                task.cancel()

    def set(self, moment: datetime) -> None:
        self._now = moment
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def advance(self, delta: timedelta) -> None:
        self.set(self._now + delta)


def manifest(upstream: str, jobs: str = "") -> bytes:
    """The test product; `jobs`, YAML, is its `jobs` section."""
    return f"""
product: shop
environments: [{{slug: dev, name: development}}]
apps:
  - tag: up
    envs: {{dev: {{base_url: "{upstream}"}}}}
    retry: {{max: 0}}
    actions:
      - {{tag: ping, method: POST, path: /ping}}
      - {{tag: fail, method: POST, path: /fail}}
      - {{tag: slow, method: POST, path: /slow}}
brokers:
  - tag: events
    envs: {{dev: {{type: memory}}}}
    topics: [{{tag: ticks, name: ticks}}]
{jobs}
""".encode()


class Jobs:
    """A started processor with the test product, its JobService stub, the fake clock and the upstream."""

    def __init__(self, running: Running, clock: FakeClock, upstream: Upstream, store: Store) -> None:
        self.running = running
        self.store = store
        self.clock = clock
        self.upstream = upstream
        self.channel = running.channel()
        self.stub = job_pb2_grpc.JobServiceStub(self.channel)

    async def schedule(self, event: str = "up:ping", **fields: Any) -> job_pb2.JobServiceScheduleResponse:
        kind = fields.pop("kind", job_pb2.TARGET_KIND_ACTION)
        target = job_pb2.JobTarget(kind=kind, address=event)
        if "input" in fields:
            target.input.update(fields.pop("input"))
        request = job_pb2.JobServiceScheduleRequest(product="shop", env="dev", target=target, **fields)
        response: job_pb2.JobServiceScheduleResponse = await self.stub.Schedule(request)
        return response

    def ref(self, job_id: str) -> job_pb2.JobRef:
        return job_pb2.JobRef(product="shop", env="dev", job_id=job_id)

    async def job(self, job_id: str) -> job_pb2.Job:
        return (await self.stub.Get(job_pb2.JobServiceGetRequest(job=self.ref(job_id)))).job

    async def runs(self, job_id: str) -> list[job_pb2.JobRun]:
        response = await self.stub.ListRuns(job_pb2.JobServiceListRunsRequest(job=self.ref(job_id)))
        return list(reversed(response.runs))  # oldest first

    def hits(self, path: str = "/ping") -> int:
        return len(self.upstream.hits(path))


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 10.0) -> None:
    """Wait (real time, bounded) until `check()` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def settled(jobs: Jobs, job_id: str, count: int) -> list[job_pb2.JobRun]:
    """The job's runs once `count` of them exist and none is running."""
    ended = (job_pb2.RUN_STATUS_SUCCEEDED, job_pb2.RUN_STATUS_FAILED, job_pb2.RUN_STATUS_SKIPPED)

    async def done() -> bool:
        runs = await jobs.runs(job_id)
        return len(runs) >= count and all(r.status in ended for r in runs)

    await until(done, f"{count} ended runs")
    return await jobs.runs(job_id)


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


def seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(value), nanos=int((value % 1) * 1e9))


def moment(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


@pytest.fixture(name="jobs")
async def jobs_fixture(
    store_factory: Callable[[], Awaitable[Store]], start_server: ServerFactory, upstream: Upstream
) -> AsyncIterator[Jobs]:
    # store_factory first: its stores close after the servers using them stopped.
    clock = FakeClock()
    store = await store_factory()
    running = await start_server(store=store, clock=clock)
    await running.client.product.apply(manifest(upstream.url))
    state = Jobs(running, clock, upstream, store)
    yield state
    await state.channel.close()
