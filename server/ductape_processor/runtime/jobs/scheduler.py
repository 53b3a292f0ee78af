"""The scheduler of one replica: steps due jobs past their occurrences and claims due runs from the store, runs their
targets under leases it heart-beats, records each run before its target is called and after it ends, and retries
failures with backoff.

The rounds of claims are the ones every claimer of due work runs (`ClaimRounds`, runtime/policies/leases.py): the
scheduler sleeps until the earliest moment the store says something falls due (a next occurrence, a retry, a lease's
end), woken earlier when this replica schedules or changes a job, or, on PostgreSQL, when another replica does
(LISTEN/NOTIFY on the store's "jobs" topic). A poll every `poll_s` covers a lost notification. A due job is held by
the transaction that steps it (so each occurrence starts once across replicas) and its run is recorded under this
replica's lease; a replica that dies mid-run leaves a lease that runs out, and another replica takes the run over
(`reclaimed`). Runs are claimed only when one may be due: at the runs' next moment, when this replica was woken for
them, or at the fallback poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from ductape_processor.errors import ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.jobs.codec import decode_spec, encode_spec
from ductape_processor.runtime.jobs.model import JobSpec, Overlap, RunTrigger
from ductape_processor.runtime.jobs.targets import JobTargets, Outcome
from ductape_processor.runtime.jobs.timing import due_after
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.leases import ClaimRounds, EndBatches, LeaseRenewer
from ductape_processor.runtime.policies.periodic import end_within
from ductape_processor.store.base import Store
from ductape_processor.store.job_records import JOBS_TOPIC, JobRecord, JobStatus, JobStep, RunEnd, RunRecord, RunStatus

if TYPE_CHECKING:  # telemetry's histogram: the API is imported by setup_telemetry when metrics are exported
    from opentelemetry.metrics import Histogram

log = logging.getLogger(__name__)

CLAIM_BATCH: Final = 250
"""Jobs (and runs) one claim takes at most; a full batch makes the scheduler claim again at once."""
RUNS_CLAIM_EVERY: Final = timedelta(seconds=1)
"""While full claims of occurrences follow each other, how often the runs (retries, buffered, taken over) are claimed
between them, should one be due."""
CLAIM_LANES: Final = 2
"""Claims of due jobs in flight at once while they come back full: one is stepped (Python) while the store works on
the other."""
MAX_ENDS_PER_CALL: Final = 500
"""Runs' ends one store call records at most."""
MAX_EVENTS_QUEUED: Final = 1000
"""Run events a WatchRuns stream may fall behind by; a slower reader loses the oldest."""


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The scheduler's rhythm: the fallback poll, the leases and how often they are renewed."""

    poll_s: float = 5.0
    lease: timedelta = timedelta(seconds=30)


def new_run(
    job: JobRecord,
    due: datetime,
    status: RunStatus,
    trigger: RunTrigger,
    *,
    attempt_at: datetime | None = None,
    attempts: int = 0,
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
    owner: str | None = None,
    lease_until: datetime | None = None,
    error_reason: str = "",
    error_message: str = "",
) -> RunRecord:
    """A run of `job` due at `due`, not yet attempted unless told otherwise."""
    return RunRecord(
        run_id=os.urandom(16).hex(),  # 32 hex digits, as a uuid4's hex, for a fraction of uuid4's cost
        job_id=job.job_id,
        product=job.product,
        env=job.env,
        trigger=int(trigger),
        status=status,
        due_at=due,
        attempt_at=attempt_at,
        attempts=attempts,
        started_at=started_at,
        ended_at=ended_at,
        owner=owner,
        lease_until=lease_until,
        reclaimed=False,
        result="",
        error_reason=error_reason,
        error_message=error_message,
        process_id="",
    )


def new_job(
    product: str, env: str, name: str, spec: JobSpec, first: datetime, now: datetime, **fields: object
) -> JobRecord:
    """A scheduled job of `spec`, first due at `first`; `fields` set `declared`, `idempotency_key`, `request_hash`."""
    values: dict[str, object] = {"declared": False, "idempotency_key": "", "request_hash": ""}
    values.update(fields)
    return JobRecord(
        job_id=os.urandom(16).hex(),
        product=product,
        env=env,
        name=name,
        target_kind=spec.target.kind.value,
        spec=encode_spec(spec),
        status=JobStatus.SCHEDULED,
        next_run_at=first,
        runs=0,
        created_at=now,
        **values,  # type: ignore[arg-type]
    )


class RunEvents:
    """Run changes this replica made, fanned out to WatchRuns streams (each filters what it follows)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[RunRecord]] = set()

    def publish(self, run: RunRecord) -> None:
        """Hand `run` to every stream; a stream too far behind loses its oldest event."""
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(run)

    def follow(self, product: str, env: str, job_id: str) -> AsyncIterator[RunRecord]:
        """The runs of the environment (or of one job) as they change from this call on, while iterated."""
        queue: asyncio.Queue[RunRecord] = asyncio.Queue(MAX_EVENTS_QUEUED)
        self._queues.add(queue)
        return self._drain(queue, product, env, job_id)

    async def _drain(
        self, queue: asyncio.Queue[RunRecord], product: str, env: str, job_id: str
    ) -> AsyncIterator[RunRecord]:
        try:
            while True:
                run = await queue.get()
                if run.product == product and run.env == env and (not job_id or run.job_id == job_id):
                    yield run
        finally:
            self._queues.discard(queue)


class JobScheduler:
    """Runs the jobs that fall due, from `start` until `stop`."""

    def __init__(
        self,
        store: Store,
        targets: JobTargets,
        clock: Clock,
        settings: SchedulerSettings,
        lateness: Histogram | None = None,
    ) -> None:
        self._store = store
        self._targets = targets
        self._clock = clock
        self._settings = settings
        self._lateness = lateness
        self.owner = os.urandom(16).hex()
        """This replica's name on the leases it holds."""
        self.events = RunEvents()
        self._ends: EndBatches[tuple[RunRecord, RunEnd, JobSpec]] = EndBatches(
            "job run ends", self._record_ends, MAX_ENDS_PER_CALL
        )
        self._rounds = ClaimRounds("job scheduler", self._round, self._next_moment, clock, settings.poll_s)
        self._runs_claimed_at = datetime.min.replace(tzinfo=UTC)
        self._runs_due_at: datetime | None = None
        """When a run falls due, as the store said after the last round that looked (a retry, a lease's end)."""
        self._runs_woken = False
        """Whether this replica was woken for runs (a trigger, a resume, an end that leaves a retry or a buffered
        run) since it last claimed them."""
        self._burst = False
        """Whether the last round's claims all came back full: the next one claims on CLAIM_LANES at once."""
        self._announced: datetime | None = None
        """The earliest due moment this replica announced that may still be to come."""
        self._running: set[asyncio.Task[None]] = set()
        self._leases = LeaseRenewer(
            "job run leases", lambda ids, until: store.renew_runs(self.owner, ids, until), clock, settings.lease
        )
        """The runs whose targets this replica is running: their leases are renewed."""

    async def start(self) -> None:
        """Listen for other replicas' job changes (a new job's announcement names its due moment) and start the
        rounds."""
        await self._rounds.listen_and_start(self._store, JOBS_TOPIC)
        self._leases.start()

    def wake(self) -> None:
        """Look for due work now, runs included (a job was resumed or triggered, a run ended)."""
        self._runs_woken = True
        self._rounds.wake()

    def scheduled(self, due: datetime) -> None:
        """A job was scheduled, first due at `due`: look now if this replica would look later than that."""
        self._rounds.wake_by(due)

    def announces(self, due: datetime) -> bool:
        """Whether the other replicas must be told of a job first due at `due` (Store.listen "jobs"): when their
        fallback poll may look later than that (two polls ahead covers a replica that looked just before the job was
        stored), and this replica has not announced a job due at or before it that is still to come (the other
        replicas look at that moment, and then read the store's next one). PostgreSQL serialises the commits of
        notifying transactions, so fewer announcements are more Schedules per second."""
        now = self._clock.now()
        if due >= now + 2 * timedelta(seconds=self._settings.poll_s):
            return False
        return not (self._announced is not None and now < self._announced <= due)

    def announced(self, due: datetime) -> None:
        """A job first due at `due` was announced to the other replicas."""
        if self._announced is None or due < self._announced or self._announced <= self._clock.now():
            self._announced = due

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; let runs going finish within `grace_s`, then cancel them (their leases run out and
        another replica, or this one after a restart, takes them over)."""
        await self._rounds.stop()
        await end_within(set(self._running), grace_s)
        await self._leases.stop()
        await self._ends.close()

    async def _round(self) -> bool:
        """Step the due jobs and start their runs, then claim the due runs if one may be due; True when a claim came
        back full (more may be due)."""
        now = self._clock.now()
        lanes = CLAIM_LANES if self._burst else 1
        claims = await asyncio.gather(*(self._step_due(now) for _ in range(lanes)))
        busy = self._burst = all(claims)
        now = self._clock.now()  # the jobs above may have taken a while: leases start from now
        if not self._runs_may_be_due(now, busy):
            return busy
        self._runs_claimed_at, self._runs_woken = now, False
        runs = await self._store.claim_due_runs(self.owner, now, now + self._settings.lease, CLAIM_BATCH)
        for run in runs:
            self._spawn(run, None)
        return busy or len(runs) == CLAIM_BATCH

    async def _step_due(self, now: datetime) -> bool:
        """One claim of due jobs, stepped, and their runs started; True when it came back full."""
        specs: dict[str, JobSpec] = {}
        steps = await self._store.step_due_jobs(now, CLAIM_BATCH, lambda job: self._step(job, now, specs))
        for step in steps:
            for run in step.runs:
                self.events.publish(run)
                if run.status == RunStatus.RUNNING:
                    self._spawn(run, specs[step.job_id])
        return len(steps) == CLAIM_BATCH

    def _runs_may_be_due(self, now: datetime, busy: bool) -> bool:
        """While occurrences come in full claims, runs are claimed every RUNS_CLAIM_EVERY; otherwise when this replica
        was woken for them, when the store said one falls due by now, or at the fallback poll."""
        if busy:
            return now >= self._runs_claimed_at + RUNS_CLAIM_EVERY
        due = self._runs_due_at
        poll = timedelta(seconds=self._settings.poll_s)
        return self._runs_woken or (due is not None and due <= now) or now >= self._runs_claimed_at + poll

    async def _next_moment(self) -> datetime | None:
        occurrence, run = await self._store.next_job_moments()
        self._runs_due_at = run
        return min(occurrence, run) if occurrence is not None and run is not None else occurrence or run

    def _step(self, job: JobRecord, now: datetime, specs: dict[str, JobSpec]) -> JobStep:
        """A due job stepped past its due occurrence: its run (or skip or buffer), and its next occurrence; its spec is
        kept in `specs` for its run. A job whose spec or rhythm cannot be read fails (with a failed run that says
        why) rather than fail every claim that takes it."""
        try:
            spec = decode_spec(job.spec)
            step = self._stepped(job, spec, now)
        except Exception as exc:
            log.exception("job %s cannot be stepped: it fails", job.job_id)
            why = f"the job's schedule cannot be read ({type(exc).__name__}): the processor failed"
            run = new_run(
                job,
                job.next_run_at or now,
                RunStatus.FAILED,
                RunTrigger.SCHEDULE,
                ended_at=now,
                error_reason=Reason.INTERNAL,
                error_message=why,
            )
            return JobStep(job.job_id, None, JobStatus.FAILED, 0, [run])
        specs[job.job_id] = spec
        return step

    def _stepped(self, job: JobRecord, spec: JobSpec, now: datetime) -> JobStep:
        repeat = spec.repeat
        due = job.next_run_at
        assert due is not None  # a claimed job is due
        if repeat is not None and due < now - spec.catch_up:
            # Missed by more than the catch-up window (downtime, a pause): skip to the first occurrence within it.
            latest = due_after(repeat, due, now - spec.catch_up, job.runs)
            if latest is None or latest > now:
                return self._moved(job, latest, 0, [])
            due = latest
        run = self._occurrence(job, spec, due, now)
        started = 1 if run.status != RunStatus.SKIPPED else 0
        following = due_after(repeat, due, due, job.runs + started) if repeat is not None else None
        return self._moved(job, following, started, [run])

    def _occurrence(self, job: JobRecord, spec: JobSpec, due: datetime, now: datetime) -> RunRecord:
        """The run of an occurrence due at `due`, by the job's overlap policy."""
        trigger = RunTrigger.SCHEDULE
        if (job.busy and spec.overlap == Overlap.SKIP) or (spec.overlap == Overlap.BUFFER_ONE and job.queued):
            why = f"a run of the job was going or waiting (overlap: {spec.overlap.value})"
            return new_run(job, due, RunStatus.SKIPPED, trigger, ended_at=now, error_message=why)
        if job.busy and spec.overlap == Overlap.BUFFER_ONE:
            return new_run(job, due, RunStatus.PENDING, trigger)  # claimed once no run of the job is going
        # The start and the lease from the clock now, not from the round's start: a round advancing many jobs on a
        # slow store can take longer than a lease, and a lease that ended before its run began is taken over.
        start = self._clock.now()
        lease_until = start + self._settings.lease
        return new_run(
            job,
            due,
            RunStatus.RUNNING,
            trigger,
            attempts=1,
            started_at=start,
            owner=self.owner,
            lease_until=lease_until,
        )

    @staticmethod
    def _moved(job: JobRecord, following: datetime | None, started: int, runs: list[RunRecord]) -> JobStep:
        status = JobStatus.SCHEDULED if following is not None else JobStatus.COMPLETED
        return JobStep(job.job_id, following, status, started, runs)

    def _spawn(self, run: RunRecord, spec: JobSpec | None) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(run, spec), name=f"job run {run.run_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, run: RunRecord, spec: JobSpec | None) -> None:
        """One attempt of `run` (already recorded RUNNING under this replica's lease), then its recorded end.
        `spec`: the job's, when the claim that started the run read it; else it is read here."""
        self._leases.hold(run.run_id)  # renewed from the start: reads may be slow
        if spec is None:
            try:
                job = await self._store.get_job(run.job_id)
            except BaseException:
                self._leases.release(run.run_id)
                raise
            if job is None:
                self._leases.release(run.run_id)
                return
            spec = decode_spec(job.spec)
        self.events.publish(run)
        if run.attempts == 1 and run.started_at is not None and self._lateness is not None:
            lateness_ms = (run.started_at - run.due_at).total_seconds() * 1000
            self._lateness.record(max(lateness_ms, 0.0), {"target_kind": spec.target.kind.value})
        try:
            end = self._ended(await self._targets.call(run.product, run.env, spec.target))
        except ProcessorError as exc:
            end = self._failed(run, spec, exc.reason, exc.message, exc.metadata.get("process_id", ""))
        except Exception as exc:  # a bug in a target's path: the run fails, the scheduler goes on
            log.exception("job run %s failed unexpectedly", run.run_id)
            end = self._failed(run, spec, Reason.INTERNAL, f"{type(exc).__name__}: the processor failed", "")
        finally:
            self._leases.release(run.run_id)
        self._ends.add((run, end, spec))

    async def _record_ends(self, batch: list[tuple[RunRecord, RunEnd, JobSpec]]) -> None:
        """Record runs' ends (`EndBatches`: many to a store call) and tell the WatchRuns streams."""
        ended = await self._store.end_runs(self.owner, [(run.run_id, end) for run, end, _ in batch])
        again = False
        for run, end, spec in batch:
            if run.run_id not in ended:
                log.warning("job run %s was taken over by another replica before it ended here", run.run_id)
                continue
            self.events.publish(end.ended(run))
            # the retry is due at a new moment, or a buffered run of the job may start now
            again = again or end.status == RunStatus.RETRYING or spec.overlap == Overlap.BUFFER_ONE
        if again:
            self.wake()

    def _ended(self, outcome: Outcome) -> RunEnd:
        result = json.dumps(outcome.result, separators=(",", ":"), ensure_ascii=False, default=str)
        return RunEnd(RunStatus.SUCCEEDED, self._clock.now(), result=result, process_id=outcome.process_id)

    def _failed(self, run: RunRecord, spec: JobSpec, reason: str, message: str, process_id: str) -> RunEnd:
        now = self._clock.now()
        if run.attempts <= spec.retry.max_retries:
            retry_at = now + timedelta(seconds=spec.retry.backoff.delay(run.attempts))
            return RunEnd(RunStatus.RETRYING, now, retry_at, "", reason, message, process_id)
        one_off_failed = JobStatus.FAILED if spec.repeat is None else None
        return RunEnd(RunStatus.FAILED, now, None, "", reason, message, process_id, one_off_failed)
