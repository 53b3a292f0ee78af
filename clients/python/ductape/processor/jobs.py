"""Jobs from Python: `processor.job.schedule(...)` and the calls that steer jobs and read their runs.

    scheduled = await processor.job.schedule(
        product="shop", env="dev", event="mailer:send_welcome", input={"body": {"email": "ada@example.com"}},
        delay=30, retries=2,
    )
    nightly = await processor.job.schedule(
        product="shop", env="dev", kind="publish", event="events:user-created", input={"message": {"ping": 1}},
        repeat={"cron": "30 1 * * *", "timezone": "Europe/London"}, name="nightly",
    )
    page = await processor.job.list_runs(product="shop", env="dev", job_id=scheduled.job_id)
    await processor.job.cancel(product="shop", env="dev", name="nightly")

`kind` is `action` (default), `database_action`, `notification`, `storage`, `publish` or `feature`. Times are
datetimes or Unix seconds; durations are timedeltas or seconds. Statuses read as lower-case words (`scheduled`,
`succeeded` ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, Unpack

from ductape.processor.calls import CallMetadata, ResourceClient, every_item
from ductape.processor.v1 import job_pb2, job_pb2_grpc
from ductape.processor.values import SessionLike, plain, session_ref, struct
from google.protobuf import duration_pb2, json_format, timestamp_pb2

Moment = datetime | float
Span = timedelta | float


class Environment(TypedDict):
    """A product's environment (slug or name)."""

    product: str
    env: str


class JobRef(Environment, total=False):
    """A job, by `job_id`, or by `name` for the environment's active job of that name."""

    job_id: str
    name: str


def _word(enum: Any, value: int, prefix: str) -> str:
    """`JOB_STATUS_SCHEDULED` -> `scheduled`."""
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _value(enum: Any, word: str | None, prefix: str) -> int:
    """`scheduled` -> JOB_STATUS_SCHEDULED's number (0 for none)."""
    return int(enum.Value(prefix + word.upper())) if word else 0


def _stamp(moment: Moment) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment if isinstance(moment, datetime) else datetime.fromtimestamp(moment, UTC))
    return stamp


def _duration(span: Span) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(span if isinstance(span, timedelta) else timedelta(seconds=span))
    return duration


def _moment(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


@dataclass(frozen=True, slots=True)
class ScheduledJob:
    """What Schedule answers (Ductape's `{job_id, status}`), and when the job first runs."""

    job_id: str
    status: str
    next_run_at: datetime | None


@dataclass(frozen=True, slots=True)
class Job:
    """A job: what it runs (`kind`, `event`, `input`), its state and its next occurrence."""

    job_id: str
    name: str
    kind: str
    event: str
    input: dict[str, Any]
    status: str
    next_run_at: datetime | None
    runs: int
    declared: bool
    raw: job_pb2.Job

    @classmethod
    def from_proto(cls, job: job_pb2.Job) -> Job:
        """A Job from its message."""
        return cls(
            job.job_id,
            job.name,
            _word(job_pb2.TargetKind, job.target.kind, "TARGET_KIND_"),
            job.target.address,
            plain(json_format.MessageToDict(job.target.input)),
            _word(job_pb2.JobStatus, job.status, "JOB_STATUS_"),
            _moment(job.next_run_at, job.HasField("next_run_at")),
            job.runs,
            job.declared,
            job,
        )


@dataclass(frozen=True, slots=True)
class JobRun:
    """One run: when it was due, started and ended, how it went, and what the target answered."""

    run_id: str
    job_id: str
    status: str
    trigger: str
    due_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    attempts: int
    result: Any
    error_reason: str
    error_message: str
    process_id: str
    lateness: timedelta
    reclaimed: bool

    @classmethod
    def from_proto(cls, run: job_pb2.JobRun) -> JobRun:
        """A JobRun from its message."""
        result = plain(json_format.MessageToDict(run.result)) if run.HasField("result") else None
        return cls(
            run.run_id,
            run.job_id,
            _word(job_pb2.RunStatus, run.status, "RUN_STATUS_"),
            _word(job_pb2.RunTrigger, run.trigger, "RUN_TRIGGER_"),
            run.due_time.ToDatetime(tzinfo=UTC),
            _moment(run.start_time, run.HasField("start_time")),
            _moment(run.end_time, run.HasField("end_time")),
            run.attempts,
            result,
            run.error_reason,
            run.error_message,
            run.process_id,
            run.lateness.ToTimedelta(),
            run.reclaimed,
        )


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of jobs, and the token of the next one ("" on the last)."""

    jobs: list[Job]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of runs, newest due first, and the token of the next one ("" on the last)."""

    runs: list[JobRun]
    next_page_token: str


def _repeat(given: Mapping[str, Any]) -> job_pb2.Repeat:
    repeat = job_pb2.Repeat(
        cron=given.get("cron", ""),
        timezone=given.get("timezone", given.get("tz", "")),
        limit=given.get("limit", 0),
    )
    if given.get("every") is not None:
        repeat.every.CopyFrom(_duration(given["every"]))
    end = given.get("end_at", given.get("endDate"))
    if end is not None:
        repeat.end_at.CopyFrom(_stamp(end))
    return repeat


def _retry(given: int | Mapping[str, Any]) -> job_pb2.JobRetryPolicy:
    if isinstance(given, int):
        return job_pb2.JobRetryPolicy(max_retries=given)
    policy = job_pb2.JobRetryPolicy(max_retries=given.get("max_retries", 0))
    for name in ("initial_delay", "max_delay"):
        if given.get(name) is not None:
            getattr(policy, name).CopyFrom(_duration(given[name]))
    if "jitter" in given:
        policy.jitter = bool(given["jitter"])
    return policy


class JobClient(ResourceClient):
    """`processor.job`: schedule jobs, steer them, read and follow their runs."""

    _stub: job_pb2_grpc.JobServiceAsyncStub

    async def schedule(
        self,
        *,
        product: str,
        env: str,
        event: str,
        kind: str = "action",
        input: Mapping[str, Any] | None = None,
        session: SessionLike | None = None,
        start_at: Moment | None = None,
        delay: Span | None = None,
        repeat: Mapping[str, Any] | None = None,
        retries: int | Mapping[str, Any] | None = None,
        overlap: str = "",
        catch_up_window: Span | None = None,
        name: str = "",
        replace: bool = False,
        idempotency_key: str = "",
        metadata: CallMetadata | None = None,
    ) -> ScheduledJob:
        """Schedule `event` (the resource of `kind`) with `input`: at `start_at`, after `delay`, or now; on `repeat`
        (`{cron | every, timezone, limit, end_at}`) if given; `retries` a count or `{max_retries, initial_delay,
        max_delay, jitter}`; `overlap` `skip`, `buffer_one` or `allow`."""
        request = job_pb2.JobServiceScheduleRequest(
            product=product,
            env=env,
            name=name,
            target=job_pb2.JobTarget(
                kind=_value(job_pb2.TargetKind, kind, "TARGET_KIND_"),  # type: ignore[arg-type]
                address=event,
                input=struct(input),
                session=session_ref(session),
            ),
            start_at=_stamp(start_at) if start_at is not None else None,
            delay=_duration(delay) if delay is not None else None,
            repeat=_repeat(repeat) if repeat is not None else None,
            retry=_retry(retries) if retries is not None else None,
            overlap=_value(job_pb2.OverlapPolicy, overlap, "OVERLAP_POLICY_"),  # type: ignore[arg-type]
            catch_up_window=_duration(catch_up_window) if catch_up_window is not None else None,
            replace=replace,
            idempotency_key=idempotency_key,
        )
        response = await self._call(self._stub.Schedule, request, metadata=metadata)
        return ScheduledJob(
            response.job_id,
            _word(job_pb2.JobStatus, response.status, "JOB_STATUS_"),
            _moment(response.next_run_at, response.HasField("next_run_at")),
        )

    async def _on_job(
        self, method: Any, request: Any, metadata: CallMetadata | None, job: JobRef, *, safe: bool = False
    ) -> Any:
        """A call whose request names one job (Get, Cancel, Pause, Resume, TriggerNow)."""
        return await self._call(method, request(job=job_pb2.JobRef(**job)), metadata=metadata, safe=safe)

    async def get(self, *, metadata: CallMetadata | None = None, **job: Unpack[JobRef]) -> Job:
        """A job, by id or by the name of an active job."""
        got = await self._on_job(self._stub.Get, job_pb2.JobServiceGetRequest, metadata, job, safe=True)
        return Job.from_proto(got.job)

    async def cancel(self, *, metadata: CallMetadata | None = None, **job: Unpack[JobRef]) -> Job:
        """Cancel a job (its runs waiting for a retry too)."""
        return Job.from_proto(
            (await self._on_job(self._stub.Cancel, job_pb2.JobServiceCancelRequest, metadata, job)).job
        )

    async def pause(self, *, metadata: CallMetadata | None = None, **job: Unpack[JobRef]) -> Job:
        """Pause a scheduled job."""
        return Job.from_proto((await self._on_job(self._stub.Pause, job_pb2.JobServicePauseRequest, metadata, job)).job)

    async def resume(self, *, metadata: CallMetadata | None = None, **job: Unpack[JobRef]) -> Job:
        """Resume a paused job."""
        return Job.from_proto(
            (await self._on_job(self._stub.Resume, job_pb2.JobServiceResumeRequest, metadata, job)).job
        )

    async def trigger_now(self, *, metadata: CallMetadata | None = None, **job: Unpack[JobRef]) -> JobRun:
        """Run the job once now, outside its schedule; answers the pending run."""
        return JobRun.from_proto(
            (await self._on_job(self._stub.TriggerNow, job_pb2.JobServiceTriggerNowRequest, metadata, job)).run
        )

    async def list(
        self,
        *,
        product: str,
        env: str,
        status: str | None = None,
        name: str = "",
        kind: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
    ) -> JobPage:
        """One page of the environment's jobs, newest first."""
        request = job_pb2.JobServiceListRequest(
            product=product,
            env=env,
            status=_value(job_pb2.JobStatus, status, "JOB_STATUS_"),  # type: ignore[arg-type]
            name=name,
            target_kind=_value(job_pb2.TargetKind, kind, "TARGET_KIND_"),  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._stub.List, request, metadata=metadata, safe=True)
        return JobPage([Job.from_proto(job) for job in response.jobs], response.next_page_token)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
        **job: Unpack[JobRef],
    ) -> RunPage:
        """One page of a job's runs, newest due first; only those of one `status` (`succeeded` ...) when given."""
        request = job_pb2.JobServiceListRunsRequest(
            job=job_pb2.JobRef(**job),
            status=_value(job_pb2.RunStatus, status, "RUN_STATUS_"),  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._stub.ListRuns, request, metadata=metadata, safe=True)
        return RunPage([JobRun.from_proto(run) for run in response.runs], response.next_page_token)

    def runs(
        self, *, status: str | None = None, metadata: CallMetadata | None = None, **job: Unpack[JobRef]
    ) -> AsyncIterator[JobRun]:
        """Every run of a job, newest due first, fetching pages as needed."""

        async def page(token: str) -> RunPage:
            return await self.list_runs(status=status, page_token=token, metadata=metadata, **job)

        return every_item(page, lambda listed: listed.runs)

    async def watch_runs(
        self, *, product: str, env: str, job_id: str = "", metadata: CallMetadata | None = None
    ) -> AsyncIterator[JobRun]:
        """The runs of the environment (or of one job) as they change, until the caller stops iterating."""
        request = job_pb2.JobServiceWatchRunsRequest(product=product, env=env, job_id=job_id)
        async for event in self._call.stream(self._stub.WatchRuns, request, metadata=metadata):
            yield JobRun.from_proto(event.run)
