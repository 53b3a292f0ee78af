"""One run of a feature, executed by the replica holding its lease: its steps in DAG order, each event's call
recorded before the steps that depend on it start, retries, conditions, loops, and, when a step fails, the completed
events' compensations in reverse order of completion.

What is recorded, and when (`journal.py` writes it, a batch of runs' records per transaction):

- a call that is not safe to repeat is recorded `running` before it is made, so a replica taking the run over knows
  it may have been in flight; a call safe to repeat (a read, a PUT, a keyed call) is recorded when it ends only;
- every call's end (completed with its output, failed, skipped) is recorded before anything that reads it starts (a
  step only the run's end reads is written with the run's end);
- a loop records each run's output (`pending`, with the runs done) before the next one;
- the run's end (or its turn to roll back) is recorded before the caller hears of it.

A run taken over (`runtime.py`) starts again from these records: completed calls are not made again, their
outputs are read back; a call found `running` is made again only when it is safe to repeat or carries a key the
processor passes on (`idempotency_key`), otherwise it fails with FEATURE_STEP_OUTCOME_UNKNOWN (docs/features.md,
"The in-flight rule").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ductape_processor.errors import InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.features.journal import Journal
from ductape_processor.runtime.features.model import RunView, StepView, WatchEvent
from ductape_processor.runtime.features.plan import CallPlan, ComparisonPlan, EventPlan, FeaturePlan
from ductape_processor.runtime.features.steps import FeatureSteps, StepCall
from ductape_processor.runtime.features.watching import RunEvents, run_view
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.retry import Backoff
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.templates import RenderError, Scope
from ductape_processor.runtime.templates.operators import compare
from ductape_processor.runtime.templates.values import BadValue
from ductape_processor.store.feature_records import (
    FeatureRunChange,
    FeatureRunRecord,
    FeatureRunStatus,
    FeatureStepRecord,
    Phase,
    StepStatus,
)

log = logging.getLogger(__name__)

RETRY_BACKOFF = Backoff(0.2, 5.0)
"""The pause before an event's retry n: 200 ms doubling to 5 s, jittered (the processor's one backoff)."""
_DONE = (StepStatus.COMPLETED, StepStatus.SKIPPED, StepStatus.FAILED)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


class StepFailed(Exception):
    """An event failed after its retries (and without `allow_fail`): the run stops starting steps."""

    def __init__(self, step: str, reason: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.reason = reason
        self.message = message


class _Failure(Exception):
    """One attempt's failure: its reason and message, and whether another attempt may succeed."""

    def __init__(self, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class EngineServices:
    """What every run of this replica uses."""

    journal: Journal
    steps: FeatureSteps
    clock: Clock
    events: RunEvents
    secrets: Callable[[str], str | None]


class RunExecution:
    """Executes one run held by this replica, from its records to its end."""

    def __init__(
        self,
        services: EngineServices,
        run: FeatureRunRecord,
        plan: FeaturePlan,
        resolved: Resolved,
        session: Mapping[str, Any] | None,
        records: list[FeatureStepRecord],
    ) -> None:
        self._services = services
        self.run = run
        self.plan = plan
        self.records = {record.key: record for record in records}
        self._events = {(event.sequence, event.tag): event for event in plan.events}
        self._position = max((record.position for record in records), default=0)
        self.outputs: dict[str, dict[str, Any]] = {}
        for record in records:
            if record.phase == Phase.CALL and record.status == StepStatus.COMPLETED:
                self.outputs.setdefault(record.sequence, {})[record.event] = json.loads(record.output)
        apps = resolved.manifest.apps
        slug = resolved.env.slug
        self._scope = Scope(
            input=json.loads(run.input),
            variables={app.tag: app.variables.get(slug, {}) for app in apps},
            constants={app.tag: app.constants for app in apps},
            secrets=services.secrets,
            session=session,
            sequence=self.outputs,
        )
        self._session = (run.session_tag, run.session_token) if run.session_tag else None

    # -- views ------------------------------------------------------------------------------------------------------

    def view(self) -> RunView:
        """The run and its events as this replica knows them now."""
        return run_view(self.plan, self.run, self.records)

    def _step_changed(self, record: FeatureStepRecord) -> None:
        self.records[record.key] = record
        events = self._services.events
        if events.followed(self.run.run_id):
            event = self._events[(record.sequence, record.event)]
            view = StepView(
                record.sequence,
                record.event,
                event.call.kind,
                self.records.get((record.sequence, record.event, Phase.CALL)),
                self.records.get((record.sequence, record.event, Phase.ROLLBACK)),
            )
            events.publish(self.run.run_id, WatchEvent(view, self.run.status))

    async def _put(self, record: FeatureStepRecord, *, durable: bool = True) -> None:
        self._step_changed(record)
        written = self._services.journal.record(steps=(record,))
        if durable:
            await written

    async def _change(self, change: FeatureRunChange) -> None:
        await self._services.journal.record(changes=(change,))
        self.run = replace(
            self.run,
            status=change.status,
            output=change.output,
            error_reason=change.error_reason,
            error_message=change.error_message,
            failed_step=change.failed_step,
            ended_at=change.ended_at,
            expires_at=change.expires_at,
        )
        events = self._services.events
        if events.followed(self.run.run_id):
            ended = self.view() if change.ended_at is not None else None
            events.publish(self.run.run_id, WatchEvent(None, change.status, ended))

    def _record(self, event: EventPlan, phase: Phase, status: StepStatus, **fields: Any) -> FeatureStepRecord:
        before = self.records.get((event.sequence, event.tag, phase))
        values: dict[str, Any] = {
            "attempts": before.attempts if before else 0,
            "iteration": before.iteration if before else 0,
            "position": before.position if before else 0,
            "started_at": before.started_at if before else None,
            "ended_at": None,
            "output": before.output if before else "null",
            "error_reason": "",
            "error_message": "",
        }
        values.update(fields)
        return FeatureStepRecord(self.run.run_id, event.sequence, event.tag, phase, status, **values)

    # -- the run ----------------------------------------------------------------------------------------------------

    async def execute(self) -> FeatureRunRecord:
        """Run what is left of the run; its record as it ended (RunLost when another replica holds it now)."""
        if self.run.status == FeatureRunStatus.ROLLING_BACK:
            await self._roll_back(StepFailed(self.run.failed_step, self.run.error_reason, self.run.error_message))
            return self.run
        try:
            await self._forward()
        except StepFailed as failure:
            await self._failed(failure)
            return self.run
        try:
            output = self.plan.output.render(self._scope)
        except RenderError as exc:
            await self._failed(StepFailed("output", Reason.TEMPLATE_UNRESOLVED, f"{exc.selector}: {exc.message}"))
            return self.run
        await self._end(FeatureRunStatus.COMPLETED, output=_json(output))
        return self.run

    async def _forward(self) -> None:
        """Start each step once its parents are done; on a failure, start nothing more, let the going steps end,
        and raise the first failure."""
        done = {
            sequence.tag for sequence in self.plan.sequences if all(self._finished(event) for event in sequence.events)
        }
        waiting = [sequence for sequence in self.plan.sequences if sequence.tag not in done]
        going: dict[asyncio.Task[None], str] = {}
        failure: StepFailed | None = None
        try:
            while True:
                if failure is None:
                    for sequence in [s for s in waiting if all(parent in done for parent in s.parents)]:
                        waiting.remove(sequence)
                        going[asyncio.ensure_future(self._sequence(sequence.events))] = sequence.tag
                if not going:
                    break
                ended, _ = await asyncio.wait(going, return_when=asyncio.FIRST_COMPLETED)
                for task in ended:
                    tag = going.pop(task)
                    error = task.exception()
                    if isinstance(error, StepFailed):
                        failure = failure or error
                    elif error is not None:
                        raise error
                    else:
                        done.add(tag)
        finally:
            for task in going:
                task.cancel()
        if failure is not None:
            raise failure

    def _finished(self, event: EventPlan) -> bool:
        record = self.records.get((event.sequence, event.tag, Phase.CALL))
        return record is not None and record.status in _DONE

    async def _sequence(self, events: tuple[EventPlan, ...]) -> None:
        if len(events) == 1:
            await self._event(events[0])
            return
        results = await asyncio.gather(*(self._event(event) for event in events), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        for result in failures:
            if not isinstance(result, StepFailed):
                raise result
        if failures:
            raise failures[0]

    # -- one event --------------------------------------------------------------------------------------------------

    async def _event(self, event: EventPlan) -> None:
        record = self.records.get((event.sequence, event.tag, Phase.CALL))
        if record is not None and record.status in _DONE:
            return
        if event.condition and not self._holds(event, event.condition):
            now = self._services.clock.now()
            await self._put(self._record(event, Phase.CALL, StepStatus.SKIPPED, started_at=now, ended_at=now))
            return
        in_flight = record is not None and record.status == StepStatus.RUNNING
        iteration = record.iteration if record is not None else 0
        latest = json.loads(record.output) if record is not None and iteration else None
        own = self.outputs.setdefault(event.sequence, {})
        try:
            while True:
                latest = await self._attempts(event, event.call, Phase.CALL, in_flight)
                in_flight = False
                iteration += 1
                if not event.loop or iteration >= event.loop_max:
                    break
                own[event.tag] = latest  # the loop's condition reads the latest run's output
                if not self._holds(event, event.loop):
                    break
                await self._put(
                    self._record(event, Phase.CALL, StepStatus.PENDING, iteration=iteration, output=_json(latest))
                )
        except StepFailed as failure:
            own.pop(event.tag, None)
            ended = self._record(
                event,
                Phase.CALL,
                StepStatus.FAILED,
                iteration=iteration,
                ended_at=self._services.clock.now(),
                error_reason=failure.reason,
                error_message=failure.message,
            )
            await self._put(ended)
            if not event.allow_fail:
                raise
            return
        self._position += 1
        completed = self._record(
            event,
            Phase.CALL,
            StepStatus.COMPLETED,
            iteration=iteration,
            position=self._position,
            ended_at=self._services.clock.now(),
            output=_json(latest),
        )
        own[event.tag] = latest
        # Read by later steps: recorded before they start. Read by the run's end only: written with it (the journal
        # keeps the order), one transaction less a run.
        await self._put(completed, durable=event.sequence not in self.plan.sinks)

    def _holds(self, event: EventPlan, comparisons: tuple[ComparisonPlan, ...]) -> bool:
        try:
            return all(compare(c.left.render(self._scope), c.op, c.right.render(self._scope)) for c in comparisons)
        except RenderError as exc:
            raise StepFailed(event.name, Reason.TEMPLATE_UNRESOLVED, f"{exc.selector}: {exc.message}") from None
        except BadValue as exc:
            raise StepFailed(
                event.name, Reason.INVALID_ARGUMENT, f"the condition cannot compare: {exc.message}"
            ) from None

    async def _attempts(self, event: EventPlan, call: CallPlan, phase: Phase, in_flight: bool) -> Any:
        """Make the call, with the event's retries; its output, or StepFailed."""
        name = event.name if phase == Phase.CALL else f"{event.name} (rollback)"
        if in_flight and not call.safe:
            raise StepFailed(
                name,
                Reason.FEATURE_STEP_OUTCOME_UNKNOWN,
                "the call may have been made by the replica that died running it, and it is not safe to repeat "
                "(give the event an idempotency_key, or mark it idempotent)",
            )
        retry = 0
        while True:
            try:
                return await self._attempt(event, call, phase)
            except _Failure as failure:
                if not failure.retryable or retry >= event.retries:
                    raise StepFailed(name, failure.reason, failure.message) from None
            retry += 1
            await asyncio.sleep(RETRY_BACKOFF.delay(retry))

    async def _attempt(self, event: EventPlan, call: CallPlan, phase: Phase) -> Any:
        before = self.records.get((event.sequence, event.tag, phase))
        now = self._services.clock.now()
        attempts = (before.attempts if before else 0) + 1
        started = before.started_at if before is not None and before.started_at is not None else now
        try:
            rendered = call.input.render(self._scope)
            key = self._key(event, phase)
        except RenderError as exc:
            raise _Failure(Reason.TEMPLATE_UNRESOLVED, f"{exc.selector}: {exc.message}", retryable=False) from None
        running = self._record(event, phase, StepStatus.RUNNING, attempts=attempts, started_at=started)
        if call.safe:
            self._step_changed(running)  # recorded with its end: a repeat is harmless
        else:
            await self._put(running)  # recorded before the call: it must not be made twice
        run = self.run
        step = StepCall(
            run.product,
            run.env,
            run.version,
            call.address,
            rendered,
            self._session,
            key,
            event.cache if phase == Phase.CALL else "",
            event.timeout_s,
            run.run_id,
        )
        try:
            async with asyncio.timeout(event.timeout_s):
                return await self._services.steps.call(call.kind, step)
        except TimeoutError:
            raise _Failure(
                Reason.DEADLINE_EXCEEDED,
                f"the call took longer than its timeout ({event.timeout_s:g}s)",
                retryable=True,
            ) from None
        except (InvalidArgument, NotFound) as exc:
            raise _Failure(exc.reason, exc.message, retryable=False) from None
        except ProcessorError as exc:
            raise _Failure(exc.reason, exc.message, retryable=True) from None
        except RenderError as exc:
            raise _Failure(Reason.TEMPLATE_UNRESOLVED, f"{exc.selector}: {exc.message}", retryable=False) from None
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug on a kind's path fails the event, not the replica
            log.exception("feature run %s: %s failed unexpectedly", run.run_id, event.name)
            raise _Failure(Reason.INTERNAL, f"{type(exc).__name__}: the processor failed", retryable=False) from None

    def _key(self, event: EventPlan, phase: Phase) -> str:
        """The idempotency key the call carries: the processor's own for keyed kinds and `auto`, else the event's."""
        suffix = ":rollback" if phase == Phase.ROLLBACK else ""
        if event.auto_key or (
            event.call.keyed if phase == Phase.CALL else event.rollback is not None and event.rollback.keyed
        ):
            return f"feature:{self.run.run_id}:{event.sequence}:{event.tag}{suffix}"
        if event.key is not None and phase == Phase.CALL:
            return str(event.key.render(self._scope))
        return ""

    # -- the end ----------------------------------------------------------------------------------------------------

    async def _end(self, status: FeatureRunStatus, *, output: str = "", failure: StepFailed | None = None) -> None:
        now = self._services.clock.now()
        await self._change(
            FeatureRunChange(
                self.run.run_id,
                status,
                output=output,
                error_reason=failure.reason if failure else "",
                error_message=failure.message if failure else "",
                failed_step=failure.step if failure else "",
                ended_at=now,
                expires_at=now + self.plan.feature.retention,
            )
        )

    def _compensations(self) -> list[EventPlan]:
        """The completed events to undo, the last completed first, as the feature's strategy says."""
        strategy = self.plan.feature.rollback_strategy
        if strategy == "none":
            return []
        done = [
            (record.position, event)
            for event in self.plan.events
            if event.rollback is not None
            and (strategy == "reverse_all" or event.critical)
            and (record := self.records.get((event.sequence, event.tag, Phase.CALL))) is not None
            and record.status == StepStatus.COMPLETED
        ]
        return [event for _, event in sorted(done, key=lambda item: item[0], reverse=True)]

    async def _failed(self, failure: StepFailed) -> None:
        if not self._compensations():
            await self._end(FeatureRunStatus.FAILED, failure=failure)
            return
        await self._change(
            FeatureRunChange(
                self.run.run_id,
                FeatureRunStatus.ROLLING_BACK,
                error_reason=failure.reason,
                error_message=failure.message,
                failed_step=failure.step,
            )
        )
        await self._roll_back(failure)

    async def _roll_back(self, failure: StepFailed) -> None:
        """Each compensation in turn, the last completed event's first; the run ends rolled back when all of them
        succeeded, else failed (every compensation is tried, and each result recorded)."""
        broken: list[StepFailed] = []
        for event in self._compensations():
            record = self.records.get((event.sequence, event.tag, Phase.ROLLBACK))
            if record is not None and record.status in _DONE:
                if record.status == StepStatus.FAILED:
                    broken.append(StepFailed(f"{event.name} (rollback)", record.error_reason, record.error_message))
                continue
            assert event.rollback is not None
            in_flight = record is not None and record.status == StepStatus.RUNNING
            try:
                output = await self._attempts(event, event.rollback, Phase.ROLLBACK, in_flight)
            except StepFailed as exc:
                broken.append(exc)
                ended = self._record(
                    event,
                    Phase.ROLLBACK,
                    StepStatus.FAILED,
                    ended_at=self._services.clock.now(),
                    error_reason=exc.reason,
                    error_message=exc.message,
                )
            else:
                ended = self._record(
                    event,
                    Phase.ROLLBACK,
                    StepStatus.COMPLETED,
                    ended_at=self._services.clock.now(),
                    output=_json(output),
                )
            await self._put(ended)
        if not broken:
            await self._end(FeatureRunStatus.ROLLED_BACK, failure=failure)
            return
        first = broken[0]
        await self._end(
            FeatureRunStatus.FAILED,
            failure=StepFailed(
                failure.step,
                Reason.FEATURE_ROLLBACK_FAILED,
                f"{failure.message}; then the compensation of {first.step} failed ({first.reason}: {first.message})",
            ),
        )
