"""FeatureService's calls, and the runs of one replica: starting a run (checked against the feature's contract and
pinned to the version it starts with), reading, listing and following runs, cancelling, resuming and replaying them.

A run is executed by the replica holding its lease (`owner`, `lease_until` in the store): the one that started it,
at once; one that resumed it; or, when that replica died or stopped, the first to claim it once its lease ran out
(`ClaimRounds`, runtime/policies/leases.py, with the store's shared claim statement). The leases of this replica's
runs are renewed together every third of a lease; a run whose renewal or record finds it no longer held (cancelled by
another replica, or taken over after this one stalled) is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from ductape_processor.errors import FailedPrecondition, InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.contract import check_input
from ductape_processor.runtime.features.engine import EngineServices, RunExecution
from ductape_processor.runtime.features.journal import Journal, RunLost
from ductape_processor.runtime.features.model import (
    FeatureRunRecord,
    FeatureRunStatus,
    RunCall,
    RunRef,
    RunView,
    WatchEvent,
)
from ductape_processor.runtime.features.plan import FeaturePlan
from ductape_processor.runtime.features.steps import FeatureSteps, StepCall
from ductape_processor.runtime.features.watching import RunEvents, follow, run_view
from ductape_processor.runtime.policies import paging
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.idempotency import idempotency_key_problem
from ductape_processor.runtime.policies.leases import ClaimRounds, LeaseRenewer
from ductape_processor.runtime.policies.periodic import end_within
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.services import CallServices
from ductape_processor.store.feature_records import FEATURES_TOPIC, GOING, FeatureRunChange, FeatureRunFilter

log = logging.getLogger(__name__)

MAX_EVENTS_QUEUED: Final = 1000
"""Changes a Watch stream may fall behind by; a slower reader loses the oldest."""
DEFAULT_RETENTION: Final = timedelta(days=30)
"""How long an ended run is kept when its feature cannot be read any more (its version is gone)."""


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """The rhythm of runs: the fallback poll for runs to take over, the leases, how Watch follows other replicas."""

    poll_s: float = 5.0
    lease: timedelta = timedelta(seconds=30)
    claim_batch: int = 100
    watch_poll_s: float = 1.0
    """How often a Watch of a run another replica executes reads the store."""
    max_wait_s: float = 300.0
    """The longest a caller's `wait` lasts, whatever its deadline (a child run's wait is not bounded by it)."""


@dataclass(slots=True)
class _Going:
    """A run this replica executes: its task, and (once its records are read) its execution."""

    task: asyncio.Task[FeatureRunRecord]
    execution: RunExecution | None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)


def _not_found(ref: RunRef) -> NotFound:
    return NotFound(
        f"no feature run {ref.process_id!r} in {ref.product!r} {ref.env!r}",
        reason=Reason.FEATURE_RUN_NOT_FOUND,
        metadata={"product": ref.product, "process_id": ref.process_id},
    )


class FeatureRuntime:
    """Runs features and serves FeatureService; from `start` until `stop` it also takes over runs left by others."""

    def __init__(self, services: CallServices, steps: FeatureSteps, clock: Clock, settings: FeatureSettings) -> None:
        self._services = services
        self._store = services.store
        self._registry = services.registry
        self._clock = clock
        self._settings = settings
        self.owner = uuid.uuid4().hex
        """This replica's name on the leases it holds."""
        self._journal = Journal(self._store, self.owner)
        self._events = RunEvents()
        self._engine = EngineServices(self._journal, steps, clock, self._events, services.secrets.get)
        self._going: dict[str, _Going] = {}
        self._rounds = ClaimRounds("feature runs", self._claim, self._store.next_feature_moment, clock, settings.poll_s)
        self._leases = LeaseRenewer("feature run leases", self._renew, clock, settings.lease)
        self._started = False
        steps.serve_children(self)

    @property
    def max_wait_s(self) -> float:
        """The longest a caller's `wait` lasts (`FeatureSettings.max_wait_s`)."""
        return self._settings.max_wait_s

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Record runs, take over those whose replica died, renew this replica's leases."""
        self._started = True
        self._journal.start()
        await self._store.listen(self._heard, FEATURES_TOPIC)
        await self._rounds.listen_and_start(self._store, FEATURES_TOPIC)
        self._leases.start()

    async def stop(self, grace_s: float) -> None:
        """Stop taking runs over; runs going get `grace_s` to end, the others stop where they are and their leases
        are released, so another replica (or this one, restarted) goes on with them at once."""
        if not self._started:
            return
        self._started = False
        await self._rounds.stop()
        await end_within([going.task for going in self._going.values()], grace_s)
        await self._leases.stop()
        await self._journal.stop()
        with contextlib.suppress(Exception):  # else the leases run out
            await self._store.release_feature_runs(self.owner, self._clock.now())

    def _heard(self, payload: str) -> None:
        """Another replica cancelled a run: stop it here if it goes here."""
        going = self._going.get(payload)
        if going is not None:
            going.task.cancel()

    # -- starting runs ----------------------------------------------------------------------------------------------

    async def _feature(self, product: str, env: str, feature: str, version: int | None) -> tuple[Resolved, FeaturePlan]:
        resolved = await self._registry.resolve(product, env, version)
        plan = resolved.features.get(feature)
        if plan is None:
            raise NotFound.in_product(product, "feature", feature, Reason.FEATURE_NOT_FOUND)
        return resolved, plan

    async def _session(self, product: str, env: str, session: tuple[str, str] | None) -> Mapping[str, Any] | None:
        if session is None:
            return None
        return (await self._services.sessions.verify(product, env, session[0], session[1])).data

    async def run(self, call: RunCall, *, wait: bool, timeout_s: float | None) -> RunView:
        """Start a run; with `wait`, the run once it ended (or when `timeout_s` passed), else as it started."""
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        if call.version is not None and call.version <= 0:
            raise InvalidArgument.field("version", "must be 1 or more (0: the version pinned for the environment)")
        resolved, plan = await self._feature(call.product, call.env, call.feature, call.version)
        contract = plan.feature.input
        checked = check_input(contract, call.input, "input", root="") if contract else dict(call.input)
        session = await self._session(call.product, call.env, call.session)
        now = self._clock.now()
        text = _json(checked)
        fingerprint = hashlib.sha256(
            f"{call.feature}\n{resolved.version}\n{call.session[0] if call.session else ''}\n{text}".encode()
        ).hexdigest()
        run = FeatureRunRecord(
            run_id=uuid.uuid4().hex,
            product=call.product,
            env=resolved.env.slug,
            feature=call.feature,
            version=resolved.version,
            status=FeatureRunStatus.RUNNING,
            input=text,
            session_tag=call.session[0] if call.session else "",
            session_token=call.session[1] if call.session else "",
            idempotency_key=call.idempotency_key,
            request_hash=fingerprint if call.idempotency_key else "",
            output="",
            error_reason="",
            error_message="",
            failed_step="",
            replay_of=call.replay_of,
            parent_run=call.parent_run,
            takeovers=0,
            created_at=now,
            ended_at=None,
            expires_at=None,
            owner=self.owner,
            lease_until=now + self._settings.lease,
        )
        recorded: asyncio.Future[None] | None = None
        if call.idempotency_key:
            stored, created = await self._store.insert_feature_run(run)
            if not created:
                if stored.request_hash != fingerprint:
                    raise FailedPrecondition(
                        "the idempotency key started a run of another request",
                        reason=Reason.IDEMPOTENCY_KEY_REUSED,
                        metadata={"process_id": stored.run_id},
                    )
                ref = RunRef(stored.product, stored.env, stored.run_id)
                return await self._wait(ref, timeout_s) if wait else RunView(stored)
        else:
            recorded = self._journal.record(runs=(run,))
            if not wait:
                await recorded  # the process id answered names a stored run
            # A caller that waits hears of the run once it ended: its records (this one first) are written by then.
        execution = RunExecution(self._engine, run, plan, resolved, session, [])
        in_store = recorded is None or recorded.done()
        self._spawn(run.run_id, self._execute(execution), execution, held=in_store)
        if recorded is not None and not in_store:  # its lease is renewed once stored: a renewal would not find it
            recorded.add_done_callback(lambda _: self._hold(run.run_id))
        if not wait:
            return RunView(run)
        return await self._wait(RunRef(run.product, run.env, run.run_id), timeout_s)

    def _spawn(
        self,
        run_id: str,
        work: Coroutine[Any, Any, FeatureRunRecord],
        execution: RunExecution | None,
        *,
        held: bool = True,
    ) -> None:
        """Run `work` for the run; `held`: the run is stored under this replica's lease (renewed from now on)."""
        task = asyncio.get_running_loop().create_task(work, name=f"feature run {run_id}")
        going = self._going[run_id] = _Going(task, execution)
        if held:
            self._leases.hold(run_id)

        def done(_: asyncio.Task[FeatureRunRecord]) -> None:
            if self._going.get(run_id) is going:
                del self._going[run_id]
                self._leases.release(run_id)

        task.add_done_callback(done)

    def _hold(self, run_id: str) -> None:
        """Renew the run's lease from now on, if it still goes here."""
        if run_id in self._going:
            self._leases.hold(run_id)

    async def _execute(self, execution: RunExecution) -> FeatureRunRecord:
        run = execution.run
        try:
            return await execution.execute()
        except RunLost:
            log.info("feature run %s: stopped here (cancelled, or taken over by another replica)", run.run_id)
            return execution.run
        except Exception:
            log.exception("feature run %s failed unexpectedly", run.run_id)
            await self._end_broken(execution.run, Reason.INTERNAL, "the processor failed running it", execution.plan)
            return execution.run

    async def _adopt(self, run: FeatureRunRecord) -> FeatureRunRecord:
        """Go on with a run this replica claimed (its replica died) or resumed, from its records."""
        plan: FeaturePlan | None = None
        try:
            resolved, plan = await self._feature(run.product, run.env, run.feature, run.version)
            session = (
                await self._session(run.product, run.env, (run.session_tag, run.session_token))
                if run.session_tag
                else None
            )
            records = await self._store.feature_steps(run.run_id)
        except ProcessorError as exc:
            await self._end_broken(run, exc.reason, exc.message, plan)
            return run
        execution = RunExecution(self._engine, run, plan, resolved, session, records)
        going = self._going.get(run.run_id)
        if going is not None:
            going.execution = execution
        return await self._execute(execution)

    async def _end_broken(self, run: FeatureRunRecord, reason: str, message: str, plan: FeaturePlan | None) -> None:
        """End a run that cannot go on (its version or session is gone, a bug): failed, with why."""
        now = self._clock.now()
        retention = plan.feature.retention if plan is not None else DEFAULT_RETENTION
        change = FeatureRunChange(
            run.run_id,
            FeatureRunStatus.FAILED,
            error_reason=reason,
            error_message=message,
            ended_at=now,
            expires_at=now + retention,
        )
        with contextlib.suppress(RunLost):
            await self._journal.record(changes=(change,))

    # -- taking runs over -------------------------------------------------------------------------------------------

    async def _claim(self) -> bool:
        now = self._clock.now()
        batch = self._settings.claim_batch
        claimed = await self._store.claim_feature_runs(self.owner, now, now + self._settings.lease, batch)
        for run in claimed:
            if run.run_id in self._going:
                continue  # still winding down here after its lease ran out: it ends as RunLost
            log.info("feature run %s: taken over from a replica that stopped renewing it", run.run_id)
            self._spawn(run.run_id, self._adopt(run), None)
        return len(claimed) == batch

    async def _renew(self, run_ids: list[str], lease_until: datetime) -> set[str]:
        """Renew this replica's leases (`LeaseRenewer`'s heartbeat); a run no longer held here (cancelled by another
        replica, or taken over after this one stalled) is stopped here."""
        renewed = await self._store.renew_feature_runs(self.owner, run_ids, lease_until)
        for run_id in run_ids:
            going = self._going.get(run_id)
            if run_id not in renewed and going is not None:
                going.task.cancel()
        return renewed

    # -- reading ----------------------------------------------------------------------------------------------------

    async def _slug(self, product: str, env: str) -> str:
        environment, _ = await self._registry.environment(product, env)
        return environment.slug

    async def _record(self, ref: RunRef) -> FeatureRunRecord:
        slug = await self._slug(ref.product, ref.env)
        run = await self._store.get_feature_run(ref.process_id)
        if run is None or (run.product, run.env) != (ref.product, slug):
            raise _not_found(ref)
        return run

    async def get(self, ref: RunRef) -> RunView:
        """The run and its events; NOT_FOUND `FEATURE_RUN_NOT_FOUND` when the environment has none of that id."""
        run = await self._record(ref)
        going = self._going.get(run.run_id)
        if going is not None and going.execution is not None:
            return going.execution.view()  # this replica runs it: what it knows is newest
        records = {record.key: record for record in await self._store.feature_steps(run.run_id)}
        try:
            _, plan = await self._feature(run.product, run.env, run.feature, run.version)
        except NotFound:
            plan = None
        return run_view(plan, run, records)

    async def list_runs(
        self, product: str, env: str, feature: str, status: FeatureRunStatus | None, page_size: int, page_token: str
    ) -> tuple[list[FeatureRunRecord], str]:
        """One page of the environment's runs, newest first, and the next page's token."""
        size = paging.effective_page_size(page_size)
        slug = await self._slug(product, env)
        state = int(status) if status is not None else None
        listing = ("feature_runs", product, slug, feature, str(state or ""))
        after = paging.decode_page_token(listing, page_token, paging.time_position) if page_token else None
        where = FeatureRunFilter(product, slug, feature, state)
        runs = await self._store.list_feature_runs(where, after=after, limit=size + 1)
        return paging.page(
            runs,
            size,
            listing,
            lambda run: (run.created_at.timestamp(), run.run_id),
            lambda run: paging.json_weight(run.input, run.output, run.error_message),
        )

    async def _wait(self, ref: RunRef, timeout_s: float | None) -> RunView:
        """The run once it ended, or as it stands when `timeout_s` passed."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s if timeout_s is not None else None
        while True:
            left = max(give_up - loop.time(), 0.0) if give_up is not None else None
            going = self._going.get(ref.process_id)
            if going is not None:
                await asyncio.wait({going.task}, timeout=left)
                execution = going.execution
                if not going.task.done():  # the time is up: the run as it stands here (its records may be unwritten)
                    return execution.view() if execution is not None else await self.get(ref)
                if execution is not None and execution.run.status not in GOING:
                    return execution.view()
                continue  # stopped here (cancelled, taken over): the store says how it stands
            view = await self.get(ref)
            if view.run.status not in GOING or left == 0.0:
                return view
            poll = self._settings.watch_poll_s
            await asyncio.sleep(min(poll, left) if left is not None else poll)

    async def watch(self, ref: RunRef) -> AsyncIterator[WatchEvent]:
        """The run's recorded events, then each change until it ends."""
        run = await self._record(ref)
        changes = self._events.queue(run.run_id, MAX_EVENTS_QUEUED)
        return follow(
            changes, lambda: self.get(ref), lambda: ref.process_id in self._going, self._settings.watch_poll_s
        )

    # -- steering ---------------------------------------------------------------------------------------------------

    async def cancel(self, ref: RunRef) -> RunView:
        """Cancel a going run; FAILED_PRECONDITION `FEATURE_RUN_NOT_RUNNING` when it has ended."""
        run = await self._record(ref)
        retention = DEFAULT_RETENTION
        with contextlib.suppress(NotFound):
            retention = (await self._feature(run.product, run.env, run.feature, run.version))[1].feature.retention
        now = self._clock.now()
        cancelled = await self._store.cancel_feature_run(run.run_id, now, now + retention)
        if cancelled is None:
            raise self._not(run, Reason.FEATURE_RUN_NOT_RUNNING, "has ended")
        going = self._going.get(run.run_id)
        if going is not None:
            going.task.cancel()
            await asyncio.wait({going.task})
        return await self.get(ref)

    @staticmethod
    def _not(run: FeatureRunRecord, reason: Reason, why: str) -> FailedPrecondition:
        state = run.status.name.lower()
        return FailedPrecondition(
            f"feature run {run.run_id} {why} ({state})",
            reason=reason,
            metadata={"process_id": run.run_id, "status": state},
        )

    async def resume(self, ref: RunRef, *, wait: bool, timeout_s: float | None) -> RunView:
        """Go on with a failed or cancelled run from where it stopped; FAILED_PRECONDITION
        `FEATURE_RUN_NOT_RESUMABLE` for another."""
        run = await self._record(ref)
        if run.run_id in self._going:
            raise self._not(run, Reason.FEATURE_RUN_NOT_RESUMABLE, "is still stopping on this replica")
        now = self._clock.now()
        resumed = await self._store.resume_feature_run(run.run_id, self.owner, now + self._settings.lease)
        if resumed is None:
            why = "cannot be resumed: only a failed run that rolled nothing back, or a cancelled one, can"
            raise self._not(run, Reason.FEATURE_RUN_NOT_RESUMABLE, why)
        self._spawn(run.run_id, self._adopt(resumed[0]), None)
        if not wait:
            return RunView(resumed[0])
        return await self._wait(ref, timeout_s)

    async def replay(self, ref: RunRef, version: int | None, *, wait: bool, timeout_s: float | None) -> RunView:
        """A new run of the same feature, input and session, pinned to `version` (None: the replayed run's)."""
        run = await self._record(ref)
        call = RunCall(
            run.product,
            run.env,
            run.feature,
            json.loads(run.input),
            (run.session_tag, run.session_token) if run.session_tag else None,
            version=version if version is not None else run.version,
            replay_of=run.run_id,
        )
        return await self.run(call, wait=wait, timeout_s=timeout_s)

    async def _completed(self, call: RunCall, timeout_s: float | None) -> FeatureRunRecord:
        """Run `call` to its end; FAILED_PRECONDITION `FEATURE_RUN_FAILED` when it did not complete (in time)."""
        ended = (await self.run(call, wait=True, timeout_s=timeout_s)).run
        if ended.status != FeatureRunStatus.COMPLETED:
            state = ended.status.name.lower()
            raise FailedPrecondition(
                f"feature {call.feature!r} (run {ended.run_id}) is {state}: {ended.error_message or 'no output'}",
                reason=Reason.FEATURE_RUN_FAILED,
                metadata={"process_id": ended.run_id, "status": state},
            )
        return ended

    async def run_child(self, call: StepCall) -> Any:
        """A `feature` event: the child run (started once per key) once it ended; its output, or why it did not
        complete."""
        if not isinstance(call.input, dict):
            raise InvalidArgument.field("input", "a feature's input is an object")
        child = RunCall(
            call.product,
            call.env,
            call.address,
            call.input,
            call.session,
            call.idempotency_key,
            version=call.version,
            parent_run=call.run_id,
        )
        ended = await self._completed(child, None)
        return json.loads(ended.output) if ended.output else None

    async def run_target(self, call: RunCall, timeout_s: float) -> tuple[Any, str]:
        """A job's `feature` target (`FeatureTargets`): the run, waited for at most `timeout_s`; its
        `{process_id, status, output}` and its process id."""
        ended = await self._completed(call, timeout_s)
        result = {"process_id": ended.run_id, "status": "completed", "output": json.loads(ended.output or "null")}
        return result, ended.run_id
