"""FeatureService, JobService and WebhookService read as an attacker would: times and spans at the ends of what a
datetime holds."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from ductape.processor.v1 import job_pb2, job_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from tests.conftest import Running, ServerFactory

YEAR_S = 365 * 86_400
PRODUCT = b"""
product: shop
environments: [{slug: dev}]
brokers: [{tag: events, envs: {dev: {type: memory}}, topics: [{tag: done, name: done}]}]
"""


@pytest.fixture
async def shop(start_server: ServerFactory) -> Running:
    running = await start_server()
    await running.client.product.apply(PRODUCT)
    return running


def _schedule(**fields: Any) -> job_pb2.JobServiceScheduleRequest:
    return job_pb2.JobServiceScheduleRequest(
        product="shop",
        env="dev",
        target=job_pb2.JobTarget(kind=job_pb2.TARGET_KIND_PUBLISH, address="events:done"),
        **fields,
    )


def _span(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


async def test_a_schedule_with_a_time_or_span_out_of_bounds_is_invalid_argument_on_that_field(shop: Running) -> None:
    """Found by tests/test_fuzz_rpcs.py: a `start_at` in year 0 answered INTERNAL (the conversion raised); the
    bounds keep every later sum of a job's times inside what a datetime holds."""
    now = int(time.time())
    bad = {
        "start_at": _schedule(start_at=timestamp_pb2.Timestamp(seconds=-62_135_596_800 - 86_400)),
        "start_at ": _schedule(start_at=timestamp_pb2.Timestamp(seconds=now + 101 * YEAR_S)),
        "delay": _schedule(delay=_span(2**62)),
        "delay ": _schedule(delay=_span(101 * YEAR_S)),
        "delay  ": _schedule(delay=_span(-1)),
        "repeat.every": _schedule(repeat=job_pb2.Repeat(every=_span(315_576_000_000))),
        "repeat.every ": _schedule(repeat=job_pb2.Repeat(every=_span(5, -1))),
        "repeat.end_at": _schedule(
            repeat=job_pb2.Repeat(every=_span(60), end_at=timestamp_pb2.Timestamp(seconds=2**62))
        ),
        "retry.max_retries": _schedule(retry=job_pb2.JobRetryPolicy(max_retries=2**31 - 1)),
        "retry.initial_delay": _schedule(retry=job_pb2.JobRetryPolicy(max_retries=1, initial_delay=_span(0))),
        "retry.max_delay": _schedule(retry=job_pb2.JobRetryPolicy(max_retries=1, max_delay=_span(200 * YEAR_S))),
        "catch_up_window": _schedule(catch_up_window=_span(-5)),
        "catch_up_window ": _schedule(catch_up_window=_span(5000 * YEAR_S)),
    }
    async with shop.channel() as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        for field, request in bad.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Schedule(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, caught.value.details())
            assert (caught.value.details() or "").startswith(field.strip() + ":"), (field, caught.value.details())
        # The ends of the bounds are accepted: a start 99 years ahead on a cron, a century-long catch-up window.
        far = timestamp_pb2.Timestamp(seconds=now + 99 * YEAR_S)
        job = await stub.Schedule(
            _schedule(start_at=far, repeat=job_pb2.Repeat(cron="0 0 29 2 1"), catch_up_window=_span(99 * YEAR_S)),
            timeout=10,
        )
        assert job.next_run_at.seconds >= far.seconds
