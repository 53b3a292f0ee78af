"""JobService's calls: schedule a job (checked against the product's manifest), read, list and steer jobs, list and
follow their runs. The scheduler (scheduler.py) runs them; this module only writes what callers ask and wakes it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ductape_processor.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ductape_processor.reasons import Reason
from ductape_processor.runtime.jobs.checks import name_problem
from ductape_processor.runtime.jobs.codec import encode_spec
from ductape_processor.runtime.jobs.declared import DeclaredJobs
from ductape_processor.runtime.jobs.model import ACTIVE, JobQuery, RunTrigger, ScheduleCall
from ductape_processor.runtime.jobs.scheduler import JobScheduler, new_job, new_run
from ductape_processor.runtime.jobs.targets import check_target
from ductape_processor.runtime.jobs.timing import check_repeat, check_spans, first_due
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.idempotency import idempotency_key_problem
from ductape_processor.runtime.policies.paging import (
    decode_page_token,
    effective_page_size,
    json_weight,
    page,
    time_position,
)
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.store.base import Store
from ductape_processor.store.job_records import JobFilter, JobRecord, JobStatus, RunRecord, RunStatus


@dataclass(frozen=True, slots=True)
class JobRef:
    """A job as a call names it: by id, or by the name of an active job, within a product's environment."""

    product: str
    env: str
    job_id: str = ""
    name: str = ""


class JobRuntime:
    """Schedules and steers jobs; the scheduler it wakes runs them."""

    def __init__(self, registry: Registry, store: Store, scheduler: JobScheduler, clock: Clock) -> None:
        self._registry = registry
        self._store = store
        self._scheduler = scheduler
        self._clock = clock
        self._declared = DeclaredJobs(registry, store, scheduler, clock)

    async def start(self) -> None:
        """Start running jobs, and keep the manifests' declared jobs in step with their pinned versions."""
        await self._scheduler.start()
        await self._declared.start()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; runs going finish within `grace_s` (see `JobScheduler.stop`)."""
        await self._declared.stop()
        await self._scheduler.stop(grace_s)

    async def _slug(self, product: str, env: str) -> str:
        environment, _ = await self._registry.environment(product, env)
        return environment.slug

    async def schedule(self, call: ScheduleCall) -> JobRecord:
        """Check and store a new job; INVALID_ARGUMENT names the field a problem is in."""
        resolved = await self._registry.resolve(call.product, call.env)
        spec = call.spec
        check_target(resolved.manifest, spec.target, "target")
        now = self._clock.now()
        check_spans(spec, call.start_at, call.delay, now)
        if spec.repeat is not None:
            check_repeat(spec.repeat, now)
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        problem = name_problem(call.name)
        if problem is not None:
            raise InvalidArgument.field("name", problem)
        start = call.start_at or (now + call.delay if call.delay is not None else now)
        first = first_due(spec.repeat, start)
        if first is None:
            raise InvalidArgument.field("repeat.end_at", "no occurrence falls between start_at and end_at")
        fingerprint = hashlib.sha256(f"{call.name}\n{start.isoformat()}\n{encode_spec(spec)}".encode()).hexdigest()
        record = new_job(
            call.product,
            resolved.env.slug,
            call.name,
            spec,
            first,
            now,
            idempotency_key=call.idempotency_key,
            request_hash=fingerprint,
        )
        announce = self._scheduler.announces(first)
        stored, created = await self._store.insert_job(record, replace=call.replace, now=now, announce=announce)
        if not created:
            if call.idempotency_key and stored.idempotency_key == call.idempotency_key:
                if stored.request_hash != fingerprint:
                    raise FailedPrecondition(
                        "the idempotency key was used for another Schedule request",
                        reason=Reason.IDEMPOTENCY_KEY_REUSED,
                        metadata={"job_id": stored.job_id},
                    )
                return stored
            raise AlreadyExists(
                f"job {call.name!r} is active in {resolved.env.slug!r}: cancel it, or schedule with replace",
                reason=Reason.JOB_NAME_IN_USE,
                metadata={"job_id": stored.job_id, "name": call.name},
            )
        if announce:
            self._scheduler.announced(first)
        self._scheduler.scheduled(first)
        return stored

    async def get(self, ref: JobRef) -> JobRecord:
        """The job `ref` names; NOT_FOUND `JOB_NOT_FOUND` when there is none."""
        slug = await self._slug(ref.product, ref.env)
        if ref.job_id:
            job = await self._store.get_job(ref.job_id)
            if job is not None and (job.product, job.env) != (ref.product, slug):
                job = None
        elif ref.name:
            job = await self._store.active_job(ref.product, slug, ref.name)
        else:
            raise InvalidArgument.field("job.job_id", "give the job's id or its name")
        if job is None:
            named = ref.job_id or ref.name
            raise NotFound(
                f"no job {named!r} in {ref.product!r} {slug!r}",
                reason=Reason.JOB_NOT_FOUND,
                metadata={"product": ref.product, "job": named},
            )
        return job

    async def list_jobs(self, query: JobQuery, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        """One page of the environment's jobs, newest first, and the next page's token."""
        size = effective_page_size(page_size)
        slug = await self._slug(query.product, query.env)
        status = int(query.status) if query.status is not None else None
        kind = query.kind.value if query.kind is not None else ""
        listing = ("jobs", query.product, slug, str(status or ""), query.name, kind)
        after = decode_page_token(listing, page_token, time_position) if page_token else None
        where = JobFilter(query.product, slug, status, query.name, kind)
        records = await self._store.list_jobs(where, after=after, limit=size + 1)
        return page(
            records,
            size,
            listing,
            lambda job: (job.created_at.timestamp(), job.job_id),
            lambda job: json_weight(job.spec),
        )

    async def _transition(self, ref: JobRef, allowed: tuple[JobStatus, ...], status: JobStatus) -> JobRecord:
        job = await self.get(ref)
        changed = await self._store.set_job_status(job.job_id, allowed, status, self._clock.now())
        if changed is None:
            raise self._not_active(job)
        self._scheduler.wake()
        return changed

    @staticmethod
    def _not_active(job: JobRecord) -> FailedPrecondition:
        state = job.status.name.lower()
        return FailedPrecondition(
            f"job {job.job_id} is {state}",
            reason=Reason.JOB_NOT_ACTIVE,
            metadata={"job_id": job.job_id, "status": state},
        )

    async def cancel(self, ref: JobRef) -> JobRecord:
        """Cancel an active job and its waiting runs."""
        return await self._transition(ref, ACTIVE, JobStatus.CANCELLED)

    async def pause(self, ref: JobRef) -> JobRecord:
        """Pause a scheduled job."""
        return await self._transition(ref, (JobStatus.SCHEDULED,), JobStatus.PAUSED)

    async def resume(self, ref: JobRef) -> JobRecord:
        """Resume a paused job."""
        return await self._transition(ref, (JobStatus.PAUSED,), JobStatus.SCHEDULED)

    async def trigger_now(self, ref: JobRef) -> RunRecord:
        """A run of the job due now, outside its schedule."""
        job = await self.get(ref)
        if job.status not in ACTIVE:
            raise self._not_active(job)
        now = self._clock.now()
        run = new_run(job, now, RunStatus.PENDING, RunTrigger.MANUAL, attempt_at=now)
        await self._store.insert_run(run)
        self._scheduler.events.publish(run)
        self._scheduler.wake()
        return run

    async def list_runs(
        self, ref: JobRef, status: RunStatus | None, page_size: int, page_token: str
    ) -> tuple[list[RunRecord], str]:
        """One page of the job's runs, newest due first, and the next page's token."""
        size = effective_page_size(page_size)
        job = await self.get(ref)
        listing = ("job_runs", job.job_id, str(int(status) if status is not None else ""))
        after = decode_page_token(listing, page_token, time_position) if page_token else None
        records = await self._store.list_runs(
            job.job_id, int(status) if status is not None else None, after=after, limit=size + 1
        )
        return page(
            records,
            size,
            listing,
            lambda run: (run.due_at.timestamp(), run.run_id),
            lambda run: json_weight(run.result, run.error_message),
        )

    async def watch(self, product: str, env: str, job_id: str) -> AsyncIterator[RunRecord]:
        """The runs of the environment (or of one job) as they change, from now on."""
        slug = await self._slug(product, env)
        if job_id:
            await self.get(JobRef(product, env, job_id=job_id))
        return self._scheduler.events.follow(product, slug, job_id)
