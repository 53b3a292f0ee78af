"""The dispatches of received webhooks, durable: a webhook is stored with its dispatch pending and leased to the
replica that accepted it, which dispatches it at once (the fast path: no claim between the answer and the publish);
should that replica die first, or the dispatch fail, the store still holds it pending, and a replica's claim rounds
(`ClaimRounds`, store/leases.py) take it once its lease has run out or its retry falls due.

A dispatch publishes the webhook to the receive's topic, schedules the receive's job (JobService's path), starts a
run of the receive's feature (FeatureService's path, not waiting for the run), or several of them. The job and the
run are made under the received webhook's id as their idempotency key, so a repeat (a dispatch retried, or taken over
from a replica that died before recording it) finds the job scheduled or the run started first, by its key when the
request is refused now (a newer version changed the job's settings or the run's version). A dispatch is done
once the run is started: the run's own failures are the run's (its retries, its rollback, Resume), never a reason to
dispatch again. A dispatch that fails is tried again with backoff (1 s doubling to 10 min) up to `DISPATCH_ATTEMPTS`
attempts in all (about three hours), then it has failed for good (logged: `received webhook not dispatched`); one the
webhook's content cannot be dispatched at all (INVALID_ARGUMENT: a body that is not a JSON object for an action's job
or a feature, or one the feature's input contract refuses) fails at once.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Final, NoReturn, Protocol

from ductape_processor.errors import FailedPrecondition, InvalidArgument, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import OutgoingMessage
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.features.model import RunCall, RunView
from ductape_processor.runtime.jobs.declared import declared_retry
from ductape_processor.runtime.jobs.model import JobSpec, ScheduleCall, Target, TargetKind
from ductape_processor.runtime.jobs.runtime import JobRuntime
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.leases import ClaimedWork, ClaimLimits, EndBatches
from ductape_processor.runtime.policies.retry import Backoff
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.registry.webhooks import Dispatch, DispatchJob
from ductape_processor.store.base import Store
from ductape_processor.store.webhook_records import DispatchEnd, DispatchStatus, ReceivedRecord

log = logging.getLogger(__name__)

HEADER_ATTRIBUTE: Final = "header."
"""The prefix of the attributes that carry a received webhook's headers on its dispatch topic."""
MAX_HEADER_ATTRIBUTES: Final = 48
"""Headers carried as attributes at most (the broker takes 64 attributes)."""
MAX_BODY_DEPTH: Final = 32
"""The deepest JSON body (objects and arrays inside each other) given to a job or a feature run as its input: what the
API hands on as a `google.protobuf.Value` (api/values.py's MAX_JSON_DEPTH), through which the job's or the run's input
is read back (a deeper input would make Get and List of the runs fail)."""
DISPATCH_ATTEMPTS: Final = 20
"""Attempts at a dispatch in all; with `DISPATCH_BACKOFF`, about three hours of them."""
DISPATCH_BACKOFF: Final = Backoff(1.0, 600.0)
END_BATCH: Final = 500
"""Dispatch ends written in one store call at most."""
END_LINGER_S: Final = 0.2
"""How long a dispatch's end waits for others to be written with (nothing waits on it, and its lease covers it): one
store write for the webhooks of that moment, rather than one each on the path of the next webhook's insert."""


DISPATCH_LIMITS: Final = ClaimLimits(poll_s=5.0, claim_batch=100, concurrency=256)
"""Dispatches: a fallback poll every 5 s, claims of 100, 256 at once."""


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """The rhythm of dispatches: the lease of a claimed dispatch, and how claims go."""

    lease: timedelta = timedelta(seconds=30)
    """Longer than a dispatch takes (a publish waits for its broker 8 s at most, PUBLISH_LIMIT_S)."""
    limits: ClaimLimits = DISPATCH_LIMITS


def attributes(record: ReceivedRecord, headers: Mapping[str, str]) -> dict[str, str]:
    """The attributes a received webhook is published with: its ids, and its headers (those that fit)."""
    carried = {"webhook": record.webhook, "webhook_received_id": record.received_id}
    if record.webhook_id != record.received_id:
        carried["webhook_id"] = record.webhook_id
    for name, value in list(headers.items())[:MAX_HEADER_ATTRIBUTES]:
        key = HEADER_ATTRIBUTE + name
        if len(value) <= 4096 and all(c.isalnum() or c in "-_." for c in key):
            carried[key] = value
    return carried


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether `document` nests objects and arrays more than `limit` levels deep (without recursing)."""
    level: list[Any] = [document]
    for _ in range(limit):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ())
        ]
    return any(isinstance(value, dict | list) for value in level)


class _Unfit(ValueError):
    """A JSON body that parses but that no job or run can carry (JSON numbers and text travel as protobuf's)."""


def _out_of_range(text: str) -> NoReturn:
    raise _Unfit(f"holds a number out of range ({text[:24]}: NaN, Infinity and beyond ±1.8e308 are not JSON values)")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        _out_of_range(text)
    return number


def _finite_int(text: str) -> int:
    # An integer past a double has no protobuf number (JobService.Get answered INTERNAL); int() refuses 4300 digits.
    number = int(text) if len(text) <= 320 else None
    if number is None or abs(number) > sys.float_info.max:
        _out_of_range(text)
    return number


_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


def json_body(record: ReceivedRecord, taker: str) -> dict[str, Any]:
    """The webhook's body as the JSON object `taker` takes; INVALID_ARGUMENT when it is not one, nests deeper than
    `MAX_BODY_DEPTH`, or holds what no job or run can carry: a number past a double (NaN, Infinity, 1e999), text
    with a lone surrogate (`\\ud800`), bytes that are not UTF-8."""
    try:
        document = json.loads(
            record.body, parse_constant=_out_of_range, parse_float=_finite_float, parse_int=_finite_int
        )
        if _SURROGATE_ESCAPE.search(record.body):  # rare: then check the text is Unicode (a pair is)
            json.dumps(document, ensure_ascii=False).encode()
    except _Unfit as exc:
        raise InvalidArgument(f"the webhook's body {exc}, which {taker} cannot take") from None
    except UnicodeEncodeError:
        raise InvalidArgument(f"the webhook's body holds a lone surrogate, which {taker} cannot take") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"the webhook's body is not UTF-8 JSON, which {taker} takes") from None
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise InvalidArgument(f"the webhook's body is not a JSON object, which {taker} takes")
    if _deeper_than(document, MAX_BODY_DEPTH):
        raise InvalidArgument(
            f"the webhook's body nests deeper than {MAX_BODY_DEPTH} levels, which {taker} cannot take"
        )
    return document


def job_input(job: DispatchJob, record: ReceivedRecord) -> dict[str, Any]:
    """What the job of a received webhook runs with: the JSON body as an action's `body` or a database action's
    `data`, or the body as a file named `<webhook>/<received id>` for a storage; INVALID_ARGUMENT when the body is
    not the JSON object those need."""
    if job.kind == "storage":
        return {
            "file_name": f"{record.webhook}/{record.received_id}",
            "content_type": record.content_type,
            "data": base64.b64encode(record.body).decode(),
        }
    document = json_body(record, f"a {job.kind} job")
    return {"body": document} if job.kind == "action" else {"data": document}


class FeatureStarts(Protocol):
    """Starts feature runs (FeatureRuntime)."""

    async def run(self, call: RunCall, *, wait: bool, timeout_s: float | None) -> RunView:
        """Start a run (`wait` False: answered once it is stored, as it started)."""


class DispatchWorker:
    """Dispatches received webhooks: those this replica accepts (`dispatch`), and those its claims find due."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        brokers: BrokerRuntime,
        jobs: JobRuntime,
        features: FeatureStarts,
        clock: Clock,
        settings: DispatchSettings,
    ) -> None:
        self._store = store
        self._registry = registry
        self._brokers = brokers
        self._jobs = jobs
        self._features = features
        self._clock = clock
        self._settings = settings
        self.owner = uuid.uuid4().hex
        """This replica's name on the leases it holds."""
        self._work = ClaimedWork("webhook dispatches", self._claim, store.next_dispatch_moment, clock, settings.limits)
        self._ends = EndBatches("webhook dispatch ends", self._store.end_dispatches, END_BATCH, END_LINGER_S)

    def start(self) -> None:
        """Start claiming dispatches that fall due (retries, and those of replicas that died)."""
        self._work.rounds.start()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; dispatches going get `grace_s` to end (their leases run out otherwise, and a replica makes
        them again); the ends are written."""
        await self._work.stop(grace_s)
        await self._ends.close()

    def held(self, record: ReceivedRecord, dispatch: Dispatch | None) -> ReceivedRecord:
        """`record` as the accepting replica stores it: with nothing to dispatch, or its dispatch pending, its first
        attempt counted and leased to this replica."""
        if dispatch is None:
            return record
        now = self._clock.now()
        return replace(
            record,
            dispatch_status=DispatchStatus.PENDING,
            dispatch_attempts=1,
            dispatch_at=now,
            lease_owner=self.owner,
            lease_until=now + self._settings.lease,
        )

    def dispatch(self, record: ReceivedRecord, headers: Mapping[str, str]) -> None:
        """Dispatch a webhook this replica holds (stored by `held`, or claimed) in the background."""
        self._work.run(self._attempt(record, headers))

    async def _claim(self, free: int) -> int:
        now = self._clock.now()
        claimed = await self._store.claim_dispatches(self.owner, now, now + self._settings.lease, free)
        for record in claimed:
            self.dispatch(record, json.loads(record.headers))
        return len(claimed)

    async def _target(self, record: ReceivedRecord) -> Dispatch:
        resolved = await self._registry.resolve(record.product, record.env)
        webhook = next((w for w in resolved.manifest.webhooks if w.tag == record.webhook), None)
        receive = webhook.receive.get(resolved.env.slug) if webhook is not None else None
        if receive is None or receive.dispatch is None:
            raise FailedPrecondition(
                "the webhook's receive no longer dispatches in the product's manifest",
                reason=Reason.WEBHOOK_NOT_DISPATCHED,
            )
        return receive.dispatch

    async def _attempt(self, record: ReceivedRecord, headers: Mapping[str, str]) -> None:
        try:
            dispatch = await self._target(record)
            made: dict[str, str] = {}
            if dispatch.job is not None:
                made["job_id"] = await self._schedule(record, dispatch.job)
            if dispatch.feature is not None:
                made["process_id"] = await self._start(record, dispatch.feature)
            if dispatch.publish is not None:
                # No idempotency key: its claim and record would be two more store writes on the path to the
                # subscriber. A publish made again (its answer lost, or its replica dead before the dispatch was
                # recorded) stores a second copy: subscribers drop repeats by `webhook_received_id`.
                outgoing = OutgoingMessage(
                    record.body, record.content_type or "application/octet-stream", attributes(record, headers)
                )
                made["message_id"] = await self._brokers.publish(record.product, record.env, dispatch.publish, outgoing)
            end = DispatchEnd(record.received_id, self.owner, DispatchStatus.DISPATCHED, None, json.dumps(made))
        except ProcessorError as exc:
            end = self._failed(record, exc.message, final=isinstance(exc, InvalidArgument))
        except Exception as exc:  # a bug on this path must fail the attempt, not lose the dispatch
            log.exception("received webhook %s: the dispatch failed unexpectedly", record.received_id)
            end = self._failed(record, f"{type(exc).__name__}: the processor failed", final=False)
        self._ends.add(end)
        if end.status == DispatchStatus.PENDING:
            self._work.wake()  # its retry may be due sooner than the rounds' wait

    async def _schedule(self, record: ReceivedRecord, job: DispatchJob) -> str:
        spec = JobSpec(Target(TargetKind(job.kind), job.event, job_input(job, record)), retry=declared_retry(job.retry))
        # Started when it was received: the same request every attempt, so a repeat answers the job scheduled first.
        key = record.received_id
        call = ScheduleCall(record.product, record.env, spec, start_at=record.received_at, idempotency_key=key)
        try:
            return (await self._jobs.schedule(call)).job_id
        except ProcessorError:
            # The key scheduled a job already, and the request would be refused now: the receive's job settings
            # changed since with a newer version (IDEMPOTENCY_KEY_REUSED: the job's fingerprint has its spec), or its
            # target went. That job is this webhook's: it is not scheduled twice.
            scheduled = await self._store.job_by_key(record.product, record.env, key)
            if scheduled is None:
                raise
            return scheduled.job_id

    async def _start(self, record: ReceivedRecord, feature: str) -> str:
        """Start the feature's run with the JSON body as its input, once per webhook; its process id."""
        key = record.received_id
        call = RunCall(record.product, record.env, feature, json_body(record, "a feature"), idempotency_key=key)
        try:
            return (await self._features.run(call, wait=False, timeout_s=None)).run.run_id
        except ProcessorError:
            # The key started a run already, and the request would be refused now: a newer version was pinned since
            # (IDEMPOTENCY_KEY_REUSED: the run's fingerprint has its version), or it changed the feature. That run is
            # this webhook's: it is not started twice.
            started = await self._store.feature_run_by_key(record.product, record.env, key)
            if started is None:
                raise
            return started.run_id

    def _failed(self, record: ReceivedRecord, error: str, *, final: bool) -> DispatchEnd:
        result = json.dumps({"error": error})
        if not final and record.dispatch_attempts < DISPATCH_ATTEMPTS:
            due = self._clock.now() + timedelta(seconds=DISPATCH_BACKOFF.delay(record.dispatch_attempts))
            return DispatchEnd(record.received_id, self.owner, DispatchStatus.PENDING, due, result)
        log.warning(
            "received webhook not dispatched",
            extra={"received_id": record.received_id, "attempts": record.dispatch_attempts, "error": error},
        )
        return DispatchEnd(record.received_id, self.owner, DispatchStatus.FAILED, None, result)
