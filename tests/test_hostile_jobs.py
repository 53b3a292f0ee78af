"""JobService.Schedule read as an attacker would, beyond tests/test_hostile_calls.py (times and spans) and
tests/test_fuzz_rpcs.py: pathological cron expressions and time zones are a clear INVALID_ARGUMENT on their field
within milliseconds (cronsim refuses impossible dates such as Feb 30 when it parses, never searching for one), and a
target's input that JSON cannot carry is refused rather than stored."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from ductape.processor.v1 import job_pb2, job_pb2_grpc
from google.protobuf import struct_pb2

from tests import test_hostile_calls
from tests.conftest import Running
from tests.test_hostile_calls import _schedule, _span

shop = test_hostile_calls.shop  # a started processor with a product whose broker topic a job can publish to


@pytest.mark.parametrize(
    ("cron", "says"),
    [
        ("0 0 30 2 *", "Bad day-of-month"),  # never matches: croniter would search years for it
        ("0 0 31 2,4,6,9,11 *", "Bad day-of-month"),
        ("0 0 0 30 2 *", "Bad day-of-month"),  # with seconds
        ("0 0 30W 2 *", "Bad day-of-month"),
        ("0 0 15W * *", "Bad day-of-month"),  # 'W' is only taken as LW
        ("0 0 * * 1#6", "Bad day-of-week"),
        ("0 0 ? * *", "Bad day-of-month"),
        ("*/0 * * * *", "Bad minute"),
        ("1-" + "9" * 900 + " * * * *", "Bad minute"),
        ("0 0 1 1 * 2099", "Bad day-of-week"),  # no year field: a sixth field is seconds, first
        ("0 0 1 1 1 1 1", "5 or 6 fields, not 7"),
        ("* " * 400, "5 or 6 fields, not 400"),
        ("x" * 5000, "longer than 1000 characters"),
        ("0\x00 0 * * *", "Bad minute"),
        ("@daily", "5 or 6 fields, not 1"),
    ],
)
async def test_a_pathological_cron_is_invalid_argument_on_repeat_cron_at_once(
    shop: Running, cron: str, says: str
) -> None:
    async with shop.channel() as channel:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await job_pb2_grpc.JobServiceStub(channel).Schedule(_schedule(repeat=job_pb2.Repeat(cron=cron)), timeout=10)
        took = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert (caught.value.details() or "").startswith("repeat.cron:") and says in (caught.value.details() or "")
    assert took < 1.0


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
async def test_an_input_holding_nan_or_infinity_is_invalid_argument_on_target_input(
    shop: Running, number: float
) -> None:
    """A Struct's double can be NaN or infinite: the job was stored, its action sent `Infinity` upstream (not JSON),
    and the Python client could not read its Get (json_format refuses non-finite numbers)."""
    given = struct_pb2.Struct()
    given.update({"message": {"deep": [1, {"n": number}]}})
    request = _schedule(delay=_span(3600))
    request.target.input.CopyFrom(given)
    async with shop.channel() as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Schedule(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert (caught.value.details() or "").startswith("target.input:"), caught.value.details()
        listed = await stub.List(job_pb2.JobServiceListRequest(product="shop", env="dev"), timeout=10)
    assert list(listed.jobs) == []
