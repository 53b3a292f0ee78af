"""JobService: proto in, JobRuntime call, proto out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypeVar

from ductape.processor.v1 import job_pb2, job_pb2_grpc
from google.protobuf import duration_pb2

from ductape_processor.api.calls import Context, product_env
from ductape_processor.api.values import (
    delta,
    moment,
    python_to_value,
    required,
    session_pair,
    struct_to_dict,
    timestamp,
)
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.jobs.codec import decode_spec
from ductape_processor.runtime.jobs.model import (
    DEFAULT_CATCH_UP,
    JobQuery,
    JobRecord,
    JobRetry,
    JobSpec,
    JobStatus,
    Overlap,
    Repeat,
    RunRecord,
    RunStatus,
    ScheduleCall,
    Target,
    TargetKind,
)
from ductape_processor.runtime.jobs.runtime import JobRef, JobRuntime

T = TypeVar("T")

_KINDS = {
    job_pb2.TARGET_KIND_ACTION: TargetKind.ACTION,
    job_pb2.TARGET_KIND_DATABASE_ACTION: TargetKind.DATABASE_ACTION,
    job_pb2.TARGET_KIND_NOTIFICATION: TargetKind.NOTIFICATION,
    job_pb2.TARGET_KIND_STORAGE: TargetKind.STORAGE,
    job_pb2.TARGET_KIND_PUBLISH: TargetKind.PUBLISH,
    job_pb2.TARGET_KIND_FEATURE: TargetKind.FEATURE,
}
_KIND_VALUES = {kind: value for value, kind in _KINDS.items()}
_OVERLAPS = {
    job_pb2.OVERLAP_POLICY_UNSPECIFIED: Overlap.SKIP,
    job_pb2.OVERLAP_POLICY_SKIP: Overlap.SKIP,
    job_pb2.OVERLAP_POLICY_BUFFER_ONE: Overlap.BUFFER_ONE,
    job_pb2.OVERLAP_POLICY_ALLOW: Overlap.ALLOW,
}
_OVERLAP_VALUES = {
    Overlap.SKIP: job_pb2.OVERLAP_POLICY_SKIP,
    Overlap.BUFFER_ONE: job_pb2.OVERLAP_POLICY_BUFFER_ONE,
    Overlap.ALLOW: job_pb2.OVERLAP_POLICY_ALLOW,
}


def _state(kind: type[JobStatus] | type[RunStatus], value: int, field: str) -> Any:
    """A status filter: None for unspecified, INVALID_ARGUMENT on `field` for a value the API does not define."""
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument.field(field, f"{value} is not a status") from None


def _duration(span: timedelta) -> duration_pb2.Duration:
    micros = round(span.total_seconds() * 1_000_000)
    return duration_pb2.Duration(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def _chosen(values: dict[Any, T], value: int, field: str) -> T:
    """The member an enum field names; INVALID_ARGUMENT on `field` for a number the API does not define (a newer
    client's), rather than a default that would do something else than asked."""
    chosen = values.get(value)
    if chosen is None:
        raise InvalidArgument.field(field, f"{value} is not one of the values the API defines")
    return chosen


def _target(given: job_pb2.JobTarget) -> Target:
    kind = _KINDS.get(given.kind)
    if kind is None:
        raise InvalidArgument.field(
            "target.kind",
            f"{given.kind} is not a target kind: action, database action, notification, storage, publish or feature",
        )
    return Target(
        kind,
        required(given.address, "target.address", "the resource, such as app_tag:action_tag"),
        struct_to_dict(given.input) if given.HasField("input") else {},
        session_pair(given),
    )


def _repeat(given: job_pb2.Repeat) -> Repeat:
    return Repeat(
        cron=given.cron,
        every=delta(given.every, "repeat.every") if given.HasField("every") else None,
        timezone=given.timezone or "UTC",
        limit=given.limit,
        end_at=moment(given.end_at, "repeat.end_at") if given.HasField("end_at") else None,
    )


def _retry(given: job_pb2.JobRetryPolicy) -> JobRetry:
    defaults = JobRetry()
    return JobRetry(
        max_retries=given.max_retries,
        initial_delay=(
            delta(given.initial_delay, "retry.initial_delay")
            if given.HasField("initial_delay")
            else defaults.initial_delay
        ),
        max_delay=delta(given.max_delay, "retry.max_delay") if given.HasField("max_delay") else defaults.max_delay,
        jitter=given.jitter if given.HasField("jitter") else defaults.jitter,
    )


def _ref(given: job_pb2.JobRef) -> JobRef:
    return JobRef(**product_env(given, "job."), job_id=given.job_id, name=given.name)


def job_message(job: JobRecord) -> job_pb2.Job:
    """A job as the API shows it."""
    spec = decode_spec(job.spec)
    target = spec.target
    message = job_pb2.Job(
        job_id=job.job_id,
        product=job.product,
        env=job.env,
        name=job.name,
        target=job_pb2.JobTarget(kind=_KIND_VALUES[target.kind], address=target.address),
        retry=job_pb2.JobRetryPolicy(
            max_retries=spec.retry.max_retries,
            initial_delay=_duration(spec.retry.initial_delay),
            max_delay=_duration(spec.retry.max_delay),
            jitter=spec.retry.jitter,
        ),
        overlap=_OVERLAP_VALUES[spec.overlap],
        catch_up_window=_duration(spec.catch_up),
        status=int(job.status),  # type: ignore[arg-type]
        runs=job.runs,
        create_time=timestamp(job.created_at),
        declared=job.declared,
    )
    message.target.input.update(target.input)
    if target.session is not None:
        message.target.session.tag = target.session[0]  # the token stays in the store
    if spec.repeat is not None:
        repeat = spec.repeat
        message.repeat.timezone = repeat.timezone
        message.repeat.limit = repeat.limit
        if repeat.every is not None:
            message.repeat.every.CopyFrom(_duration(repeat.every))
        else:
            message.repeat.cron = repeat.cron
        if repeat.end_at is not None:
            message.repeat.end_at.CopyFrom(timestamp(repeat.end_at))
    if job.next_run_at is not None:
        message.next_run_at.CopyFrom(timestamp(job.next_run_at))
    return message


def run_message(run: RunRecord) -> job_pb2.JobRun:
    """A run as the API shows it."""
    message = job_pb2.JobRun(
        run_id=run.run_id,
        job_id=run.job_id,
        due_time=timestamp(run.due_at),
        status=int(run.status),  # type: ignore[arg-type]
        attempts=run.attempts,
        error_reason=run.error_reason,
        error_message=run.error_message,
        process_id=run.process_id,
        reclaimed=run.reclaimed,
        trigger=run.trigger,  # type: ignore[arg-type]
    )
    if run.started_at is not None:
        message.start_time.CopyFrom(timestamp(run.started_at))
        message.lateness.CopyFrom(_duration(max(run.started_at - run.due_at, timedelta(0))))
    if run.ended_at is not None:
        message.end_time.CopyFrom(timestamp(run.ended_at))
    if run.result:
        python_to_value(json.loads(run.result), message.result)
    return message


class JobServicer(job_pb2_grpc.JobServiceServicer):
    """Serves JobService."""

    def __init__(self, runtime: JobRuntime) -> None:
        self._runtime = runtime

    async def Schedule(
        self, request: job_pb2.JobServiceScheduleRequest, context: Context
    ) -> job_pb2.JobServiceScheduleResponse:
        if not request.HasField("target"):
            raise InvalidArgument.field("target", "is required: what the job runs")
        catch_up = (
            delta(request.catch_up_window, "catch_up_window")
            if request.HasField("catch_up_window")
            else DEFAULT_CATCH_UP
        )
        spec = JobSpec(
            target=_target(request.target),
            repeat=_repeat(request.repeat) if request.HasField("repeat") else None,
            retry=_retry(request.retry),
            overlap=_chosen(_OVERLAPS, request.overlap, "overlap"),
            catch_up=catch_up,
        )
        job = await self._runtime.schedule(
            ScheduleCall(
                **product_env(request),
                spec=spec,
                name=request.name,
                start_at=moment(request.start_at, "start_at") if request.HasField("start_at") else None,
                delay=delta(request.delay, "delay") if request.HasField("delay") else None,
                replace=request.replace,
                idempotency_key=request.idempotency_key,
            )
        )
        response = job_pb2.JobServiceScheduleResponse(job_id=job.job_id, status=int(job.status))  # type: ignore[arg-type]
        if job.next_run_at is not None:
            response.next_run_at.CopyFrom(timestamp(job.next_run_at))
        return response

    async def Get(self, request: job_pb2.JobServiceGetRequest, context: Context) -> job_pb2.JobServiceGetResponse:
        return job_pb2.JobServiceGetResponse(job=job_message(await self._runtime.get(_ref(request.job))))

    async def List(self, request: job_pb2.JobServiceListRequest, context: Context) -> job_pb2.JobServiceListResponse:
        query = JobQuery(
            **product_env(request),
            status=_state(JobStatus, request.status, "status"),
            name=request.name,
            kind=_chosen(_KINDS, request.target_kind, "target_kind") if request.target_kind else None,
        )
        jobs, token = await self._runtime.list_jobs(query, request.page_size, request.page_token)
        return job_pb2.JobServiceListResponse(jobs=[job_message(job) for job in jobs], next_page_token=token)

    async def Cancel(
        self, request: job_pb2.JobServiceCancelRequest, context: Context
    ) -> job_pb2.JobServiceCancelResponse:
        return job_pb2.JobServiceCancelResponse(job=job_message(await self._runtime.cancel(_ref(request.job))))

    async def Pause(self, request: job_pb2.JobServicePauseRequest, context: Context) -> job_pb2.JobServicePauseResponse:
        return job_pb2.JobServicePauseResponse(job=job_message(await self._runtime.pause(_ref(request.job))))

    async def Resume(
        self, request: job_pb2.JobServiceResumeRequest, context: Context
    ) -> job_pb2.JobServiceResumeResponse:
        return job_pb2.JobServiceResumeResponse(job=job_message(await self._runtime.resume(_ref(request.job))))

    async def TriggerNow(
        self, request: job_pb2.JobServiceTriggerNowRequest, context: Context
    ) -> job_pb2.JobServiceTriggerNowResponse:
        run = await self._runtime.trigger_now(_ref(request.job))
        return job_pb2.JobServiceTriggerNowResponse(run=run_message(run))

    async def ListRuns(
        self, request: job_pb2.JobServiceListRunsRequest, context: Context
    ) -> job_pb2.JobServiceListRunsResponse:
        status = _state(RunStatus, request.status, "status")
        runs, token = await self._runtime.list_runs(_ref(request.job), status, request.page_size, request.page_token)
        return job_pb2.JobServiceListRunsResponse(runs=[run_message(run) for run in runs], next_page_token=token)

    async def WatchRuns(
        self, request: job_pb2.JobServiceWatchRunsRequest, context: Context
    ) -> AsyncIterator[job_pb2.JobServiceWatchRunsResponse]:
        events = await self._runtime.watch(**product_env(request), job_id=request.job_id)
        async for run in events:
            yield job_pb2.JobServiceWatchRunsResponse(run=run_message(run))
