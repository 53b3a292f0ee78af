"""An action's auths: their values for one call. A plain auth is rendered from the manifest on every call; a
credential auth's values come from a token that its login action mints, kept sealed in the store and in memory,
and minted again when it expires or when the upstream answers 401."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.runtime.actions.call import ActionResult, CallState
from ductape_processor.runtime.actions.contract import check_action_input
from ductape_processor.runtime.actions.plan import AuthPlan
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.secrets import SecretSource, TokenVault
from ductape_processor.runtime.registry.manifest import CredentialAuth
from ductape_processor.runtime.templates import Scope
from ductape_processor.store.base import Store

TOKENS_REMEMBERED: Final = 10_000
"""Credential tokens kept in memory, one per (product, environment, app, auth); the least recently used goes first
(a forgotten token is read again from the store)."""

Login = Callable[[CallState, dict[str, Any], CredentialAuth], Awaitable[ActionResult]]
"""Sends a credential's login action with its checked input; answers only a 2xx response (else it raises)."""


@dataclass(slots=True)
class _Token:
    values: dict[str, Any]
    text: str
    expires: float


def _render(plan: AuthPlan, scope: Scope) -> dict[str, Any]:
    return {
        "headers": {name: t.render(scope) for name, t in plan.headers.items()},
        "query": {name: t.render(scope) for name, t in plan.query.items()},
        "body": plan.body.render(scope),
    }


class ActionAuths:
    """The values of the auths an action's templates read (`$Auth{tag}{…}`). Safe for concurrent calls: concurrent
    calls that need the same missing token wait for one login."""

    def __init__(self, store: Store, secrets: SecretSource, vault: TokenVault, login: Login) -> None:
        self._store = store
        self._secrets = secrets
        self._vault = vault
        self._login = login
        self._tokens: BoundedCache[str, _Token] = BoundedCache(TOKENS_REMEMBERED)
        self._minting: dict[str, asyncio.Future[_Token]] = {}

    @staticmethod
    def _key(state: CallState, tag: str) -> str:
        return f"{state.call.product}/{state.resolved.env.slug}/{state.call.app}/{tag}"

    async def values(self, state: CallState, tags: frozenset[str]) -> dict[str, Mapping[str, Any]]:
        """Auth tag → `{"headers": …, "query": …, "body": …}` for the auths `tags` of the call's app."""
        if not tags:
            return {}
        plans = state.resolved.plan.auths
        values: dict[str, Mapping[str, Any]] = {}
        for tag in tags:
            auth_plan = plans[(state.call.app, tag)]
            if isinstance(auth_plan.auth, CredentialAuth):
                values[tag] = (await self._credential(state, auth_plan)).values
            else:
                values[tag] = _render(auth_plan, state.scope(self._secrets, {}, {}))
        return values

    async def forget(self, state: CallState, tags: frozenset[str]) -> bool:
        """Drop the credential tokens this action used (the upstream said 401); True when there were any."""
        forgot = False
        plans = state.resolved.plan.auths
        for tag in tags:
            if isinstance(plans[(state.call.app, tag)].auth, CredentialAuth):
                key = self._key(state, tag)
                token = self._tokens.pop(key)
                if token is not None:
                    await self._store.delete_auth_token(key, token.text)
                forgot = True
        return forgot

    async def _credential(self, state: CallState, plan: AuthPlan) -> _Token:
        key = self._key(state, plan.auth.tag)
        token = self._tokens.get(key)
        if token is not None and token.expires > time.time():
            return token
        minting = self._minting.get(key)
        if minting is not None:
            return await asyncio.shield(minting)
        future: asyncio.Future[_Token] = asyncio.get_running_loop().create_future()
        self._minting[key] = future
        try:
            token = await self._load_or_mint(state, plan, key)
            self._tokens.put(key, token)
            future.set_result(token)
            return token
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            self._minting.pop(key, None)

    async def _load_or_mint(self, state: CallState, plan: AuthPlan, key: str) -> _Token:
        auth = plan.auth
        assert isinstance(auth, CredentialAuth)
        now = datetime.now(UTC)
        stored = await self._store.get_auth_token(key, now)
        opened = self._vault.open(key, stored) if stored is not None else None
        if stored is not None and opened is not None:
            payload = json.loads(opened)
            return _Token(payload["values"], stored, payload["expires"])
        # Nothing stored, or a row this processor cannot open (sealed under other root keys): mint a new token.
        login_plan = state.resolved.plan.actions[(state.call.app, auth.action)]
        login_state = CallState(state.call, state.resolved, login_plan, state.deadline)
        assert plan.login_input is not None
        login_input = plan.login_input.render(login_state.scope(self._secrets, {}, {}))
        try:
            checked = check_action_input(login_plan.action.input, login_input if isinstance(login_input, dict) else {})
        except InvalidArgument as exc:
            if not login_state.taint.texts:
                raise
            # The login input is rendered from secrets: a contract's reasons (`has 19 characters`) would describe them.
            raise InvalidArgument(
                f"auth {auth.tag!r}: the login input breaks the input contract of action {auth.action!r} "
                "(the reasons are withheld: the input derives from secrets)",
                reason=exc.reason,
                metadata={"app": state.call.app, "auth": auth.tag},
                violations=[
                    FieldViolation(v.field, "breaks the contract (the reason is withheld: it could reveal a secret)")
                    for v in exc.violations
                ],
            ) from None
        response = await self._login(login_state, checked, auth)
        body: Any = response.body.decode("utf-8", "replace")
        if "json" in response.content_type:
            with contextlib.suppress(ValueError):
                body = json.loads(response.body)
        scope = Scope(
            secrets=self._secrets.get,
            response={"status": response.status, "headers": dict(response.headers), "body": body},
        )
        values = _render(plan, scope)
        expires = time.time() + auth.expiry.total_seconds()
        text = self._vault.seal(key, json.dumps({"values": values, "expires": expires}))
        await self._store.put_auth_token(key, text, datetime.fromtimestamp(expires, UTC))
        return _Token(values, text, expires)
