"""The step types of features as they run: one entry per resource kind in `FeatureSteps`, with the same names as the
manifest's table (`kinds.py`). Each calls that kind's runtime the way its own service does (registry, session,
policies, execution log), with the event's rendered input, and answers what `$Sequence` reads of it.

Actions, database actions, notifications, storage saves and publishes go through the jobs' targets
(`runtime/jobs/targets.py`), which already call those runtimes from stored input; jobs, webhook emits and features
through their own runtimes, with the key the processor gives the event (so a repeated call finds the first one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, Protocol

from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.jobs.model import JobSpec, ScheduleCall, Target, TargetKind
from ductape_processor.runtime.jobs.runtime import JobRuntime
from ductape_processor.runtime.jobs.targets import JobTargets, TargetOptions
from ductape_processor.runtime.webhooks.emitter import EmitCall, WebhookRuntime

TARGET_STEPS: Final = ("action", "database_action", "notification", "storage", "publish")
"""The step types that are jobs' target kinds too, called through `JobTargets`."""


@dataclass(frozen=True, slots=True)
class StepCall:
    """One call of an event: where, what (`address` as the manifest names it), its rendered input, and how."""

    product: str
    env: str
    version: int
    address: str
    input: Any
    session: tuple[str, str] | None
    idempotency_key: str
    cache: str
    timeout_s: float
    run_id: str


class ChildRuns(Protocol):
    """Runs a feature as an event of another run: started once per key, answered once it ended."""

    async def run_child(self, call: StepCall) -> Any:
        """The child run's output; a ProcessorError when it did not complete."""


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument.field(field, "must be an object")
    return dict(value)


def _moment(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidArgument.field(field, "must be an RFC 3339 time")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument.field(field, "must be an RFC 3339 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class FeatureSteps:
    """Calls an event's resource through the runtime of its kind."""

    def __init__(self, targets: JobTargets, jobs: JobRuntime, webhooks: WebhookRuntime) -> None:
        self._targets = targets
        self._jobs = jobs
        self._webhooks = webhooks
        self._children: ChildRuns | None = None
        self.calls: dict[str, Callable[[StepCall], Awaitable[Any]]] = {
            **{kind: partial(self._target, TargetKind(kind)) for kind in TARGET_STEPS},
            "job": self._job,
            "webhook": self._webhook,
            "feature": self._feature,
        }
        """Step type -> how it runs (the manifest's `STEP_KINDS` has the same names)."""

    def serve_children(self, children: ChildRuns) -> None:
        """Who runs `feature` events (the features' runtime, built after this)."""
        self._children = children

    async def call(self, kind: str, call: StepCall) -> Any:
        """Call the resource; what `$Sequence` reads of the answer. A failure raises the kind's ProcessorError."""
        return await self.calls[kind](call)

    async def _target(self, kind: TargetKind, call: StepCall) -> Any:
        options = TargetOptions(call.timeout_s, call.version, call.idempotency_key, call.cache)
        target = Target(kind, call.address, _object(call.input, "input"), call.session)
        outcome = await self._targets.call(call.product, call.env, target, options)
        # An action's answer is its body: `$Sequence{step}{event}{id}` reads the upstream's JSON.
        return outcome.result["body"] if kind == TargetKind.ACTION else outcome.result

    async def _job(self, call: StepCall) -> Any:
        kind, _, address = call.address.partition(":")
        given = _object(call.input, "input")
        delay = given.get("delay")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0):
            raise InvalidArgument.field("input.delay", "must be a number of seconds, not negative")
        start = given.get("start_at")
        schedule = ScheduleCall(
            product=call.product,
            env=call.env,
            spec=JobSpec(Target(TargetKind(kind), address, _object(given.get("input"), "input.input"), call.session)),
            name=str(given.get("name") or ""),
            start_at=_moment(start, "input.start_at") if start is not None else None,
            delay=timedelta(seconds=delay) if delay is not None else None,
            idempotency_key=call.idempotency_key,
        )
        job = await self._jobs.schedule(schedule)
        return {"job_id": job.job_id, "next_run_at": job.next_run_at.isoformat() if job.next_run_at else None}

    async def _webhook(self, call: StepCall) -> Any:
        emit = EmitCall(call.product, call.env, call.address, call.input, call.idempotency_key)
        emitted = await self._webhooks.emit(emit)
        return {"message_id": emitted.message_id, "delivery_ids": list(emitted.delivery_ids)}

    async def _feature(self, call: StepCall) -> Any:
        assert self._children is not None, "serve_children is called when the processor is built"
        return await self._children.run_child(call)
