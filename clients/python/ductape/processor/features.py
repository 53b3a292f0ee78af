"""Features from Python: `processor.feature.run(...)` and the calls that read, follow and steer runs.

    run = await processor.feature.run(
        product="shop", env="dev", feature="signup", input={"email": "ada@example.com"}, wait=True
    )
    print(run.status, run.output)                      # "completed", the feature's output
    started = await processor.feature.run(product="shop", env="dev", feature="signup", input={...})
    async for event in processor.feature.watch(product="shop", env="dev", process_id=started.process_id):
        print(event.status, event.step and (event.step.sequence, event.step.event, event.step.call.status))

Statuses read as lower-case words: a run is `running`, `completed`, `failed`, `rolled_back`, `rolling_back` or
`cancelled`; a call `pending`, `running`, `completed`, `failed` or `skipped`. A run that failed is data, not an
exception: `run.ok` is False and `run.error_reason`, `run.error_message` and `run.failed_step` say why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict, Unpack

from ductape.processor.calls import CallMetadata, ResourceClient, every_item
from ductape.processor.v1 import feature_pb2, feature_pb2_grpc
from ductape.processor.values import SessionLike, enum_word, from_value, moment, record_from, session_ref, struct


class RunRef(TypedDict):
    """A run: the product, its environment (slug or name) and the run's `process_id`."""

    product: str
    env: str
    process_id: str


def _value(message: Any, field: str) -> Any:
    return from_value(getattr(message, field)) if message.HasField(field) else None


@dataclass(frozen=True, slots=True)
class FeatureCall:
    """One call of a run (an event's, or its compensation's) as recorded."""

    status: str
    attempts: int
    started_at: datetime | None
    ended_at: datetime | None
    output: Any
    error_reason: str
    error_message: str

    @classmethod
    def from_proto(cls, call: feature_pb2.FeatureCall) -> FeatureCall:
        """A FeatureCall from its message."""
        return record_from(
            cls,
            call,
            status=enum_word(feature_pb2.FeatureStepStatus, call.status, "FEATURE_STEP_STATUS_"),
            started_at=moment(call, "start_time"),
            ended_at=moment(call, "end_time"),
            output=_value(call, "output"),
        )


@dataclass(frozen=True, slots=True)
class FeatureStep:
    """One event of a run: its call and, once the run rolled back, its compensation (None: not made)."""

    sequence: str
    event: str
    type: str
    call: FeatureCall | None
    iterations: int
    rollback: FeatureCall | None

    @classmethod
    def from_proto(cls, step: feature_pb2.FeatureStep) -> FeatureStep:
        """A FeatureStep from its message."""
        return record_from(
            cls,
            step,
            call=FeatureCall.from_proto(step.call) if step.HasField("call") else None,
            rollback=FeatureCall.from_proto(step.rollback) if step.HasField("rollback") else None,
        )


@dataclass(frozen=True, slots=True)
class FeatureRun:
    """A run: where it stands, its output or why it failed, and (from get, and a waited run) its events."""

    process_id: str
    product: str
    env: str
    feature: str
    version: int
    status: str
    input: dict[str, Any]
    output: Any
    error_reason: str
    error_message: str
    failed_step: str
    steps: list[FeatureStep]
    created_at: datetime
    ended_at: datetime | None
    takeovers: int
    replay_of: str
    parent_process_id: str
    raw: feature_pb2.FeatureRun

    @property
    def ok(self) -> bool:
        """True once the run completed."""
        return self.status == "completed"

    def step(self, sequence: str, event: str) -> FeatureStep:
        """The event `event` of step `sequence` (KeyError when the run has no such event)."""
        for step in self.steps:
            if (step.sequence, step.event) == (sequence, event):
                return step
        raise KeyError(f"{sequence}.{event}")

    @classmethod
    def from_proto(cls, run: feature_pb2.FeatureRun) -> FeatureRun:
        """A FeatureRun from its message."""
        return record_from(
            cls,
            run,
            status=enum_word(feature_pb2.FeatureRunStatus, run.status, "FEATURE_RUN_STATUS_"),
            input={key: from_value(value) for key, value in run.input.fields.items()},
            output=_value(run, "output"),
            steps=[FeatureStep.from_proto(step) for step in run.steps],
            created_at=run.create_time.ToDatetime(tzinfo=UTC),
            ended_at=moment(run, "end_time"),
            raw=run,
        )


@dataclass(frozen=True, slots=True)
class FeatureEvent:
    """One change of a watched run: the event that changed (None when the run itself did), the run's status, and on
    the stream's last event the ended run."""

    step: FeatureStep | None
    status: str
    run: FeatureRun | None


@dataclass(frozen=True, slots=True)
class FeatureRunPage:
    """One page of runs, newest first, without their steps, and the token of the next one ("" on the last)."""

    runs: list[FeatureRun]
    next_page_token: str


class FeatureClient(ResourceClient):
    """`processor.feature`: run features, read, follow, cancel, resume and replay their runs."""

    _stub: feature_pb2_grpc.FeatureServiceAsyncStub

    async def run(
        self,
        *,
        product: str,
        env: str,
        feature: str,
        input: Mapping[str, Any] | None = None,
        session: SessionLike | None = None,
        wait: bool = False,
        idempotency_key: str = "",
        version: int = 0,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
    ) -> FeatureRun:
        """Start a run of `feature`. With `wait`, the run once it ended (within `timeout`, else as it stands);
        without, at once: its `process_id` follows it (`get`, `watch`)."""
        request = feature_pb2.FeatureServiceRunRequest(
            product=product,
            env=env,
            feature=feature,
            input=struct(input),
            session=session_ref(session),
            idempotency_key=idempotency_key,
            wait=wait,
            version=version,
        )
        return FeatureRun.from_proto((await self._call(self._stub.Run, request, timeout, metadata)).run)

    async def get(self, *, metadata: CallMetadata | None = None, **run: Unpack[RunRef]) -> FeatureRun:
        """A run and each of its events."""
        request = feature_pb2.FeatureServiceGetRequest(run=feature_pb2.FeatureRunRef(**run))
        return FeatureRun.from_proto((await self._call(self._stub.Get, request, metadata=metadata, safe=True)).run)

    async def list(
        self,
        *,
        product: str,
        env: str,
        feature: str = "",
        status: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
    ) -> FeatureRunPage:
        """One page of the environment's runs, newest first; of one `feature`, in one `status`, when given."""
        request = feature_pb2.FeatureServiceListRequest(
            product=product,
            env=env,
            feature=feature,
            status=feature_pb2.FeatureRunStatus.Value("FEATURE_RUN_STATUS_" + status.upper()) if status else 0,  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._stub.List, request, metadata=metadata, safe=True)
        return FeatureRunPage([FeatureRun.from_proto(run) for run in response.runs], response.next_page_token)

    def runs(
        self,
        *,
        product: str,
        env: str,
        feature: str = "",
        status: str | None = None,
        metadata: CallMetadata | None = None,
    ) -> AsyncIterator[FeatureRun]:
        """Every run of the environment (of one `feature`, in one `status`), newest first, page after page."""

        async def fetch(token: str) -> FeatureRunPage:
            return await self.list(
                product=product, env=env, feature=feature, status=status, page_token=token, metadata=metadata
            )

        return every_item(fetch, lambda page: page.runs)

    async def watch(
        self, *, timeout: float | None = None, metadata: CallMetadata | None = None, **run: Unpack[RunRef]
    ) -> AsyncIterator[FeatureEvent]:
        """The run's recorded events, then each change until it ends (the last event carries the ended run)."""
        request = feature_pb2.FeatureServiceWatchRequest(run=feature_pb2.FeatureRunRef(**run))
        async for response in self._call.stream(self._stub.Watch, request, timeout, metadata):
            yield FeatureEvent(
                FeatureStep.from_proto(response.step) if response.HasField("step") else None,
                enum_word(feature_pb2.FeatureRunStatus, response.status, "FEATURE_RUN_STATUS_"),
                FeatureRun.from_proto(response.run) if response.HasField("run") else None,
            )

    async def cancel(self, *, metadata: CallMetadata | None = None, **run: Unpack[RunRef]) -> FeatureRun:
        """Cancel a running run: no step starts after this, nothing is rolled back."""
        request = feature_pb2.FeatureServiceCancelRequest(run=feature_pb2.FeatureRunRef(**run))
        return FeatureRun.from_proto((await self._call(self._stub.Cancel, request, metadata=metadata)).run)

    async def resume(
        self,
        *,
        wait: bool = False,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **run: Unpack[RunRef],
    ) -> FeatureRun:
        """Go on with a failed or cancelled run from where it stopped (its failed events run again)."""
        request = feature_pb2.FeatureServiceResumeRequest(run=feature_pb2.FeatureRunRef(**run), wait=wait)
        return FeatureRun.from_proto((await self._call(self._stub.Resume, request, timeout, metadata)).run)

    async def replay(
        self,
        *,
        version: int = 0,
        wait: bool = False,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **run: Unpack[RunRef],
    ) -> FeatureRun:
        """A new run with the run's input and session, on the run's version or `version`."""
        request = feature_pb2.FeatureServiceReplayRequest(
            run=feature_pb2.FeatureRunRef(**run), version=version, wait=wait
        )
        return FeatureRun.from_proto((await self._call(self._stub.Replay, request, timeout, metadata)).run)
