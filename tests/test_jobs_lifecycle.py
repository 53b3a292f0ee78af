"""Jobs over their lifetime: a dead replica's run taken over after its lease, concurrent steps of due jobs on one
database, a job whose stored schedule cannot be read, a job found by its idempotency key, and the jobs a manifest
declares following the version pinned for each environment."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from ductape.processor import InvalidArgumentError
from ductape.processor.v1 import job_pb2

from ductape_processor.runtime.jobs.model import RunTrigger
from ductape_processor.runtime.jobs.scheduler import new_run
from ductape_processor.store import Store
from ductape_processor.store.job_records import JobRecord, JobStatus, JobStep, RunEnd, RunStatus
from tests.jobs_harness import (  # noqa: F401 - the fixture
    START,
    Jobs,
    jobs_fixture,
    manifest,
    seconds,
    settled,
    stamp,
    until,
)


async def test_a_run_whose_runner_died_is_taken_over_after_its_lease_and_says_so(jobs: Jobs) -> None:
    scheduled = await jobs.schedule(delay=seconds(3600))
    job = await jobs.store.get_job(scheduled.job_id)
    assert job is not None
    # A replica that started a run and died: the run is RUNNING under its lease, which nobody renews.
    ghost = new_run(
        job,
        START,
        RunStatus.RUNNING,
        RunTrigger.SCHEDULE,
        attempts=1,
        started_at=START,
        owner="ghost",
        lease_until=START + timedelta(seconds=30),
    )
    await jobs.store.insert_run(ghost)
    jobs.clock.advance(timedelta(seconds=29))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 0
    jobs.clock.advance(timedelta(seconds=1))
    await until(lambda: jobs.hits() == 1, "the run to be taken over")
    [run] = await settled(jobs, scheduled.job_id, 1)
    assert run.run_id == ghost.run_id and run.reclaimed and run.attempts == 2
    assert run.status == job_pb2.RUN_STATUS_SUCCEEDED


def _due_job(job_id: str, spec: str = "{}", key: str = "") -> JobRecord:
    """A scheduled job due at START, stored as the store keeps it (its spec as given)."""
    return JobRecord(
        job_id=job_id,
        product="shop",
        env="dev",
        name=job_id,
        target_kind="action",
        spec=spec,
        status=JobStatus.SCHEDULED,
        next_run_at=START,
        runs=0,
        declared=False,
        idempotency_key=key,
        request_hash="",
        created_at=START,
    )


async def test_an_idempotency_key_finds_the_job_it_scheduled_in_its_environment_only(
    store_factory: Callable[[], Awaitable[Store]],
) -> None:
    store = await store_factory()
    assert await store.job_by_key("shop", "dev", "rcv_1") is None
    await store.insert_job(_due_job("unkeyed"), replace=False, now=START)
    await store.insert_job(_due_job("keyed", key="rcv_1"), replace=False, now=START)
    found = await store.job_by_key("shop", "dev", "rcv_1")
    assert found is not None and found.job_id == "keyed"
    assert await store.job_by_key("shop", "prd", "rcv_1") is None, "a key is scoped to its environment"
    assert await store.job_by_key("shop", "dev", "") is None, "the jobs without a key are no key's"


async def test_replicas_step_each_due_job_once(store_factory: Callable[[], Awaitable[Store]]) -> None:
    first, second = await store_factory(), await store_factory()
    for index in range(40):
        await first.insert_job(_due_job(f"job-{index:02}"), replace=False, now=START)

    def step(job: JobRecord) -> JobStep:
        run = new_run(
            job, START, RunStatus.SUCCEEDED, RunTrigger.SCHEDULE, attempts=1, started_at=START, ended_at=START
        )
        return JobStep(job.job_id, None, JobStatus.COMPLETED, 1, [run])

    # Six claims at once from two replicas, each holding what it takes until its step is written.
    steps = await asyncio.gather(*(store.step_due_jobs(START, 15, step) for store in [first, second] * 3))
    stepped = [s.job_id for claim in steps for s in claim]
    assert sorted(stepped) == [f"job-{index:02}" for index in range(40)]  # each once, none twice
    assert not await second.step_due_jobs(START + timedelta(days=1), 50, step)  # nothing is due any more
    for index in (0, 39):
        job = await first.get_job(f"job-{index:02}")
        assert job is not None and job.status == JobStatus.COMPLETED and job.runs == 1 and job.next_run_at is None
        [run] = await first.list_runs(job.job_id, None, after=None, limit=10)
        assert run.status == RunStatus.SUCCEEDED


async def test_a_job_whose_schedule_cannot_be_read_fails_and_the_others_due_with_it_run(jobs: Jobs) -> None:
    broken = _due_job("broken", spec='{"target": {}}')  # not a spec this processor can read
    await jobs.store.insert_job(broken, replace=False, now=START)
    fine = await jobs.schedule(start_at=stamp(START))
    [run] = await settled(jobs, fine.job_id, 1)
    assert run.status == job_pb2.RUN_STATUS_SUCCEEDED and jobs.hits() == 1
    [failed] = await settled(jobs, "broken", 1)
    assert failed.status == job_pb2.RUN_STATUS_FAILED and failed.error_reason == "INTERNAL"
    assert "cannot be read" in failed.error_message
    stored = await jobs.store.get_job("broken")  # read from the store: JobService.Get reads the spec too
    assert stored is not None and stored.status == JobStatus.FAILED and stored.next_run_at is None
    jobs.clock.advance(timedelta(minutes=5))
    await asyncio.sleep(0.3)
    assert len(await jobs.runs("broken")) == 1  # not claimed again


HEARTBEAT = """
jobs:
  - tag: heartbeat
    target: {kind: action, event: "up:ping"}
    input: {body: {beat: true}}
    repeat: {every: 1m}
    retry: {max_retries: 1}
"""


async def _declared(jobs: Jobs) -> list[job_pb2.Job]:
    listed = await jobs.stub.List(job_pb2.JobServiceListRequest(product="shop", env="dev", name="heartbeat"))
    return [job for job in listed.jobs if job.declared]


async def test_a_declared_job_lives_while_the_pinned_version_declares_it(jobs: Jobs) -> None:
    product = jobs.running.client.product
    declaring = await product.apply(manifest(jobs.upstream.url, HEARTBEAT))
    await product.promote("shop", env="dev", version=declaring.version.version)
    await until(lambda: jobs.hits() == 1, "the declared job's first run")
    [job] = await _declared(jobs)
    assert job.status == job_pb2.JOB_STATUS_SCHEDULED and job.name == "heartbeat"
    assert job.repeat.every.ToTimedelta() == timedelta(minutes=1) and job.retry.max_retries == 1
    dropping = await product.apply(manifest(jobs.upstream.url, "# no jobs any more"))
    await asyncio.sleep(0.3)
    [still] = await _declared(jobs)  # dev is still pinned to the version that declares it
    assert still.status == job_pb2.JOB_STATUS_SCHEDULED and still.job_id == job.job_id
    await product.promote("shop", env="dev", version=dropping.version.version)

    async def cancelled() -> bool:
        return [j.status for j in await _declared(jobs)] == [job_pb2.JOB_STATUS_CANCELLED]

    await until(cancelled, "the job the promoted version drops to be cancelled")
    jobs.clock.advance(timedelta(minutes=5))
    await asyncio.sleep(0.3)
    assert jobs.hits() == 1


@pytest.mark.parametrize(
    ("declaration", "path"),
    [
        ('{tag: j, target: {event: "up:ping"}, repeat: {cron: "61 * * * *"}}', "jobs[0].repeat.cron"),
        ('{tag: j, target: {event: "up:ping"}, repeat: {every: 1m, timezone: Mars/Base}}', "jobs[0].repeat.timezone"),
        ('{tag: j, target: {event: "up:ping"}, repeat: {}}', "jobs[0].repeat"),
        ('{tag: j, target: {event: "up:nope"}, repeat: {every: 1m}}', "jobs[0].target.event"),
        ('{tag: j, target: {kind: publish, event: "up:ping"}, repeat: {every: 1m}}', "jobs[0].target.event"),
    ],
    ids=["cron", "timezone", "no-rhythm", "no-action", "kind-mismatch"],
)
async def test_declared_jobs_are_checked_when_the_manifest_is_applied(jobs: Jobs, declaration: str, path: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await jobs.running.client.product.apply(manifest(jobs.upstream.url, f"jobs: [{declaration}]"))
    assert caught.value.reason == "INVALID_MANIFEST"
    assert any(v.field.startswith(path) for v in caught.value.field_violations), caught.value.field_violations


@pytest.mark.parametrize(
    "end",
    [
        RunEnd(RunStatus.SUCCEEDED, START + timedelta(seconds=2), result='{"ok":true}', process_id="p-1"),
        RunEnd(
            RunStatus.RETRYING, START + timedelta(seconds=2), START + timedelta(seconds=5), "", "X", "failed", "p-2"
        ),
        RunEnd(RunStatus.FAILED, START + timedelta(seconds=2), None, "", "X", "failed", "", JobStatus.FAILED),
    ],
    ids=["succeeded", "retrying", "failed-one-off"],
)
async def test_an_ended_run_as_the_scheduler_tells_it_is_the_run_the_store_holds(
    store_factory: Callable[[], Awaitable[Store]], end: RunEnd
) -> None:
    store = await store_factory()
    job = _due_job("ending")
    await store.insert_job(job, replace=False, now=START)
    running = new_run(
        job, START, RunStatus.RUNNING, RunTrigger.SCHEDULE, attempts=1, started_at=START, owner="me", lease_until=START
    )
    await store.insert_run(running)
    assert await store.end_runs("someone else", [(running.run_id, end)]) == set()  # not theirs to end
    assert await store.end_runs("me", [(running.run_id, end)]) == {running.run_id}
    assert await store.get_run(running.run_id) == end.ended(running)  # what WatchRuns streams is what ListRuns reads
