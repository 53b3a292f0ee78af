"""ActionExecutor: runs one action of an app, from the caller's input to the upstream's answer.

The path of a call: resolve the product version → check the input contract → cache lookup → idempotency claim →
render templates (auth tokens minted when needed) → circuit breaker, timeout and retries around the HTTP adapter →
cache/idempotency store → execution record (queued, written in batches).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from yarl import URL

from ductape_processor.adapters.http import (
    HttpClientPool,
    HttpRequest,
    HttpResponse,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ductape_processor.adapters.http.encoding import (
    canonical_json,
    encode_body,
    header_field,
    header_name_problem,
    header_value_problem,
    path_parameter,
    query_pairs,
)
from ductape_processor.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ProcessorError,
    Unavailable,
)
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.cache import ResultCache
from ductape_processor.runtime.actions.contract import check_action_input
from ductape_processor.runtime.actions.plan import ActionPlan, AuthPlan
from ductape_processor.runtime.logs.recorder import ExecutionRecorder
from ductape_processor.runtime.policies.breaker import CircuitBreaker
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.idempotency import claim, idempotency_key_problem, key_reused, record_key
from ductape_processor.runtime.policies.retry import RetryBudget, parse_retry_after
from ductape_processor.runtime.policies.secrets import SecretSource, TokenVault
from ductape_processor.runtime.registry.manifest import CredentialAuth, Manifest
from ductape_processor.runtime.registry.registry import Registry, Resolved
from ductape_processor.runtime.sessions import SessionManager
from ductape_processor.runtime.templates import RenderError, Scope, Taint
from ductape_processor.store.base import ExecutionRecord, ExecutionStatus, IdempotencyRecord, Store
from ductape_processor.telemetry.context import outgoing_trace_context

log = logging.getLogger(__name__)

_REDACTED = "[redacted]"
# Circuit breakers and credential tokens kept, one per (product, environment, app[, auth]); the least recently
# used goes first (a forgotten token is read again from the store).
UPSTREAMS_REMEMBERED = 10_000
# How long an idempotency claim outlives its owner's last renewal: the longest a repeat waits after a replica died.
IDEMPOTENCY_LEASE_S = 5.0
# How long an answer whose recording failed is retried (the owner keeps its lease meanwhile).
_COMPLETE_FOR_S = 60.0
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class ActionCall:
    """What a caller asks for."""

    product: str
    env: str
    app: str
    event: str
    input: Mapping[str, Any]
    session: tuple[str, str] | None = None
    cache: str = ""
    retries: int | None = None
    version: int | None = None
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What the upstream answered, and how the processor got it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    content_type: str
    process_id: str = ""
    attempts: int = 0
    cached: bool = False
    version: int = 0

    def encode(self) -> bytes:
        """A JSON form for the cache and idempotency records."""
        return json.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "c": self.content_type,
                "b": base64.b64encode(self.body).decode(),
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ActionResult:
        """The inverse of `encode`."""
        raw = json.loads(data)
        return cls(raw["s"], [(h[0], h[1]) for h in raw["h"]], base64.b64decode(raw["b"]), raw["c"])


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    upstream_status: int = 0
    detail: str = ""


@dataclass(slots=True)
class _Token:
    values: dict[str, Any]
    text: str
    expires: float


@dataclass(slots=True)
class _Context:
    """Per-call state threaded through the steps."""

    call: ActionCall
    resolved: Resolved
    plan: ActionPlan
    deadline: Deadline
    attempts: _Attempts = field(default_factory=_Attempts)
    session: Mapping[str, Any] | None = None
    taint: Taint = field(default_factory=Taint)
    """The call's rendered values that derive from secrets, auths or the session: the record redacts them."""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)  # set by the processor, over the request's
    process_id: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    recorded: bool = False  # the execution record was written with the idempotency answer


def _outcome(result: ActionResult) -> tuple[ExecutionStatus, str]:
    """The execution record's status and reason for an upstream answer."""
    return (
        (ExecutionStatus.SUCCESS, "") if 200 <= result.status < 300 else (ExecutionStatus.FAIL, Reason.UPSTREAM_STATUS)
    )


def _caller_headers(plan: ActionPlan, given: Mapping[str, Any]) -> dict[str, str]:
    """The caller's headers to send: only those the action's input contract declares, each a valid field.

    An undeclared header is refused unless a template reads it (`$Input{headers}{X-Trace}`): then it is data for
    the template, not sent as it is. Every problem is one violation naming `input.headers["<name>"]`.
    """
    declared = plan.action.input.headers
    read = plan.input_headers_read
    headers: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for name, value in given.items():
        field = header_field("input.headers", name)
        problem = header_name_problem(name)
        if problem is None and name not in declared:
            if read is None or name.lower() in read:
                continue
            problem = "is not declared in the action's input.headers; an action sends only the headers it declares"
        if problem is None and value is not None:
            text = value if isinstance(value, str) else canonical_json(value)
            problem = header_value_problem(text)
            headers[name] = text
        if problem is not None:
            violations.append(FieldViolation(field, problem))
    if violations:
        first = violations[0]
        raise InvalidArgument(
            f"invalid input: {first.field}: {first.description}", reason=Reason.INVALID_INPUT, violations=violations
        )
    return headers


def _require_path_params(plan: ActionPlan, checked: Mapping[str, Any]) -> None:
    """Every `:name` of the path needs a value, even when the contract left the parameter optional."""
    params = checked.get("params") or {}
    missing = [part[1:] for part in plan.path_parts if part.startswith(":") and params.get(part[1:]) is None]
    if missing:
        raise InvalidArgument(
            f"the action's path needs {', '.join(':' + name for name in missing)}",
            reason=Reason.INVALID_INPUT,
            violations=[
                FieldViolation(f"input.params.{name}", "is required: the path has :" + name) for name in missing
            ],
        )


class ActionExecutor:
    """Runs actions. One instance per processor; safe for concurrent calls."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        http: HttpClientPool,
        secrets: SecretSource,
        recorder: ExecutionRecorder,
        cache: ResultCache,
        sessions: SessionManager,
        vault: TokenVault,
        *,
        idempotency_retention: timedelta = timedelta(hours=24),
    ) -> None:
        self._registry = registry
        self._store = store
        self._http = http
        self._secrets = secrets
        self._recorder = recorder
        self._cache = cache
        self._sessions = sessions
        self._vault = vault
        self._retention = idempotency_retention
        self._breakers: BoundedCache[str, CircuitBreaker] = BoundedCache(UPSTREAMS_REMEMBERED)
        self._tokens: BoundedCache[str, _Token] = BoundedCache(UPSTREAMS_REMEMBERED)
        self._minting: dict[str, asyncio.Future[_Token]] = {}
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._completing: set[asyncio.Task[None]] = set()
        self._owner = os.urandom(8).hex()

    # -- the call ---------------------------------------------------------------------------------------------

    async def run(self, call: ActionCall, deadline: Deadline) -> ActionResult:
        """Run `call`; raise a ProcessorError for anything but an upstream answer."""
        started = datetime.now(UTC)
        process_id = self._recorder.new_id()
        resolved = await self._registry.resolve(call.product, call.env, call.version)
        plan = resolved.plan.actions.get((call.app, call.event))
        if plan is None:
            self._not_found(resolved.manifest, call)
        assert plan is not None
        ctx = _Context(call, resolved, plan, deadline, process_id=process_id, started=started)
        try:
            result = await self._run(ctx)
        except ProcessorError as exc:
            self._record(ctx, process_id, started, ExecutionStatus.FAIL, exc.reason, cached=False)
            raise
        except RenderError as exc:
            error = InvalidArgument(
                f"{exc.selector}: {exc.message}",
                reason=Reason.TEMPLATE_UNRESOLVED,
                metadata={"selector": exc.selector, "template": exc.path},
                violations=[FieldViolation(exc.selector, exc.message)],
            )
            self._record(ctx, process_id, started, ExecutionStatus.FAIL, error.reason, cached=False)
            raise error from None
        if not ctx.recorded:
            status, reason = _outcome(result)
            self._record(ctx, process_id, started, status, reason, cached=result.cached)
        return ActionResult(
            result.status,
            result.headers,
            result.body,
            result.content_type,
            process_id,
            result.attempts,
            result.cached,
            resolved.version,
        )

    def _not_found(self, manifest: Manifest, call: ActionCall) -> None:
        apps = {app.tag: app for app in manifest.apps}
        app = apps.get(call.app)
        if app is None:
            raise NotFound(
                f"product {call.product!r} has no app {call.app!r}",
                reason=Reason.APP_NOT_FOUND,
                metadata={"product": call.product, "app": call.app},
            )
        raise NotFound(
            f"app {call.app!r} has no action {call.event!r}",
            reason=Reason.ACTION_NOT_FOUND,
            metadata={"product": call.product, "app": call.app, "event": call.event},
        )

    async def _run(self, ctx: _Context) -> ActionResult:
        call, plan = ctx.call, ctx.plan
        if call.session is not None:
            tag, token = call.session
            ctx.session = (await self._sessions.verify(call.product, call.env, tag, token)).data
        checked = check_action_input(plan.action.input, call.input)
        _require_path_params(plan, checked)
        cache = None
        cache_key = ""
        if call.cache:
            cache = next((c for c in ctx.resolved.manifest.caches if c.tag == call.cache), None)
            if cache is None:
                raise NotFound(
                    f"product {call.product!r} has no cache {call.cache!r}",
                    reason=Reason.CACHE_NOT_FOUND,
                    metadata={"product": call.product, "cache": call.cache},
                )
            cache_key = hashlib.sha256(
                canonical_json(
                    [
                        call.product,
                        ctx.resolved.env.slug,
                        ctx.resolved.version,
                        call.app,
                        call.event,
                        checked,
                        ctx.session if ctx.plan.uses_session else None,  # one user's answer is not another's
                    ]
                ).encode()
            ).hexdigest()
            hit = await self._cache.get(cache, cache_key)
            if hit is not None:
                cached = ActionResult.decode(hit)
                return ActionResult(cached.status, cached.headers, cached.body, cached.content_type, cached=True)
        if call.idempotency_key:
            result = await self._idempotent(ctx, checked)
        else:
            result = await self._send(ctx, checked)
        if cache is not None and 200 <= result.status < 300:
            await self._cache.put(cache, cache_key, result.encode())
        return result

    # -- idempotency ------------------------------------------------------------------------------------------

    async def _idempotent(self, ctx: _Context, checked: dict[str, Any]) -> ActionResult:
        call = ctx.call
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        header = ctx.plan.app.idempotency_header
        if header:
            if not _PRINTABLE_ASCII.fullmatch(call.idempotency_key):
                raise InvalidArgument.field(
                    "idempotency_key", f"must be printable ASCII: it is sent to the upstream in the {header} header"
                )
            # The IETF draft's Idempotency-Key is a structured-field string: quoted, with \ and " escaped.
            quoted = call.idempotency_key.replace("\\", "\\\\").replace('"', '\\"')
            ctx.upstream_headers = {header: f'"{quoted}"'}
        key = record_key((call.product, ctx.resolved.env.slug), call.idempotency_key)
        session = ctx.session if ctx.plan.uses_session else None
        request_hash = hashlib.sha256(canonical_json([call.app, call.event, checked, session]).encode()).hexdigest()
        owner = f"{self._owner}:{self._recorder.new_id()}"
        lease = timedelta(seconds=IDEMPOTENCY_LEASE_S)

        async def wait(record: IdempotencyRecord) -> None:
            if record.state == "sent" and record.lease_until <= datetime.now(UTC):
                raise Unavailable(
                    "the call holding this idempotency key ended without recording the upstream's answer (its "
                    "replica stopped or the store failed); the request may have reached the upstream, so it is not "
                    "sent again. Retry later to get the answer if it is recorded, or check with the upstream",
                    reason=Reason.IDEMPOTENCY_OUTCOME_UNKNOWN,
                    metadata={"idempotency_key": call.idempotency_key},
                )
            await self._wait_for(key, ctx.deadline)

        while True:
            record = await claim(
                self._store,
                key,
                request_hash,
                owner,
                lease=lease,
                retention=self._retention,
                reused=lambda: key_reused("request", call.idempotency_key),
                wait=wait,
            )
            if record.owner != owner:
                assert record.response is not None
                return ActionResult.decode(record.response)
            try:
                if await self._store.idempotency_mark_sent(key, owner, datetime.now(UTC) + lease):
                    break
            except ProcessorError:
                await self._release(key, owner)
                raise
            # the claim was taken over between the two statements: look again
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        renewing = asyncio.get_running_loop().create_task(self._renew(key, owner), name="idempotency-lease")
        try:
            result = await self._send(ctx, checked, retry_unsafe=True)
        except BaseException:
            renewing.cancel()
            await self._release(key, owner)
            raise
        finally:
            self._inflight.pop(key, None)
            done.set_result(None)
        status, reason = _outcome(result)
        execution = self._execution(ctx, ctx.process_id, ctx.started, status, reason, cached=False)
        await self._complete(key, owner, result, execution, renewing)
        ctx.recorded = True
        return result

    async def _renew(self, key: str, owner: str) -> None:
        """Keep the claim's lease ahead while the call runs, so a dead replica's claim ends within one lease."""
        pause = IDEMPOTENCY_LEASE_S / 3
        while True:
            await asyncio.sleep(pause)
            try:
                held = await self._store.idempotency_renew(
                    key, owner, datetime.now(UTC) + timedelta(seconds=IDEMPOTENCY_LEASE_S)
                )
            except ProcessorError as exc:
                log.warning("idempotency: renewing the lease of a key failed (%s); trying again", exc.message)
                pause = 0.2  # the lease is running out: try again soon
                continue
            if not held:
                return
            pause = IDEMPOTENCY_LEASE_S / 3

    async def _release(self, key: str, owner: str) -> None:
        """Give the claim up; if the store fails, its lease ends it (a sent claim then answers OUTCOME_UNKNOWN)."""
        try:
            await self._store.idempotency_release(key, owner)
        except ProcessorError as exc:
            log.warning("idempotency: releasing a key failed (%s); its lease will end it", exc.message)

    async def _complete(
        self, key: str, owner: str, result: ActionResult, record: ExecutionRecord, renewing: asyncio.Task[None]
    ) -> None:
        """Record the answer under the key, with the execution record in the same transaction, before the caller
        gets it (so a kill -9 cannot lose the record of an answered idempotent call). The caller gets the answer also
        when the store fails now: the record is queued, and the answer is recorded in the background for up to
        `_COMPLETE_FOR_S` while the lease is kept, so repeats wait for it and then get it; only if it never lands do
        repeats answer IDEMPOTENCY_OUTCOME_UNKNOWN."""
        try:
            await self._store.idempotency_complete(key, owner, result.encode(), record)
        except ProcessorError as exc:
            log.warning("idempotency: recording an answer failed (%s); retrying in the background", exc.message)
            self._recorder.record(record)
            task = asyncio.get_running_loop().create_task(
                self._complete_later(key, owner, result.encode(), record, renewing), name="idempotency-complete"
            )
            self._completing.add(task)
            task.add_done_callback(self._completing.discard)
        else:
            renewing.cancel()

    async def _complete_later(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord, renewing: asyncio.Task[None]
    ) -> None:
        try:
            give_up = time.monotonic() + _COMPLETE_FOR_S
            delay = 0.05
            while time.monotonic() < give_up:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    await self._store.idempotency_complete(key, owner, response, record)
                except ProcessorError:
                    continue
                log.info("idempotency: a delayed answer was recorded")
                return
            log.error(
                "idempotency: an answer could not be recorded; repeats of its key answer IDEMPOTENCY_OUTCOME_UNKNOWN"
            )
        finally:
            renewing.cancel()

    async def _wait_for(self, key: str, deadline: Deadline) -> None:
        """Wait while another call holds the key: on this replica by its future, elsewhere by polling."""
        inflight = self._inflight.get(key)
        left = deadline.remaining()
        in_use = FailedPrecondition(
            "a call with this idempotency key is still running", reason=Reason.IDEMPOTENCY_KEY_IN_USE
        )
        if left is not None and left <= 0:
            raise in_use
        if inflight is not None:
            try:
                await asyncio.wait_for(asyncio.shield(inflight), left)
            except TimeoutError:
                raise in_use from None
        else:
            await asyncio.sleep(min(0.05, left) if left is not None else 0.05)

    # -- rendering and sending ----------------------------------------------------------------------------------

    def _scope(self, ctx: _Context, checked: Mapping[str, Any], auth: Mapping[str, Mapping[str, Any]]) -> Scope:
        app = ctx.plan.app
        return Scope(
            input=checked,
            variables={app.tag: app.variables.get(ctx.resolved.env.slug, {})},
            constants={app.tag: app.constants},
            auth=auth,
            secrets=self._secrets.get,
            session=ctx.session,
            taint=ctx.taint,
        )

    def _request(self, ctx: _Context, scope: Scope, checked: Mapping[str, Any]) -> HttpRequest:
        plan = ctx.plan
        app_env = plan.app.envs[ctx.resolved.env.slug]
        params = checked.get("params", {})
        path = "".join(
            path_parameter(part[1:], params[part[1:]]) if part.startswith(":") else part for part in plan.path_parts
        )
        # The base URL is the manifest's own; the path is fully encoded, and a parameter is one segment with every
        # reserved character escaped, so input can change neither scheme, host, port nor the path above it.
        url = URL(app_env.base_url + path, encoded=True)
        headers = _caller_headers(plan, checked.get("headers") or {})
        for name, template in plan.headers.items():
            rendered = template.render(scope)
            if rendered is None:
                continue
            text = rendered if isinstance(rendered, str) else canonical_json(rendered)
            problem = header_value_problem(text)
            if problem is not None:
                field = header_field("headers", name)
                raise InvalidArgument(
                    f"{field}: the value rendered from {template.path} {problem}",
                    reason=Reason.HEADER_VALUE_INVALID,
                    metadata={"template": template.path},
                    violations=[FieldViolation(field, f"the value rendered from {template.path} {problem}")],
                )
            for given in [given for given in headers if given.lower() == name.lower()]:
                del headers[given]  # the action's own header wins over the caller's, whatever the letter case
            headers[name] = text
        query = plan.query.render(scope) if plan.query is not None else checked.get("query") or None
        body = plan.body.render(scope) if plan.body is not None else (checked.get("body") or None)
        data, content_type = encode_body(body, app_env.request_type, plan.action.method)
        if content_type and not any(h.lower() == "content-type" for h in headers):
            headers["Content-Type"] = content_type
        self._trace_headers(headers)
        return HttpRequest(plan.action.method, url, headers, query_pairs(query, "query"), data)

    @staticmethod
    def _trace_headers(headers: dict[str, str]) -> None:
        headers.update(outgoing_trace_context())

    @staticmethod
    def _detail(ctx: _Context, request: HttpRequest) -> str:
        """The request as the execution record shows it: every part built from a sensitive value is `[redacted]`.

        Redaction follows the call's taint (what was rendered from secrets, auths, a login response or the session),
        so a secret is hidden wherever it went: a path segment, a query name or value, a header; a part that merely
        contains one (`Bearer …`, `/x/…/y` as one parameter) is hidden whole. Header values are never shown.
        """
        taint = ctx.taint

        def shown(raw: str) -> str:
            return _REDACTED if taint.touches(raw) or taint.touches(unquote(raw)) else raw

        url = request.url
        path = "/".join(shown(segment) for segment in url.raw_path.split("/"))
        pairs = [*url.query.items(), *request.query]
        query = "&".join(f"{shown(quote(k, safe=''))}={shown(quote(v, safe=''))}" for k, v in pairs)
        sensitive = ctx.plan.sensitive_headers
        names = ", ".join(
            f"{name}: {_REDACTED}" if name in sensitive or taint.touches(value) else name
            for name, value in sorted(request.headers.items())
        )
        target = f"{url.scheme}://{url.raw_authority}{path}" + (f"?{query}" if query else "")
        return f"{request.method} {target}; headers: {names}"

    async def _send(self, ctx: _Context, checked: dict[str, Any], *, retry_unsafe: bool = False) -> ActionResult:
        plan, call = ctx.plan, ctx.call
        rules = plan.rules
        if call.retries is not None:
            if call.retries < 0 or call.retries > 20:
                raise InvalidArgument.field("retries", "must be between 0 and 20")
            rules = replace(rules, max_retries=call.retries)
        may_retry_sent = plan.idempotent or retry_unsafe
        breaker_key = f"{call.product}/{ctx.resolved.env.slug}/{call.app}"
        breaker = self._breakers.get(breaker_key)
        if breaker is None:
            policy = plan.app.circuit_breaker
            breaker = CircuitBreaker(policy.failures, policy.cooldown.total_seconds())
            self._breakers.put(breaker_key, breaker)
        reminted = False
        budget = RetryBudget(rules.backoff, ctx.deadline)
        while True:
            auth = await self._auth_values(ctx, plan.auth_tags)
            request = self._request(ctx, self._scope(ctx, checked, auth), checked)
            if ctx.upstream_headers:
                ours = {name.lower() for name in ctx.upstream_headers}
                kept = {name: value for name, value in request.headers.items() if name.lower() not in ours}
                request = replace(request, headers={**kept, **ctx.upstream_headers})
            ctx.attempts.detail = self._detail(ctx, request)
            breaker.before_call(f"{call.app} ({ctx.resolved.env.slug})")
            ctx.attempts.count += 1
            try:
                response = await self._http.send(
                    f"{call.product}/{ctx.resolved.env.slug}/{call.app}", request, ctx.deadline.bound(plan.timeout_s)
                )
            except (UpstreamUnreachable, UpstreamTimeout) as exc:
                breaker.failure()
                sent = exc.sent if isinstance(exc, UpstreamUnreachable) else True
                if not (rules.network and budget.retries < rules.max_retries and (not sent or may_retry_sent)):
                    raise
                await self._pause(ctx, budget)
                continue
            except ResponseTooLarge:
                breaker.success()
                raise
            except BaseException:
                breaker.release()
                raise
            ctx.attempts.upstream_status = response.status
            if response.status == 401 and not reminted and await self._forget_tokens(ctx, plan.auth_tags):
                reminted = True
                continue
            if response.status in rules.statuses and budget.retries < rules.max_retries and may_retry_sent:
                if response.status >= 500 or response.status == 429:
                    breaker.failure()
                await self._pause(ctx, budget, parse_retry_after(response.header("Retry-After")))
                continue
            if response.status >= 500:
                breaker.failure()
            else:
                breaker.success()
            return self._result(response, ctx.attempts.count)

    @staticmethod
    async def _pause(ctx: _Context, budget: RetryBudget, retry_after_s: float | None = None) -> None:
        if not await budget.pause(retry_after_s):
            raise UpstreamTimeout(
                f"the next retry (in {budget.pause_s:.2f}s) would pass the caller's deadline",
                metadata={"attempts": str(ctx.attempts.count)},
            )

    @staticmethod
    def _result(response: HttpResponse, attempts: int) -> ActionResult:
        return ActionResult(response.status, response.headers, response.body, response.content_type, attempts=attempts)

    # -- auth -------------------------------------------------------------------------------------------------

    def _token_key(self, ctx: _Context, tag: str) -> str:
        return f"{ctx.call.product}/{ctx.resolved.env.slug}/{ctx.call.app}/{tag}"

    async def _auth_values(self, ctx: _Context, tags: frozenset[str]) -> dict[str, Mapping[str, Any]]:
        if not tags:
            return {}
        plans = ctx.resolved.plan.auths
        values: dict[str, Mapping[str, Any]] = {}
        for tag in tags:
            auth_plan = plans[(ctx.call.app, tag)]
            if isinstance(auth_plan.auth, CredentialAuth):
                values[tag] = (await self._credential(ctx, auth_plan)).values
            else:
                values[tag] = self._render_auth(auth_plan, self._scope(ctx, {}, {}))
        return values

    @staticmethod
    def _render_auth(plan: AuthPlan, scope: Scope) -> dict[str, Any]:
        return {
            "headers": {name: t.render(scope) for name, t in plan.headers.items()},
            "query": {name: t.render(scope) for name, t in plan.query.items()},
            "body": plan.body.render(scope),
        }

    async def _forget_tokens(self, ctx: _Context, tags: frozenset[str]) -> bool:
        """Drop the credential tokens this action used (the upstream said 401); True when there were any."""
        forgot = False
        plans = ctx.resolved.plan.auths
        for tag in tags:
            if isinstance(plans[(ctx.call.app, tag)].auth, CredentialAuth):
                key = self._token_key(ctx, tag)
                token = self._tokens.pop(key)
                if token is not None:
                    await self._store.delete_auth_token(key, token.text)
                forgot = True
        return forgot

    async def _credential(self, ctx: _Context, plan: AuthPlan) -> _Token:
        key = self._token_key(ctx, plan.auth.tag)
        token = self._tokens.get(key)
        if token is not None and token.expires > time.time():
            return token
        minting = self._minting.get(key)
        if minting is not None:
            return await asyncio.shield(minting)
        future: asyncio.Future[_Token] = asyncio.get_running_loop().create_future()
        self._minting[key] = future
        try:
            token = await self._load_or_mint(ctx, plan, key)
            self._tokens.put(key, token)
            future.set_result(token)
            return token
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            self._minting.pop(key, None)

    async def _load_or_mint(self, ctx: _Context, plan: AuthPlan, key: str) -> _Token:
        auth = plan.auth
        assert isinstance(auth, CredentialAuth)
        now = datetime.now(UTC)
        stored = await self._store.get_auth_token(key, now)
        opened = self._vault.open(key, stored) if stored is not None else None
        if stored is not None and opened is not None:
            payload = json.loads(opened)
            return _Token(payload["values"], stored, payload["expires"])
        # Nothing stored, or a row this processor cannot open (sealed under other root keys): mint a new token.
        login_plan = ctx.resolved.plan.actions[(ctx.call.app, auth.action)]
        login_ctx = _Context(ctx.call, ctx.resolved, login_plan, ctx.deadline)
        assert plan.login_input is not None
        login_input = plan.login_input.render(self._scope(login_ctx, {}, {}))
        try:
            checked = check_action_input(login_plan.action.input, login_input if isinstance(login_input, dict) else {})
        except InvalidArgument as exc:
            if not login_ctx.taint.texts:
                raise
            # The login input is rendered from secrets: a contract's reasons (`has 19 characters`) would describe them.
            raise InvalidArgument(
                f"auth {auth.tag!r}: the login input breaks the input contract of action {auth.action!r} "
                "(the reasons are withheld: the input derives from secrets)",
                reason=exc.reason,
                metadata={"app": ctx.call.app, "auth": auth.tag},
                violations=[
                    FieldViolation(v.field, "breaks the contract (the reason is withheld: it could reveal a secret)")
                    for v in exc.violations
                ],
            ) from None
        started = datetime.now(UTC)
        process_id = self._recorder.new_id()
        try:
            response = await self._send(login_ctx, checked)
        except ProcessorError as exc:
            self._record(login_ctx, process_id, started, ExecutionStatus.FAIL, exc.reason, cached=False)
            raise
        if not 200 <= response.status < 300:
            self._record(
                login_ctx, process_id, started, ExecutionStatus.FAIL, Reason.UPSTREAM_AUTH_FAILED, cached=False
            )
            raise FailedPrecondition(
                f"auth {auth.tag!r}: the login action {auth.action!r} answered {response.status}",
                reason=Reason.UPSTREAM_AUTH_FAILED,
                metadata={"app": ctx.call.app, "auth": auth.tag, "upstream_status": str(response.status)},
            )
        self._record(login_ctx, process_id, started, ExecutionStatus.SUCCESS, "", cached=False)
        body: Any = response.body.decode("utf-8", "replace")
        if "json" in response.content_type:
            with contextlib.suppress(ValueError):
                body = json.loads(response.body)
        scope = Scope(
            secrets=self._secrets.get,
            response={"status": response.status, "headers": dict(response.headers), "body": body},
        )
        values = self._render_auth(plan, scope)
        expires = time.time() + auth.expiry.total_seconds()
        text = self._vault.seal(key, json.dumps({"values": values, "expires": expires}))
        await self._store.put_auth_token(key, text, datetime.fromtimestamp(expires, UTC))
        return _Token(values, text, expires)

    # -- records ----------------------------------------------------------------------------------------------

    def _record(
        self, ctx: _Context, process_id: str, started: datetime, status: ExecutionStatus, reason: str, *, cached: bool
    ) -> None:
        self._recorder.record(self._execution(ctx, process_id, started, status, reason, cached=cached))

    @staticmethod
    def _execution(
        ctx: _Context, process_id: str, started: datetime, status: ExecutionStatus, reason: str, *, cached: bool
    ) -> ExecutionRecord:
        return ExecutionRecord(
            process_id=process_id,
            product=ctx.call.product,
            env=ctx.resolved.env.slug,
            version=ctx.resolved.version,
            kind="action",
            resource=ctx.plan.resource,
            status=status,
            started_at=started,
            ended_at=datetime.now(UTC),
            attempts=ctx.attempts.count,
            upstream_status=ctx.attempts.upstream_status,
            error_reason=reason,
            cached=cached,
            detail=ctx.attempts.detail,
        )
