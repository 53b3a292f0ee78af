"""Jobs (JobService) on both stores, against a real upstream and the memory broker, with an injected clock: time is
moved on by the test, never slept through. What a job did is observed from outside: the calls the upstream counted,
what a subscriber received, the runs JobService lists."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from aiohttp import web
from ductape.processor.v1 import job_pb2
from google.protobuf import json_format

from tests.jobs_harness import START, Jobs, jobs_fixture, moment, seconds, settled, stamp, until  # noqa: F401 - the fixture

_SUCCEEDED = job_pb2.RUN_STATUS_SUCCEEDED
_SKIPPED = job_pb2.RUN_STATUS_SKIPPED


def _at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


async def test_a_delayed_job_runs_once_at_its_due_time_not_before(jobs: Jobs) -> None:
    scheduled = await jobs.schedule(delay=seconds(30))
    assert scheduled.status == job_pb2.JOB_STATUS_SCHEDULED
    assert moment(scheduled.next_run_at) == START + timedelta(seconds=30)
    jobs.clock.advance(timedelta(seconds=29))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 0
    jobs.clock.advance(timedelta(seconds=1))
    [run] = await settled(jobs, scheduled.job_id, 1)
    assert jobs.hits() == 1
    assert run.status == job_pb2.RUN_STATUS_SUCCEEDED
    assert run.attempts == 1 and run.process_id
    assert moment(run.due_time) == START + timedelta(seconds=30)
    assert moment(run.start_time) >= moment(run.due_time)
    assert run.lateness.ToTimedelta() >= timedelta(0)
    assert json_format.MessageToDict(run.result)["status_code"] == 200
    job = await jobs.job(scheduled.job_id)
    assert job.status == job_pb2.JOB_STATUS_COMPLETED and job.runs == 1 and not job.HasField("next_run_at")


async def test_a_job_at_start_at_runs_then_is_completed(jobs: Jobs) -> None:
    scheduled = await jobs.schedule(start_at=stamp(START + timedelta(hours=1)))
    jobs.clock.advance(timedelta(hours=2))
    [run] = await settled(jobs, scheduled.job_id, 1)
    assert moment(run.due_time) == START + timedelta(hours=1)
    assert jobs.hits() == 1


async def test_every_runs_each_interval_until_its_limit(jobs: Jobs) -> None:
    repeat = job_pb2.Repeat(every=seconds(60), limit=3)
    scheduled = await jobs.schedule(repeat=repeat)
    await settled(jobs, scheduled.job_id, 1)
    for step in (1, 2):
        jobs.clock.advance(timedelta(seconds=60))
        await settled(jobs, scheduled.job_id, step + 1)
    jobs.clock.advance(timedelta(seconds=600))
    await asyncio.sleep(0.3)
    runs = await jobs.runs(scheduled.job_id)
    assert [moment(r.due_time) - START for r in runs] == [timedelta(seconds=s) for s in (0, 60, 120)]
    assert jobs.hits() == 3
    assert (await jobs.job(scheduled.job_id)).status == job_pb2.JOB_STATUS_COMPLETED


async def test_end_at_stops_a_repeat(jobs: Jobs) -> None:
    repeat = job_pb2.Repeat(every=seconds(60), end_at=stamp(START + timedelta(seconds=90)))
    scheduled = await jobs.schedule(repeat=repeat)
    await settled(jobs, scheduled.job_id, 1)
    jobs.clock.advance(timedelta(seconds=60))
    await settled(jobs, scheduled.job_id, 2)
    jobs.clock.advance(timedelta(seconds=60))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 2
    assert (await jobs.job(scheduled.job_id)).status == job_pb2.JOB_STATUS_COMPLETED


@pytest.mark.parametrize(
    ("start", "first", "second"),
    [
        # London falls back on 25 October 2026: 01:30 happens twice (00:30Z and 01:30Z); the job runs once.
        (
            datetime(2026, 10, 24, 12, tzinfo=UTC),
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
            datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
        ),
        # London springs forward on 29 March 2026: 01:30 does not exist; the job runs at 02:00 BST (01:00Z).
        (
            datetime(2026, 3, 28, 12, tzinfo=UTC),
            datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
            datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
        ),
    ],
    ids=["fall-back", "spring-forward"],
)
async def test_cron_in_a_time_zone_runs_once_across_a_dst_change(
    jobs: Jobs, start: datetime, first: datetime, second: datetime
) -> None:
    jobs.clock.set(start)
    scheduled = await jobs.schedule(repeat=job_pb2.Repeat(cron="30 1 * * *", timezone="Europe/London"))
    assert moment(scheduled.next_run_at) == first
    jobs.clock.set(first)
    await settled(jobs, scheduled.job_id, 1)
    assert moment((await jobs.job(scheduled.job_id)).next_run_at) == second
    jobs.clock.set(second - timedelta(seconds=1))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 1
    jobs.clock.set(second)
    runs = await settled(jobs, scheduled.job_id, 2)
    assert [moment(r.due_time) for r in runs] == [first, second]


async def test_cancel_pause_resume_and_trigger_now(jobs: Jobs) -> None:
    scheduled = await jobs.schedule(
        repeat=job_pb2.Repeat(every=seconds(60)), start_at=stamp(START + timedelta(seconds=60))
    )
    ref = jobs.ref(scheduled.job_id)
    paused = (await jobs.stub.Pause(job_pb2.JobServicePauseRequest(job=ref))).job
    assert paused.status == job_pb2.JOB_STATUS_PAUSED
    jobs.clock.advance(timedelta(seconds=150))  # due at +60 and +120; only +120 is within the 1 min catch-up
    await asyncio.sleep(0.3)
    assert jobs.hits() == 0
    triggered = (await jobs.stub.TriggerNow(job_pb2.JobServiceTriggerNowRequest(job=ref))).run
    assert triggered.trigger == job_pb2.RUN_TRIGGER_MANUAL
    await asyncio.sleep(0.3)
    assert jobs.hits() == 0  # a paused job's runs wait for Resume
    resumed = (await jobs.stub.Resume(job_pb2.JobServiceResumeRequest(job=ref))).job
    assert resumed.status == job_pb2.JOB_STATUS_SCHEDULED
    runs = await settled(jobs, scheduled.job_id, 2)  # the trigger, and the occurrence within the catch-up window
    assert {r.trigger for r in runs} == {job_pb2.RUN_TRIGGER_MANUAL, job_pb2.RUN_TRIGGER_SCHEDULE}
    cancelled = (await jobs.stub.Cancel(job_pb2.JobServiceCancelRequest(job=ref))).job
    assert cancelled.status == job_pb2.JOB_STATUS_CANCELLED and not cancelled.HasField("next_run_at")
    jobs.clock.advance(timedelta(hours=1))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.stub.Cancel(job_pb2.JobServiceCancelRequest(job=ref))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_catch_up_after_downtime_runs_only_what_is_within_the_window(jobs: Jobs) -> None:
    scheduled = await jobs.schedule(repeat=job_pb2.Repeat(every=seconds(60)), catch_up_window=seconds(150))
    await settled(jobs, scheduled.job_id, 1)
    jobs.clock.advance(timedelta(hours=1))  # 59 occurrences were missed; those within 150 s of now still run
    await until(lambda: jobs.hits() >= 2, "the catch-up run")
    await asyncio.sleep(0.5)
    runs = await settled(jobs, scheduled.job_id, 2)
    late = [moment(r.due_time) for r in runs[1:]]
    assert all(START + timedelta(hours=1) - moment_ <= timedelta(seconds=150) for moment_ in late)
    assert 2 <= jobs.hits() <= 4


async def test_retries_with_backoff_then_the_run_and_the_one_off_job_fail(jobs: Jobs) -> None:
    jobs.upstream.on("POST /fail", lambda request: web.json_response({"no": True}, status=503))
    retry = job_pb2.JobRetryPolicy(max_retries=2, initial_delay=seconds(10), jitter=False)
    scheduled = await jobs.schedule("up:fail", retry=retry)
    await until(lambda: jobs.hits("/fail") == 1, "the first attempt")
    await until(
        lambda: _status(jobs, scheduled.job_id, job_pb2.RUN_STATUS_RETRYING), "the run waiting for its first retry"
    )
    jobs.clock.advance(timedelta(seconds=9))
    await asyncio.sleep(0.3)
    assert jobs.hits("/fail") == 1
    jobs.clock.advance(timedelta(seconds=1))
    await until(lambda: jobs.hits("/fail") == 2, "the first retry, 10 s later")
    await until(lambda: _status(jobs, scheduled.job_id, job_pb2.RUN_STATUS_RETRYING), "the second wait")
    jobs.clock.advance(timedelta(seconds=20))  # x2
    [run] = await settled(jobs, scheduled.job_id, 1)
    assert jobs.hits("/fail") == 3
    assert run.status == job_pb2.RUN_STATUS_FAILED and run.attempts == 3
    assert run.error_reason == "UPSTREAM_STATUS"
    assert (await jobs.job(scheduled.job_id)).status == job_pb2.JOB_STATUS_FAILED


async def _status(jobs: Jobs, job_id: str, status: int) -> bool:
    runs = await jobs.runs(job_id)
    return bool(runs) and runs[-1].status == status


@pytest.mark.parametrize(
    ("overlap", "expected"),
    [
        (
            job_pb2.OVERLAP_POLICY_SKIP,
            [job_pb2.RUN_STATUS_SUCCEEDED, job_pb2.RUN_STATUS_SKIPPED, job_pb2.RUN_STATUS_SKIPPED],
        ),
        (
            job_pb2.OVERLAP_POLICY_BUFFER_ONE,
            [job_pb2.RUN_STATUS_SUCCEEDED, job_pb2.RUN_STATUS_SUCCEEDED, job_pb2.RUN_STATUS_SKIPPED],
        ),
        (job_pb2.OVERLAP_POLICY_ALLOW, [job_pb2.RUN_STATUS_SUCCEEDED] * 3),
    ],
    ids=["skip", "buffer_one", "allow"],
)
async def test_overlap_policies(jobs: Jobs, overlap: int, expected: list[int]) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"ok": True})

    jobs.upstream.on("POST /slow", slow)
    scheduled = await jobs.schedule("up:slow", repeat=job_pb2.Repeat(every=seconds(10)), overlap=overlap)
    await until(lambda: jobs.hits("/slow") == 1, "the first run to start")
    for _ in range(2):  # two occurrences fall due while the first run is going
        count = len(await jobs.runs(scheduled.job_id))
        jobs.clock.advance(timedelta(seconds=10))
        await until(lambda c=count: _more_runs(jobs, scheduled.job_id, c), "the occurrence recorded")
    await jobs.stub.Pause(job_pb2.JobServicePauseRequest(job=jobs.ref(scheduled.job_id)))
    release.set()
    await jobs.stub.Resume(job_pb2.JobServiceResumeRequest(job=jobs.ref(scheduled.job_id)))
    runs = await settled(jobs, scheduled.job_id, 3)
    assert [r.status for r in runs][:3] == expected


async def _more_runs(jobs: Jobs, job_id: str, count: int) -> bool:
    return len(await jobs.runs(job_id)) > count


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"repeat": job_pb2.Repeat(cron="61 * * * *")}, "repeat.cron"),
        ({"repeat": job_pb2.Repeat(cron="* * *")}, "repeat.cron"),
        ({"repeat": job_pb2.Repeat(cron="0 * * * *", timezone="Mars/Olympus")}, "repeat.timezone"),
        ({"repeat": job_pb2.Repeat(every=seconds(60), end_at=stamp(START - timedelta(seconds=1)))}, "repeat.end_at"),
        ({"event": "up:nope"}, "target.address"),
        ({"event": "nope:ping"}, "target.address"),
        ({"event": "events:ticks"}, "target.address"),
        ({"delay": seconds(5), "start_at": stamp(START)}, "delay"),
        # hostile sizes: a 700 KB cron list would hold the event loop for seconds at every parse
        ({"repeat": job_pb2.Repeat(cron=",".join(["0-59"] * 140_000) + " * * * *")}, "repeat.cron"),
        ({"repeat": job_pb2.Repeat(cron="0 * * * *", timezone="Europe/" + "x" * 100)}, "repeat.timezone"),
        ({"repeat": job_pb2.Repeat(cron="0 * * * *", timezone="../../../etc/passwd")}, "repeat.timezone"),
        ({"name": "n" * 201}, "name"),
        ({"name": "bad\nname"}, "name"),
        ({"idempotency_key": "k" * 257}, "idempotency_key"),
    ],
    ids=[
        "cron-range",
        "cron-fields",
        "timezone",
        "end_at-past",
        "no-action",
        "no-app",
        "kind-mismatch",
        "both-times",
        "cron-huge",
        "timezone-long",
        "timezone-path",
        "name-long",
        "name-control",
        "key-long",
    ],
)
async def test_bad_schedules_are_invalid_argument_naming_the_field(
    jobs: Jobs, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.schedule(**fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_a_name_is_unique_among_active_jobs_unless_replaced(jobs: Jobs) -> None:
    first = await jobs.schedule(name="nightly", delay=seconds(3600))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.schedule(name="nightly", delay=seconds(3600))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    jobs.clock.advance(timedelta(seconds=1))  # newest first: the second job is newer
    second = await jobs.schedule(name="nightly", delay=seconds(7200), replace=True)
    assert (await jobs.job(first.job_id)).status == job_pb2.JOB_STATUS_CANCELLED
    named = await jobs.stub.Get(
        job_pb2.JobServiceGetRequest(job=job_pb2.JobRef(product="shop", env="dev", name="nightly"))
    )
    assert named.job.job_id == second.job_id
    listed = await jobs.stub.List(job_pb2.JobServiceListRequest(product="shop", env="development", name="nightly"))
    assert [j.job_id for j in listed.jobs] == [second.job_id, first.job_id]
    active = await jobs.stub.List(
        job_pb2.JobServiceListRequest(product="shop", env="dev", status=job_pb2.JOB_STATUS_SCHEDULED)
    )
    assert [j.job_id for j in active.jobs] == [second.job_id]


async def test_an_idempotency_key_answers_the_first_job(jobs: Jobs) -> None:
    first = await jobs.schedule(delay=seconds(60), idempotency_key="k1")
    again = await jobs.schedule(delay=seconds(60), idempotency_key="k1")
    assert again.job_id == first.job_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.schedule(delay=seconds(90), idempotency_key="k1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_publish_job_is_seen_by_a_subscriber_and_watch_runs_streams_its_runs(jobs: Jobs) -> None:
    subscription = jobs.running.client.message_broker.subscribe(
        product="shop", env="dev", event="events:ticks", group="g"
    )
    received: list[bytes] = []

    async def consume() -> None:
        async for message in subscription:
            received.append(message.data)
            await message.ack()

    consumer = asyncio.ensure_future(consume())
    watch = jobs.stub.WatchRuns(job_pb2.JobServiceWatchRunsRequest(product="shop", env="dev"))
    events: list[job_pb2.JobRun] = []

    async def follow() -> None:
        async for event in watch:
            events.append(event.run)

    follower = asyncio.ensure_future(follow())
    await asyncio.sleep(0.5)  # both streams open
    scheduled = await jobs.schedule(
        "events:ticks", kind=job_pb2.TARGET_KIND_PUBLISH, input={"message": {"tick": 1}}, delay=seconds(5)
    )
    jobs.clock.advance(timedelta(seconds=5))
    await until(lambda: bool(received), "the subscriber to receive the job's message")
    assert received == [b'{"tick":1}']
    await until(lambda: any(e.status == job_pb2.RUN_STATUS_SUCCEEDED for e in events), "the run's end event")
    assert {e.job_id for e in events} == {scheduled.job_id}
    assert [e.status for e in events][-1] == job_pb2.RUN_STATUS_SUCCEEDED
    assert job_pb2.RUN_STATUS_RUNNING in [e.status for e in events]
    watch.cancel()
    for task in (consumer, follower):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
    await subscription.close()


async def test_the_python_client_schedules_reads_runs_and_cancels(jobs: Jobs) -> None:
    client = jobs.running.client.job
    scheduled = await client.schedule(
        product="shop", env="dev", event="up:ping", input={"body": {"n": 1}}, repeat={"every": 60}, name="pinger"
    )
    assert scheduled.status == "scheduled" and scheduled.next_run_at == START
    await settled(jobs, scheduled.job_id, 1)
    jobs.clock.advance(timedelta(seconds=60))
    await settled(jobs, scheduled.job_id, 2)
    runs = [run async for run in client.runs(product="shop", env="dev", name="pinger")]
    assert [run.status for run in runs] == ["succeeded", "succeeded"]
    assert runs[0].due_at == START + timedelta(seconds=60) and runs[0].result["status_code"] == 200
    page = await client.list(product="shop", env="dev", kind="action", status="scheduled")
    assert [job.job_id for job in page.jobs] == [scheduled.job_id] and page.jobs[0].runs == 2
    cancelled = await client.cancel(product="shop", env="dev", job_id=scheduled.job_id)
    assert cancelled.status == "cancelled" and cancelled.next_run_at is None
