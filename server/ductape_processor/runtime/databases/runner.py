"""DatabaseRunner: runs a product's database actions, one at a time (`execute`) or several in one transaction
(`batch`), from the caller's input to rows.

The path of a call, as for actions: resolve the product version → verify the session → check the input contract →
cache lookup (reads) → idempotency claim (writes with a key) → bind parameters → run on a pooled connection within
the statement's time and the caller's deadline, retrying a connection that broke when that is safe → convert the
rows (bounded) → execution record (queued, written in batches).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ductape_processor.adapters.databases.base import Bounds, DatabaseAdapter, DatabaseFailure, DatabaseUnreachable
from ductape_processor.errors import FieldViolation, InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.records import record
from ductape_processor.runtime.actions.cache import named_cache
from ductape_processor.runtime.databases.errors import database_error
from ductape_processor.runtime.databases.plan import DatabaseActionPlan
from ductape_processor.runtime.databases.pools import DatabasePools, named_database
from ductape_processor.runtime.databases.statements import (
    Page,
    StepResult,
    check_database_input,
    parameters,
    statement,
    step_result,
)
from ductape_processor.runtime.databases.values import ResultBudget
from ductape_processor.runtime.logs.recorder import execution_record
from ductape_processor.runtime.options import CallOptions
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.idempotency import idempotency_key_problem, record_key, run_once
from ductape_processor.runtime.policies.paging import decode_page_token, effective_page_size, page
from ductape_processor.runtime.policies.retry import Backoff, RetryBudget
from ductape_processor.runtime.registry.databases import Database
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.templates import RenderError, Scope
from ductape_processor.store.base import ExecutionStatus

DEFAULT_RETRIES: Final = 2
"""Retries of a statement whose connection could not be opened or broke (when retrying it is safe)."""
RETRY_BACKOFF: Final = Backoff(0.05, 1.0)
ANSWER_MARGIN_S: Final = 0.05
"""Time kept before the caller's deadline to answer RESOURCE_EXHAUSTED when no connection came free: waiting for
one up to the deadline itself would leave the caller only gRPC's bare DEADLINE_EXCEEDED."""
MAX_BATCH_STEPS: Final = 100
"""The most actions one Batch runs."""


@record
class DatabaseCall(CallOptions):
    """What a caller asks for: one action of one database, its input, a cache tag and a page, and the options every
    call has."""

    product: str
    env: str
    database: str
    action: str
    input: Mapping[str, Any] = field(default_factory=dict)
    cache: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class BatchStep:
    """One action of a batch; `tag` names its result for later steps (`$Sequence{batch}{tag}…`)."""

    action: str
    input: Mapping[str, Any] = field(default_factory=dict)
    tag: str = ""


@dataclass(frozen=True, slots=True)
class DatabaseResult:
    """What an Execute or a Batch answered."""

    steps: list[StepResult]
    process_id: str = ""
    version: int = 0
    cached: bool = False
    next_page_token: str = ""


@dataclass(slots=True)
class _Run:
    """Per-call state."""

    resolved: Resolved
    database: Database
    resource: str
    deadline: Deadline
    process_id: str
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    attempts: int = 0
    session: Mapping[str, Any] | None = None


class DatabaseRunner:
    """Runs database actions. One instance per processor; safe for concurrent calls."""

    def __init__(self, services: CallServices, pools: DatabasePools, *, max_rows: int, max_result_bytes: int) -> None:
        self._services = services
        self._pools = pools
        self._max_rows = max_rows
        self._max_bytes = max_result_bytes

    # -- resolution -------------------------------------------------------------------------------------------

    @staticmethod
    def _plan(resolved: Resolved, database: str, action: str, field_name: str = "action") -> DatabaseActionPlan:
        plan = resolved.databases.get((database, action))
        if plan is None:
            raise NotFound.in_resource(
                resolved.product, "database", database, "action", action, Reason.ACTION_NOT_FOUND, key=field_name
            )
        return plan

    async def _start(
        self, product: str, env: str, version: int | None, database: str, resource: str, deadline: Deadline
    ) -> _Run:
        started = datetime.now(UTC)
        resolved = await self._services.registry.resolve(product, env, version)
        return _Run(
            resolved, named_database(resolved, database), resource, deadline, self._services.recorder.new_id(), started
        )

    # -- Execute ----------------------------------------------------------------------------------------------

    async def execute(self, call: DatabaseCall, deadline: Deadline) -> DatabaseResult:
        """Run one action; raise a ProcessorError for anything but its rows."""
        run = await self._start(
            call.product, call.env, call.version, call.database, f"{call.database}:{call.action}", deadline
        )
        plan = self._plan(run.resolved, call.database, call.action)
        return await self._recorded(run, lambda: self._execute(run, plan, call))

    async def _execute(self, run: _Run, plan: DatabaseActionPlan, call: DatabaseCall) -> DatabaseResult:
        self._check_call(call.retries, call.idempotency_key)
        if call.session is not None:
            run.session = (await self._services.sessions.verify(call.product, call.env, *call.session)).data
        checked = check_database_input(plan, call.input, "input")
        paging = self._page(plan, call, checked)
        cache = None
        cache_key = ""
        if call.cache:
            if not plan.reads_only:
                raise InvalidArgument.field("cache", f"a {plan.action.type} action is not cached: only reads are")
            cache = named_cache(run.resolved.manifest, call.cache)
            cache_key = self._digest(
                "database", call.product, run.resolved.env.slug, run.resolved.version, plan.resource, checked,
                paging[0], run.session if plan.uses_session else None,
            )  # fmt: skip
            hit = await self._services.cache.get(cache, cache_key)
            if hit is not None:
                return self._decode(hit, cached=True)

        async def work() -> DatabaseResult:
            adapter = self._adapter(run)
            result, token = await self._read_or_write(run, adapter, plan, checked, paging, call.retries)
            return DatabaseResult([result], next_page_token=token)

        if call.idempotency_key and not plan.reads_only:
            result = await self._once(run, call.idempotency_key, [plan.resource, checked], work)
        else:
            result = await work()
        if cache is not None:
            await self._services.cache.put(cache, cache_key, self._encode(result))
        return result

    def _page(
        self, plan: DatabaseActionPlan, call: DatabaseCall, checked: Mapping[str, Any]
    ) -> tuple[Page, tuple[str, ...]]:
        if not (call.page_size or call.page_token):
            return Page(), ()
        if plan.action.type not in ("read", "aggregate") or plan.action.single:
            kind = f"a single {plan.action.type}: one row or none" if plan.action.single else plan.action.type
            raise InvalidArgument.field("page_size", f"only read and aggregate actions page (this is {kind})")
        size = effective_page_size(call.page_size)
        listing = ("database", call.product, call.env, plan.resource, self._digest(checked))
        offset = decode_page_token(listing, call.page_token, _offset) if call.page_token else 0
        return Page(size, offset), listing

    def _adapter(self, run: _Run) -> DatabaseAdapter:
        try:
            return self._pools.adapter(run.resolved, run.database)
        except DatabaseFailure as exc:
            raise database_error(exc, run.database.tag, run.resource) from None

    async def _read_or_write(
        self,
        run: _Run,
        adapter: DatabaseAdapter,
        plan: DatabaseActionPlan,
        checked: Mapping[str, Any],
        paging: tuple[Page, tuple[str, ...]],
        retries: int | None,
    ) -> tuple[StepResult, str]:
        wanted, listing = paging
        args = self._bind(run, plan, adapter, checked, {})
        bound = max(self._max_rows, (wanted.limit or 0) + 1)
        spend = ResultBudget(bound, self._max_bytes)
        built = statement(plan, adapter.dialect, args, wanted, self._max_rows, Bounds(bound, self._max_bytes))
        env = run.database.envs[run.resolved.env.slug]
        timeout_s = env.statement_timeout.total_seconds()
        allowed = DEFAULT_RETRIES if retries is None else retries
        budget = RetryBudget(RETRY_BACKOFF, run.deadline)
        while True:
            run.attempts += 1
            try:
                outcome = await adapter.run(built, run.deadline.bound(timeout_s), _acquire_budget(run.deadline))
                break
            except DatabaseUnreachable as exc:
                safe = not exc.sent or plan.reads_only
                if not (safe and budget.retries < allowed and await budget.pause()):
                    raise database_error(exc, run.database.tag, plan.action.tag) from None
            except DatabaseFailure as exc:
                raise database_error(exc, run.database.tag, plan.action.tag) from None
        result = step_result(plan, outcome, spend)
        limit = wanted.limit
        if limit is None:
            return result, ""
        rows, token = page(result.rows, limit, listing, lambda _: (wanted.offset + limit,))
        return StepResult(rows, result.affected_rows, result.count, result.last_insert_id), token

    def _bind(
        self,
        run: _Run,
        plan: DatabaseActionPlan,
        adapter: DatabaseAdapter,
        checked: Mapping[str, Any],
        sequence: Mapping[str, Any],
    ) -> list[Any]:
        scope = Scope(input=checked, secrets=self._services.secrets.get, session=run.session, sequence=sequence)
        try:
            return parameters(plan, adapter.dialect, checked, scope)
        except RenderError as exc:
            raise InvalidArgument(
                f"{exc.selector}: {exc.message}",
                reason=Reason.TEMPLATE_UNRESOLVED,
                metadata={"selector": exc.selector, "template": exc.path},
                violations=[FieldViolation(exc.selector, exc.message)],
            ) from None

    # -- Batch ------------------------------------------------------------------------------------------------

    async def batch(
        self,
        call: DatabaseCall,
        steps: Sequence[BatchStep],
        deadline: Deadline,
    ) -> DatabaseResult:
        """Run `steps` (actions of `call.database`) in one transaction: all of them, or none."""
        if not steps or len(steps) > MAX_BATCH_STEPS:
            raise InvalidArgument.field("steps", f"must hold 1 to {MAX_BATCH_STEPS} steps")
        run = await self._start(call.product, call.env, call.version, call.database, f"{call.database}:batch", deadline)
        return await self._recorded(run, lambda: self._batch(run, call, steps))

    async def _batch(self, run: _Run, call: DatabaseCall, steps: Sequence[BatchStep]) -> DatabaseResult:
        self._check_call(None, call.idempotency_key)
        plans: list[DatabaseActionPlan] = []
        inputs: list[dict[str, Any]] = []
        tags: list[str] = []
        for index, step in enumerate(steps):
            plans.append(self._plan(run.resolved, call.database, step.action, f"steps[{index}].action"))
            inputs.append(check_database_input(plans[-1], step.input, f"steps[{index}].input"))
            tag = step.tag or step.action
            if tag in tags:
                raise InvalidArgument.field(f"steps[{index}].tag", f"{tag!r} names an earlier step; give each a tag")
            tags.append(tag)
        if call.session is not None:
            run.session = (await self._services.sessions.verify(call.product, call.env, *call.session)).data

        async def work() -> DatabaseResult:
            adapter = self._adapter(run)
            env = run.database.envs[run.resolved.env.slug]
            timeout_s = env.statement_timeout.total_seconds()
            results: list[StepResult] = []
            earlier: dict[str, Any] = {}
            current = plans[0]
            run.attempts = 1
            spend = ResultBudget(self._max_rows, self._max_bytes)  # the batch's answer as a whole
            try:
                async with adapter.session(_acquire_budget(run.deadline)) as session, session.transaction():
                    for plan, checked, tag in zip(plans, inputs, tags, strict=True):
                        current = plan
                        args = self._bind(run, plan, adapter, checked, {"batch": earlier})
                        bounds = Bounds(spend.rows, spend.bytes)
                        built = statement(plan, adapter.dialect, args, Page(), self._max_rows, bounds)
                        outcome = await session.run(built, run.deadline.bound(timeout_s))
                        result = step_result(plan, outcome, spend)
                        results.append(result)
                        earlier[tag] = result.as_json()
            except DatabaseFailure as exc:
                raise database_error(exc, run.database.tag, current.action.tag) from None
            return DatabaseResult(results)

        if call.idempotency_key:
            request = [[p.resource for p in plans], inputs, tags]
            return await self._once(run, call.idempotency_key, request, work)
        return await work()

    # -- shared steps -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_call(retries: int | None, idempotency_key: str) -> None:
        if retries is not None and not 0 <= retries <= 20:
            raise InvalidArgument.field("retries", "must be between 0 and 20")
        problem = idempotency_key_problem(idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)

    async def _once(
        self, run: _Run, idempotency_key: str, request: object, work: Callable[[], Awaitable[DatabaseResult]]
    ) -> DatabaseResult:
        """Run `work` once per idempotency key: a repeat with the same request gets the first result."""
        resolved = run.resolved
        env = run.database.envs[resolved.env.slug]
        return await run_once(
            self._services.store,
            record_key(("database", resolved.product, resolved.env.slug, run.database.tag), idempotency_key),
            self._digest(request),
            idempotency_key=idempotency_key,
            lease=env.statement_timeout + timedelta(seconds=10),
            retention=self._services.idempotency_retention,
            deadline=run.deadline,
            work=work,
            encode=self._encode,
            decode=lambda data: self._decode(data, cached=False),
        )

    async def _recorded(self, run: _Run, work: Callable[[], Awaitable[DatabaseResult]]) -> DatabaseResult:
        """Run `work` and queue its execution record; the result carries the record's id and the version."""
        try:
            result = await work()
        except ProcessorError as exc:
            self._record(run, ExecutionStatus.FAIL, exc.reason, cached=False)
            raise
        self._record(run, ExecutionStatus.SUCCESS, "", cached=result.cached)
        return DatabaseResult(result.steps, run.process_id, run.resolved.version, result.cached, result.next_page_token)

    def _record(self, run: _Run, status: ExecutionStatus, reason: str, *, cached: bool) -> None:
        env = run.database.envs.get(run.resolved.env.slug)
        self._services.recorder.record(
            execution_record(
                run.resolved,
                "database",
                run.resource,
                run.process_id,
                run.started,
                status,
                attempts=run.attempts,
                error_reason=reason,
                cached=cached,
                detail=env.type if env is not None else "",
            )
        )

    @staticmethod
    def _digest(*parts: object) -> str:
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def _encode(result: DatabaseResult) -> bytes:
        data = {"steps": [s.as_json() for s in result.steps], "next": result.next_page_token}
        return json.dumps(data, separators=(",", ":")).encode()

    @staticmethod
    def _decode(data: bytes, *, cached: bool) -> DatabaseResult:
        raw = json.loads(data)
        steps = [StepResult.from_json(s) for s in raw["steps"]]
        return DatabaseResult(steps, cached=cached, next_page_token=raw["next"])


def _acquire_budget(deadline: Deadline) -> float | None:
    """How long a call may wait for a pooled connection: until just before its deadline (None: no deadline)."""
    left = deadline.remaining()
    return None if left is None else max(left - ANSWER_MARGIN_S, 0.0)


MAX_OFFSET: Final = 2**62
"""The largest offset a page token may carry: a token is not signed, and the offset plus a page must fit the
databases' 64-bit LIMIT and OFFSET."""


def _offset(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_OFFSET:
        raise TypeError
    return value
