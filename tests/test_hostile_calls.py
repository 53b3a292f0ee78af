"""FeatureService, JobService and WebhookService read as an attacker would: times and spans at the ends of what a
datetime holds, waits without end, pages larger than a gRPC message, numbers JSON cannot carry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ductape.processor import InvalidArgumentError
from ductape.processor.v1 import feature_pb2, feature_pb2_grpc, job_pb2, job_pb2_grpc, log_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import Running, ServerFactory
from tests.features_harness import Ops, op, start_ops, step
from tests.features_harness import manifest as feature_manifest

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


async def test_an_enum_value_the_api_does_not_define_is_invalid_argument_not_a_default(shop: Running) -> None:
    """An unknown `overlap` was scheduled as `skip`, an unknown List `target_kind` listed every job: each call did
    something other than what it asked for."""
    async with shop.channel() as channel:
        stub = job_pb2_grpc.JobServiceStub(channel)
        await stub.Schedule(_schedule(delay=_span(3600)), timeout=10)
        unknown_kind = job_pb2.JobServiceScheduleRequest(
            product="shop",
            env="dev",
            target=job_pb2.JobTarget(kind=77, address="events:done"),
        )
        calls = {
            "overlap": stub.Schedule(_schedule(overlap=42), timeout=10),
            "target_kind": stub.List(
                job_pb2.JobServiceListRequest(product="shop", env="dev", target_kind=99), timeout=10
            ),
            "target.kind": stub.Schedule(unknown_kind, timeout=10),
        }
        for field, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, caught.value.details())
            assert (caught.value.details() or "").startswith(f"{field}: "), caught.value.details()
        listed = await stub.List(
            job_pb2.JobServiceListRequest(product="shop", env="dev", target_kind=job_pb2.TARGET_KIND_PUBLISH)
        )
        assert len(listed.jobs) == 1


# -- FeatureService: a wait that does not end --------------------------------------------------------------------------


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    state = await start_ops()
    yield state
    await state.server.close()


async def test_a_wait_without_a_deadline_or_with_a_far_one_answers_after_the_longest_wait(
    start_server: ServerFactory, ops: Ops
) -> None:
    running = await start_server(feature_max_wait_s=0.5)
    await running.client.product.apply(feature_manifest(ops.url, {"tag": "slow", "sequence": [step("s", op("hang"))]}))
    ops.delay["hang"] = 3.0
    async with running.channel() as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        request = feature_pb2.FeatureServiceRunRequest(product="shop", env="dev", feature="slow", wait=True)
        for timeout in (None, 3600.0):
            started = time.monotonic()
            answer = await asyncio.wait_for(stub.Run(request, timeout=timeout), 10)
            took = time.monotonic() - started
            assert answer.run.status == feature_pb2.FEATURE_RUN_STATUS_RUNNING, timeout
            assert 0.4 <= took < 5, (timeout, took)
        replay = feature_pb2.FeatureServiceReplayRequest(run=_ref(answer.run.process_id), wait=True)
        assert (await asyncio.wait_for(stub.Replay(replay), 10)).run.status == feature_pb2.FEATURE_RUN_STATUS_RUNNING
        # A deadline sooner than the bound still decides: the run as it stands, before the deadline.
        started = time.monotonic()
        answer = await stub.Run(request, timeout=0.45)
        assert answer.run.status == feature_pb2.FEATURE_RUN_STATUS_RUNNING and time.monotonic() - started < 0.45


def _ref(process_id: str) -> feature_pb2.FeatureRunRef:
    return feature_pb2.FeatureRunRef(product="shop", env="dev", process_id=process_id)


class SlowJournalStore(SqliteStore):
    """The embedded store, with the feature journal's writes a second late (a store under load)."""

    async def write_features(self, *args: Any, **kwargs: Any) -> set[str]:
        await asyncio.sleep(1.0)
        return await super().write_features(*args, **kwargs)


async def test_a_wait_that_ends_before_the_run_is_written_answers_the_run_not_not_found(
    start_server: ServerFactory, ops: Ops, tmp_path: Path
) -> None:
    """A run that is waited for is written by the journal in the background; a wait that ended before the write read
    the store, and the caller got FEATURE_RUN_NOT_FOUND for the run it had just started (seen under load)."""
    store = SlowJournalStore(tmp_path / "slow.db")
    await store.open()
    running = await start_server(store=store)
    await running.client.product.apply(feature_manifest(ops.url, {"tag": "slow", "sequence": [step("s", op("hang"))]}))
    ops.delay["hang"] = 3.0
    async with running.channel() as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        request = feature_pb2.FeatureServiceRunRequest(product="shop", env="dev", feature="slow", wait=True)
        answer = await stub.Run(request, timeout=0.5)
    assert answer.run.status == feature_pb2.FEATURE_RUN_STATUS_RUNNING and answer.run.process_id
    assert answer.run.input == struct_pb2.Struct() and answer.run.create_time.seconds > 0


# -- listings: pages no larger than a gRPC message ---------------------------------------------------------------------


async def test_a_listing_of_large_items_pages_within_a_message(start_server: ServerFactory, ops: Ops) -> None:
    """Three runs of 1.5 MB inputs make 4.5 MB: a page of them would outgrow the 4 MiB a gRPC message may be, and the
    caller would get RESOURCE_EXHAUSTED for any page size. The page stops short instead, with a token for the rest."""
    running = await start_server()
    await running.client.product.apply(feature_manifest(ops.url, {"tag": "big", "sequence": [step("s", op("ok"))]}))
    text = "x" * 1_500_000
    started = [
        (await running.client.feature.run(product="shop", env="dev", feature="big", input={"text": text, "n": n}))
        for n in range(3)
    ]
    seen: list[str] = []
    token = ""
    async with running.channel() as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        for _ in range(4):
            request = feature_pb2.FeatureServiceListRequest(product="shop", env="dev", page_size=1000, page_token=token)
            page = await stub.List(request, timeout=10)
            assert 1 <= len(page.runs) <= 2 and page.ByteSize() < 4 * 1024 * 1024
            seen += [run.process_id for run in page.runs]
            token = page.next_page_token
            if not token:
                break
    assert sorted(seen) == sorted(run.process_id for run in started)


# -- WebhookService: a payload JSON cannot carry -----------------------------------------------------------------------


async def test_an_emit_whose_payload_holds_nan_or_infinity_is_invalid_argument(
    start_server: ServerFactory,
) -> None:
    """A Value's double can be NaN or infinite; the body was `{"data":NaN}`, which no subscriber's JSON reader takes."""
    running = await start_server()
    await running.client.product.apply(PRODUCT + b"webhooks: [{tag: orders, events: [{tag: paid}]}]\n")
    for payload in ({"amount": float("nan")}, [1, float("inf")], float("-inf"), {"a": {"b": [float("nan")]}}):
        with pytest.raises(InvalidArgumentError) as caught:
            await running.client.webhook.emit(product="shop", env="dev", event="orders:paid", payload=payload)
        assert [v.field for v in caught.value.field_violations] == ["payload"], payload
    emitted = await running.client.webhook.emit(product="shop", env="dev", event="orders:paid", payload={"amount": 1.5})
    assert emitted.message_id
    page = await running.client.logs.list_executions(product="shop")
    assert [e.status for e in page.executions].count(log_pb2.EXECUTION_STATUS_FAIL) == 4, "each refusal is recorded"


# -- page tokens of the newer listings ---------------------------------------------------------------------------------


async def test_a_forged_page_token_of_a_newer_listing_is_invalid_argument_or_a_page_of_its_own(
    start_server: ServerFactory, ops: Ops
) -> None:
    """The fingerprint of a page token is no secret: a caller can forge one with any position. A position that does
    not read (a time past year 9999, not a number) is INVALID_ARGUMENT on `page_token`; one that reads gives a page of
    the caller's own listing, never INTERNAL."""
    running = await start_server()
    await running.client.product.apply(
        feature_manifest(ops.url, {"tag": "f", "sequence": [step("s", op("ok"))]}).replace(
            b'"features"', b'"webhooks": [{"tag": "orders", "events": [{"tag": "paid"}]}], "features"'
        )
    )
    job = await running.client.job.schedule(product="shop", env="dev", kind="feature", event="f", delay=3600)
    await running.client.feature.run(product="shop", env="dev", feature="f")
    listings: dict[tuple[str, ...], Any] = {
        ("feature_runs", "shop", "dev", "", ""): lambda token: running.client.feature.list(
            product="shop", env="dev", page_token=token
        ),
        ("jobs", "shop", "dev", "", "", ""): lambda token: running.client.job.list(
            product="shop", env="dev", page_token=token
        ),
        ("job_runs", job.job_id, ""): lambda token: running.client.job.list_runs(
            product="shop", env="dev", job_id=job.job_id, page_token=token
        ),
        ("webhook deliveries", "shop", "dev", "", "", ""): lambda token: running.client.webhook.list_deliveries(
            product="shop", env="dev", page_token=token
        ),
        ("webhooks received", "shop", "dev", ""): lambda token: running.client.webhook.list_received(
            product="shop", env="dev", page_token=token
        ),
    }
    unreadable = ([1e300, "x"], [-1e15, "x"], ["now", "x"], [1.0, 5], [float("nan"), "x"], [True, "x"], [])
    readable = ([2.5e11, "zzz"], [-6e10, ""], [0, "\x00"], [1.7e9, "x" * 500])
    for listing, call in listings.items():
        for position in unreadable:
            with pytest.raises(InvalidArgumentError) as caught:
                await call(_forged(listing, position))
            assert [v.field for v in caught.value.field_violations] == ["page_token"], (listing, position)
        for position in readable:
            await call(_forged(listing, position))


def _forged(listing: tuple[str, ...], position: list[Any]) -> str:
    fingerprint = hashlib.sha256(json.dumps(list(listing)).encode()).hexdigest()[:16]
    raw = json.dumps([fingerprint, *position]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
