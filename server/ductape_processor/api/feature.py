"""FeatureService: proto in, FeatureRuntime call, proto out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Final, Protocol, TypeVar

from ductape.processor.v1 import feature_pb2, feature_pb2_grpc
from google.protobuf import struct_pb2

from ductape_processor.api.calls import Context, call_options, product_env
from ductape_processor.api.values import json_to_value, pinned_version, required, set_timestamp, struct_to_dict
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.features.model import (
    FeatureRunStatus,
    FeatureStepRecord,
    RunCall,
    RunRef,
    RunView,
    StepView,
)
from ductape_processor.runtime.features.runtime import FeatureRuntime

WAIT_MARGIN_S: Final = 0.25
"""How long before the caller's deadline a waiting call answers with the run as it stands."""


def _timeout(context: Context, longest: float) -> float:
    """How long a waiting call may wait: the caller's deadline, less a margin to answer in, and at most `longest`
    (the processor's bound, for a call without a deadline or with a far one)."""
    remaining = context.time_remaining()
    return min(max(remaining - WAIT_MARGIN_S, 0.0), longest) if remaining is not None else longest


def _ref(given: feature_pb2.FeatureRunRef) -> RunRef:
    return RunRef(**product_env(given, "run."), process_id=required(given.process_id, "run.process_id", "the run's id"))


def _status(value: int) -> FeatureRunStatus | None:
    if not value:
        return None
    try:
        return FeatureRunStatus(value)
    except ValueError:
        raise InvalidArgument.field("status", f"{value} is not a status") from None


def _output(text: str, target: struct_pb2.Value) -> None:
    """A stored output (JSON the runtime wrote) as a Value; one no Value can hold (an integer past a double's range,
    nesting past MAX_JSON_DEPTH) as its JSON text, rather than a Value cut short where it failed."""
    if not json_to_value(text.encode("utf-8", "replace"), target, finite=False):
        target.Clear()
        target.string_value = text.encode("utf-8", "replace").decode()


def _call(target: feature_pb2.FeatureCall, record: FeatureStepRecord) -> None:
    target.status = int(record.status)  # type: ignore[assignment]
    target.attempts = record.attempts
    if record.started_at is not None:
        set_timestamp(target.start_time, record.started_at)
    if record.ended_at is not None:
        set_timestamp(target.end_time, record.ended_at)
    if record.output and record.output != "null":
        _output(record.output, target.output)
    target.error_reason = record.error_reason
    target.error_message = record.error_message


def step_message(step: StepView, target: feature_pb2.FeatureStep) -> feature_pb2.FeatureStep:
    """One event of a run as the API shows it (`target` filled in place)."""
    target.sequence = step.sequence
    target.event = step.event
    target.type = step.type
    if step.call is not None:
        _call(target.call, step.call)
        target.iterations = step.call.iteration
    if step.rollback is not None:
        _call(target.rollback, step.rollback)
    return target


def run_message(view: RunView, target: feature_pb2.FeatureRun) -> feature_pb2.FeatureRun:
    """A run (and its steps, when the view has them) as the API shows it (`target` filled in place)."""
    run = view.run
    target.process_id = run.run_id
    target.product = run.product
    target.env = run.env
    target.feature = run.feature
    target.version = run.version
    target.status = int(run.status)  # type: ignore[assignment]
    target.input.update(json.loads(run.input))
    if run.output:
        _output(run.output, target.output)
    target.error_reason = run.error_reason
    target.error_message = run.error_message
    target.failed_step = run.failed_step
    for step in view.steps:
        step_message(step, target.steps.add())
    set_timestamp(target.create_time, run.created_at)
    if run.ended_at is not None:
        set_timestamp(target.end_time, run.ended_at)
    target.takeovers = run.takeovers
    target.replay_of = run.replay_of
    target.parent_process_id = run.parent_run
    return target


class _RunAnswer(Protocol):
    """A response that carries one run (Run, Get, Cancel, Resume, Replay)."""

    @property
    def run(self) -> feature_pb2.FeatureRun: ...


Answer = TypeVar("Answer", bound=_RunAnswer)


def _answer(view: RunView, response: Answer) -> Answer:
    """`response`, its run set to `view`."""
    run_message(view, response.run)
    return response


class FeatureServicer(feature_pb2_grpc.FeatureServiceServicer):
    """Serves FeatureService."""

    def __init__(self, runtime: FeatureRuntime) -> None:
        self._runtime = runtime

    async def Run(
        self, request: feature_pb2.FeatureServiceRunRequest, context: Context
    ) -> feature_pb2.FeatureServiceRunResponse:
        options = call_options(request)
        call = RunCall(
            **product_env(request),
            feature=required(request.feature, "feature", "the feature's tag"),
            input=struct_to_dict(request.input),
            session=options["session"],
            idempotency_key=options["idempotency_key"],
            version=options["version"],
        )
        view = await self._runtime.run(call, wait=request.wait, timeout_s=_timeout(context, self._runtime.max_wait_s))
        return _answer(view, feature_pb2.FeatureServiceRunResponse())

    async def Get(
        self, request: feature_pb2.FeatureServiceGetRequest, context: Context
    ) -> feature_pb2.FeatureServiceGetResponse:
        return _answer(await self._runtime.get(_ref(request.run)), feature_pb2.FeatureServiceGetResponse())

    async def List(
        self, request: feature_pb2.FeatureServiceListRequest, context: Context
    ) -> feature_pb2.FeatureServiceListResponse:
        runs, token = await self._runtime.list_runs(
            **product_env(request),
            feature=request.feature,
            status=_status(request.status),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        response = feature_pb2.FeatureServiceListResponse(next_page_token=token)
        for run in runs:
            run_message(RunView(run), response.runs.add())
        return response

    async def Watch(
        self, request: feature_pb2.FeatureServiceWatchRequest, context: Context
    ) -> AsyncIterator[feature_pb2.FeatureServiceWatchResponse]:
        events = await self._runtime.watch(_ref(request.run))
        async for event in events:
            response = feature_pb2.FeatureServiceWatchResponse(status=int(event.status))  # type: ignore[arg-type]
            if event.step is not None:
                step_message(event.step, response.step)
            if event.ended is not None:
                run_message(event.ended, response.run)
            yield response

    async def Cancel(
        self, request: feature_pb2.FeatureServiceCancelRequest, context: Context
    ) -> feature_pb2.FeatureServiceCancelResponse:
        return _answer(await self._runtime.cancel(_ref(request.run)), feature_pb2.FeatureServiceCancelResponse())

    async def Resume(
        self, request: feature_pb2.FeatureServiceResumeRequest, context: Context
    ) -> feature_pb2.FeatureServiceResumeResponse:
        view = await self._runtime.resume(
            _ref(request.run), wait=request.wait, timeout_s=_timeout(context, self._runtime.max_wait_s)
        )
        return _answer(view, feature_pb2.FeatureServiceResumeResponse())

    async def Replay(
        self, request: feature_pb2.FeatureServiceReplayRequest, context: Context
    ) -> feature_pb2.FeatureServiceReplayResponse:
        view = await self._runtime.replay(
            _ref(request.run),
            pinned_version(request.version),
            wait=request.wait,
            timeout_s=_timeout(context, self._runtime.max_wait_s),
        )
        return _answer(view, feature_pb2.FeatureServiceReplayResponse())
