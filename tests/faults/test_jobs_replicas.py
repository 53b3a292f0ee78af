"""Jobs on three real processes sharing one PostgreSQL store: every occurrence runs once, whichever process claims it,
and a run whose process is killed (kill -9) is taken over by another once its lease ends, and finished once."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest

from tests.faults.harness import CountingUpstream, product
from tests.faults.replicas import Replica, serve
from tests.upstream import Upstream

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

JOBS = 500
OCCURRENCES = 2  # each job repeats every second, twice
LEASE_S = 3.0
FAST = {"PROCESSOR_JOB_LEASE_S": str(LEASE_S), "PROCESSOR_JOB_POLL_S": "0.5"}


async def _start(count: int, upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]) -> None:
    manifest = tmp_path / "faults.json"
    manifest.write_bytes(product(upstream.url))
    for n in range(count):
        replicas.append(await serve(manifest, pg_schema, tmp_path / f"r{n}", FAST))


async def test_three_processes_run_each_occurrence_of_500_jobs_once(
    upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    counting = CountingUpstream(upstream, delay_s=0.005)
    counting.install()
    await _start(3, upstream, pg_schema, tmp_path, replicas)
    first_due = time.time() + 3  # all scheduled before the first occurrence falls due
    scheduled = await asyncio.gather(
        *(
            replicas[n % 3].client.job.schedule(
                product="faults",
                env="dev",
                event="api:create",
                input={"body": {"name": f"job-{n}"}},
                start_at=first_due,
                repeat={"every": 1.0, "limit": OCCURRENCES},
                # Every occurrence runs even when the one before is still going: 500 action calls started at once
                # on a loaded machine can outlast the second, and the default (skip) would record a skipped run.
                overlap="allow",
                name=f"job-{n}",
            )
            for n in range(JOBS)
        )
    )
    assert len({job.job_id for job in scheduled}) == JOBS
    expected = JOBS * OCCURRENCES
    started = time.monotonic()
    async with asyncio.timeout(60):
        while sum(counting.received.values()) < expected:
            await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # anything run twice would arrive by now
    took = time.monotonic() - started
    client = replicas[0].client
    runs = [
        run for job in scheduled[:50] async for run in client.job.runs(product="faults", env="dev", job_id=job.job_id)
    ]
    lateness_ms = sorted(run.lateness.total_seconds() * 1000 for run in runs)
    executed = sum(counting.received.values())
    duplicates = sum(count - OCCURRENCES for count in counting.received.values() if count > OCCURRENCES)
    missing = sum(1 for n in range(JOBS) if counting.received[f"job-{n}"] < OCCURRENCES)
    print(
        f"\nFAULT jobs on 3 processes: jobs={JOBS} occurrences={expected} executed={executed} "
        f"duplicates={duplicates} missing={missing} seconds={took:.2f} "
        f"lateness_ms p50={statistics.median(lateness_ms):.1f} max={lateness_ms[-1]:.1f} (50 jobs' runs)"
    )
    assert duplicates == 0 and missing == 0 and executed == expected
    assert len(runs) == 50 * OCCURRENCES
    assert all(run.status == "succeeded" and not run.reclaimed for run in runs)
    assert all(run.started_at is not None and run.started_at >= run.due_at for run in runs), "never early"


async def test_kill_9_of_the_process_running_a_long_job_hands_it_over_once(
    upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    counting = CountingUpstream(upstream, slow={"long": 2.0})
    counting.install()
    await _start(1, upstream, pg_schema, tmp_path, replicas)
    [a] = replicas
    job = await a.client.job.schedule(product="faults", env="dev", event="api:create", input={"body": {"name": "long"}})
    await asyncio.wait_for(counting.arrival("long").wait(), 10)  # A's attempt is at the upstream
    a.process.kill()  # SIGKILL: no shutdown, the lease is left to run out
    await a.process.wait()
    killed_at = time.monotonic()
    await _start(2, upstream, pg_schema, tmp_path, replicas)  # two fresh processes compete for the run
    b = replicas[1]

    async def run_ended() -> bool:
        runs = [run async for run in b.client.job.runs(product="faults", env="dev", job_id=job.job_id)]
        return bool(runs) and runs[0].status == "succeeded"

    # The run's end, not the job's state: a one-off job is completed as soon as its run started.
    async with asyncio.timeout(LEASE_S + 15):
        while not await run_ended():
            await asyncio.sleep(0.1)
    taken_over = time.monotonic() - killed_at
    await asyncio.sleep(LEASE_S + 1)  # a second take-over would have started by now
    done = await b.client.job.get(product="faults", env="dev", job_id=job.job_id)
    [run] = [run async for run in b.client.job.runs(product="faults", env="dev", job_id=job.job_id)]
    print(
        f"\nFAULT kill -9 of the process running a job: upstream_calls={counting.received['long']} "
        f"run={run.status} attempts={run.attempts} reclaimed={run.reclaimed} finished_after_kill_s={taken_over:.2f}"
    )
    assert done.status == "completed"
    assert run.status == "succeeded" and run.reclaimed, "the run is finished by another process, and says so"
    assert counting.received["long"] == 2, "the killed attempt, then exactly one take-over"
    assert taken_over > 2.0, "the take-over's attempt takes the upstream's 2 s"
    assert taken_over < LEASE_S + 10
