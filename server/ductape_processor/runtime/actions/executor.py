"""ActionExecutor: runs one action of an app, from the caller's input to the upstream's answer.

The path of a call: resolve the product version → check the input contract → cache lookup → idempotency claim
(`idempotent`) → render templates (`request`; auth tokens minted when needed, `auth`) → circuit breaker, timeout
and retries around the HTTP adapter → cache/idempotency store → execution record (queued, written in batches).
The values a call carries through these steps are in `call`.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from ductape_processor.adapters.http.client import (
    HttpClientPool,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ductape_processor.adapters.http.encoding import canonical_json
from ductape_processor.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.auth import ActionAuths
from ductape_processor.runtime.actions.cache import named_cache
from ductape_processor.runtime.actions.call import ActionCall, ActionResult, CallState, outcome
from ductape_processor.runtime.actions.contract import check_action_input
from ductape_processor.runtime.actions.idempotent import IdempotentCalls
from ductape_processor.runtime.actions.request import build_request, recorded_request, require_path_params
from ductape_processor.runtime.policies.breaker import CircuitBreaker
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.retry import RetryBudget, parse_retry_after
from ductape_processor.runtime.policies.secrets import TokenVault
from ductape_processor.runtime.registry.manifest import CredentialAuth, Manifest
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.templates import RenderError, Scope
from ductape_processor.store.base import ExecutionStatus

BREAKERS_REMEMBERED: Final = 10_000
"""Circuit breakers kept, one per (product, environment, app); the least recently used goes first."""


def _no_scope() -> Scope:
    raise AssertionError("a plan without templates renders nothing")  # pragma: no cover


class ActionExecutor:
    """Runs actions. One instance per processor; safe for concurrent calls."""

    def __init__(self, services: CallServices, http: HttpClientPool, vault: TokenVault) -> None:
        self._services = services
        self._http = http
        # A credential's token is minted by sending its login action through this executor.
        self._auths = ActionAuths(services.store, services.secrets, vault, self._login)
        self._idempotent = IdempotentCalls(services.store, services.recorder, services.idempotency_retention)
        self._breakers: BoundedCache[str, CircuitBreaker] = BoundedCache(BREAKERS_REMEMBERED)

    # -- the call ---------------------------------------------------------------------------------------------

    async def run(self, call: ActionCall, deadline: Deadline) -> ActionResult:
        """Run `call`; raise a ProcessorError for anything but an upstream answer."""
        started = datetime.now(UTC)
        process_id = self._services.recorder.new_id()
        registry = self._services.registry
        resolved = registry.in_memory(call.product, call.env, call.version)  # most calls: no coroutine
        if resolved is None:
            resolved = await registry.resolve(call.product, call.env, call.version)
        plan = resolved.plan.actions.get((call.app, call.event))
        if plan is None:
            self._not_found(resolved.manifest, call)
        assert plan is not None
        state = CallState(call, resolved, plan, deadline, process_id=process_id, started=started)
        try:
            result = await self._run(state)
        except ProcessorError as exc:
            self._record(state, process_id, started, ExecutionStatus.FAIL, exc.reason, cached=False)
            raise
        except RenderError as exc:
            error = InvalidArgument(
                f"{exc.selector}: {exc.message}",
                reason=Reason.TEMPLATE_UNRESOLVED,
                metadata={"selector": exc.selector, "template": exc.path},
                violations=[FieldViolation(exc.selector, exc.message)],
            )
            self._record(state, process_id, started, ExecutionStatus.FAIL, error.reason, cached=False)
            raise error from None
        if not state.recorded:
            status, reason = outcome(result)
            self._record(state, process_id, started, status, reason, cached=result.cached)
        if result.process_id == process_id and result.version == resolved.version:
            return result  # sent by this call: `_send` built its answer whole
        # A cached or recorded answer: this call's id and version. Built directly rather than with
        # dataclasses.replace, which costs several times more.
        return ActionResult(
            result.status,
            result.headers,
            result.body,
            result.content_type,
            process_id=process_id,
            attempts=result.attempts,
            cached=result.cached,
            version=resolved.version,
        )

    def _not_found(self, manifest: Manifest, call: ActionCall) -> None:
        apps = {app.tag: app for app in manifest.apps}
        app = apps.get(call.app)
        if app is None:
            raise NotFound.in_product(call.product, "app", call.app, Reason.APP_NOT_FOUND)
        raise NotFound.in_resource(
            call.product, "app", call.app, "action", call.event, Reason.ACTION_NOT_FOUND, key="event"
        )

    async def _run(self, state: CallState) -> ActionResult:
        call, plan = state.call, state.plan
        if call.session is not None:
            tag, token = call.session
            state.session = (await self._services.sessions.verify(call.product, call.env, tag, token)).data
        checked = check_action_input(plan.action.input, call.input)
        require_path_params(plan, checked)
        cache = None
        cache_key = ""
        if call.cache:
            cache = named_cache(state.resolved.manifest, call.cache)
            cache_key = hashlib.sha256(
                canonical_json(
                    [
                        call.product,
                        state.resolved.env.slug,
                        state.resolved.version,
                        call.app,
                        call.event,
                        checked,
                        state.session if state.plan.uses_session else None,  # one user's answer is not another's
                    ]
                ).encode()
            ).hexdigest()
            hit = await self._services.cache.get(cache, cache_key)
            if hit is not None:
                return replace(ActionResult.decode(hit), cached=True)
        if call.idempotency_key:
            result = await self._idempotent.run(state, checked, lambda: self._send(state, checked, retry_unsafe=True))
        else:
            result = await self._send(state, checked)
        if cache is not None and 200 <= result.status < 300:
            await self._services.cache.put(cache, cache_key, result.encode())
        return result

    # -- sending ------------------------------------------------------------------------------------------------

    async def _send(self, state: CallState, checked: dict[str, Any], *, retry_unsafe: bool = False) -> ActionResult:
        plan, call = state.plan, state.call
        rules = plan.rules
        if call.retries is not None:
            if call.retries < 0 or call.retries > 20:
                raise InvalidArgument.field("retries", "must be between 0 and 20")
            rules = replace(rules, max_retries=call.retries)
        may_retry_sent = plan.idempotent or retry_unsafe
        upstream = f"{call.product}/{state.resolved.env.slug}/{call.app}"  # the breaker's and the pool's key
        breaker = self._breakers.get(upstream)
        if breaker is None:
            policy = plan.app.circuit_breaker
            breaker = CircuitBreaker(policy.failures, policy.cooldown.total_seconds())
            self._breakers.put(upstream, breaker)
        reminted = False
        budget: RetryBudget | None = None  # made at the first failure: most calls have none
        while True:
            auth = await self._auths.values(state, plan.auth_tags) if plan.auth_tags else {}
            # The scope's maker only for a plan with templates: `build_request` calls it only then.
            scope = partial(state.scope, self._services.secrets, checked, auth) if plan.renders else _no_scope
            request = build_request(state, scope, checked)
            state.detail = recorded_request(state, request)
            if breaker.opened_at is not None:
                breaker.before_call(f"{call.app} ({state.resolved.env.slug})")
            state.attempts += 1
            try:
                response = await self._http.send(upstream, request, state.deadline.bound(plan.timeout_s))
            except (UpstreamUnreachable, UpstreamTimeout) as exc:
                breaker.failure()
                if budget is None:
                    budget = RetryBudget(rules.backoff, state.deadline)
                sent = exc.sent if isinstance(exc, UpstreamUnreachable) else True
                if not (rules.network and budget.retries < rules.max_retries and (not sent or may_retry_sent)):
                    raise
                await self._pause(state, budget)
                continue
            except ResponseTooLarge:
                breaker.success()
                raise
            except BaseException:
                breaker.release()
                raise
            state.upstream_status = response.status
            if response.status == 401 and not reminted and await self._auths.forget(state, plan.auth_tags):
                reminted = True
                continue
            retries = budget.retries if budget is not None else 0
            if response.status in rules.statuses and retries < rules.max_retries and may_retry_sent:
                if budget is None:
                    budget = RetryBudget(rules.backoff, state.deadline)
                if response.status >= 500 or response.status == 429:
                    breaker.failure()
                await self._pause(state, budget, parse_retry_after(response.header("Retry-After")))
                continue
            if response.status >= 500:
                breaker.failure()
            else:
                breaker.success()
            return ActionResult(
                response.status,
                response.headers,
                response.body,
                response.content_type,
                process_id=state.process_id,
                attempts=state.attempts,
                version=state.resolved.version,
            )

    @staticmethod
    async def _pause(state: CallState, budget: RetryBudget, retry_after_s: float | None = None) -> None:
        if not await budget.pause(retry_after_s):
            raise UpstreamTimeout(
                f"the next retry (in {budget.pause_s:.2f}s) would pass the caller's deadline",
                metadata={"attempts": str(state.attempts)},
            )

    async def _login(self, state: CallState, checked: dict[str, Any], auth: CredentialAuth) -> ActionResult:
        """Send a credential's login action, recorded as a call of its own; an answer but 2xx fails the auth."""
        started = datetime.now(UTC)
        process_id = self._services.recorder.new_id()
        try:
            response = await self._send(state, checked)
        except ProcessorError as exc:
            self._record(state, process_id, started, ExecutionStatus.FAIL, exc.reason, cached=False)
            raise
        if not 200 <= response.status < 300:
            self._record(state, process_id, started, ExecutionStatus.FAIL, Reason.UPSTREAM_AUTH_FAILED, cached=False)
            raise FailedPrecondition(
                f"auth {auth.tag!r}: the login action {auth.action!r} answered {response.status}",
                reason=Reason.UPSTREAM_AUTH_FAILED,
                metadata={"app": state.call.app, "auth": auth.tag, "upstream_status": str(response.status)},
            )
        self._record(state, process_id, started, ExecutionStatus.SUCCESS, "", cached=False)
        return response

    # -- records ----------------------------------------------------------------------------------------------

    def _record(
        self,
        state: CallState,
        process_id: str,
        started: datetime,
        status: ExecutionStatus,
        reason: str,
        *,
        cached: bool,
    ) -> None:
        self._services.recorder.record(state.execution(process_id, started, status, reason, cached=cached))
