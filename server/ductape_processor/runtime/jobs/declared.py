"""The jobs a manifest declares (`jobs`): kept in step with the version pinned for each environment.

A declared job is a job named after its tag, marked `declared`. When a product changes (a version applied or
promoted, here or on another replica) and at start, each environment's declared jobs are compared with what its
pinned version (else the latest) declares: a new one is scheduled, one whose declaration changed replaces the old,
and one the version no longer declares is cancelled. Replicas doing this at once agree: a job is replaced only when
its declaration's fingerprint differs, under the store's per-environment lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from ductape_processor.runtime.jobs.codec import encode_spec
from ductape_processor.runtime.jobs.model import (
    ACTIVE,
    JobRetry,
    JobSpec,
    JobStatus,
    Overlap,
    Repeat,
    Target,
    TargetKind,
)
from ductape_processor.runtime.jobs.scheduler import JobScheduler, new_job
from ductape_processor.runtime.jobs.timing import first_due
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.registry.jobs import DeclaredJob, JobRetryPolicy
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.store.base import Store
from ductape_processor.store.job_records import JobFilter, JobRecord

log = logging.getLogger(__name__)


def declared_retry(retry: JobRetryPolicy) -> JobRetry:
    """A retry policy as a manifest declares it (a declared job's, a received webhook's job's)."""
    return JobRetry(retry.max_retries, retry.initial_delay, retry.max_delay, retry.jitter)


def declared_spec(job: DeclaredJob) -> JobSpec:
    """The spec of a job the manifest declares."""
    repeat = job.repeat
    return JobSpec(
        target=Target(TargetKind(job.target.kind), job.target.event, dict(job.input)),
        repeat=Repeat(repeat.cron or "", repeat.every, repeat.timezone, repeat.limit),
        retry=declared_retry(job.retry),
        overlap=Overlap(job.overlap),
        catch_up=job.catch_up_window,
    )


class DeclaredJobs:
    """Keeps the store's declared jobs in step with the manifests' pinned versions."""

    def __init__(self, registry: Registry, store: Store, scheduler: JobScheduler, clock: Clock) -> None:
        self._registry = registry
        self._store = store
        self._scheduler = scheduler
        self._clock = clock
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    async def start(self) -> None:
        """Follow product changes, and bring every product in step now."""
        self._registry.on_change(self.changed)
        for revision in await self._store.revisions():
            await self._sync_logged(revision.product)

    async def stop(self) -> None:
        """Stop the syncs under way (the next start does them again)."""
        tasks = list(self._syncing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def changed(self, product: str) -> None:
        """A product changed: sync it (once more after the sync under way, if one is)."""
        if product in self._syncing:
            self._again.add(product)
            return
        task = asyncio.get_running_loop().create_task(self._sync_until_settled(product), name=f"jobs of {product}")
        self._syncing[product] = task
        task.add_done_callback(lambda _: self._syncing.pop(product, None))

    async def _sync_until_settled(self, product: str) -> None:
        while True:
            await self._sync_logged(product)
            if product not in self._again:
                return
            self._again.discard(product)

    async def _sync_logged(self, product: str) -> None:
        try:
            await self.sync(product)
        except Exception as exc:  # the store or a manifest may be unreadable for a moment: the next change retries
            log.warning("declared jobs of %s: sync failed: %s", product, exc)

    async def sync(self, product: str) -> None:
        """Bring the declared jobs of every environment of `product` in step with its pinned version."""
        state = await self._registry.state(product)
        if state.latest is None:
            return
        model = await self._registry.model(state.latest)
        for environment in model.environments:
            resolved = await self._registry.resolve(product, environment.slug)
            wanted = [job for job in resolved.manifest.jobs if job.envs is None or environment.slug in job.envs]
            await self._sync_environment(product, environment.slug, wanted)

    async def _sync_environment(self, product: str, env: str, wanted: list[DeclaredJob]) -> None:
        now = self._clock.now()
        existing: dict[str, JobRecord] = {}
        for status in ACTIVE:
            where = JobFilter(product, env, int(status), declared=True)
            for job in await self._store.list_jobs(where, after=None, limit=10_000):
                existing[job.name] = job
        changed = False
        for declared in wanted:
            spec = declared_spec(declared)
            fingerprint = hashlib.sha256(encode_spec(spec).encode()).hexdigest()
            held = existing.pop(declared.tag, None)
            if held is not None and held.request_hash == fingerprint:
                continue
            first = first_due(spec.repeat, now)
            record = new_job(
                product, env, declared.tag, spec, first or now, now, declared=True, request_hash=fingerprint
            )
            await self._store.insert_job(record, replace=True, now=now)
            changed = True
        for gone in existing.values():  # the pinned version no longer declares it
            await self._store.set_job_status(gone.job_id, ACTIVE, JobStatus.CANCELLED, now)
        if changed:
            self._scheduler.wake()
