"""Sessions: tokens that carry a user's data encrypted, refresh-token rotation with reuse detection, revocation.

Tokens are sealed and opened in `tokens` (AES-256-GCM, bound to product, environment, session type and kind) under
keys derived in `keys` from the configured root keys: new tokens use the first configured key, older keys keep
verifying tokens until they expire.

Verifying costs no store round trip: revocations are kept in memory and refreshed from the store every
`revocation_poll_s` seconds, which bounds how long another replica may still accept a revoked session.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from ductape_processor.errors import InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.contract import check_input
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.paging import decode_page_token, effective_page_size, page, time_position
from ductape_processor.runtime.policies.periodic import PeriodicTask
from ductape_processor.runtime.registry.manifest import SessionType
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.sessions.keys import SessionKeys, b64
from ductape_processor.runtime.sessions.tokens import SessionError, open_token, seal
from ductape_processor.store.base import SessionFilter, SessionRecord, Store

log = logging.getLogger(__name__)

REFRESH_RACE_GRACE_S = 10.0
VERIFIED_CACHE_SIZE = 10_000


class RefreshConflict(ProcessorError, code=grpc.StatusCode.ABORTED, reason=Reason.REFRESH_CONFLICT):
    """Two calls exchanged one refresh token at once; the other call got the new pair."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What Start and Refresh return."""

    token: str
    refresh_token: str
    expires_at: datetime
    refresh_expires_at: datetime
    session_id: str


@dataclass(frozen=True, slots=True)
class VerifiedSession:
    """A verified session token's contents."""

    data: dict[str, Any]
    session_id: str
    identifier: str
    expires_at: datetime


class SessionManager:
    """Starts, verifies, refreshes, revokes and lists sessions."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        keys: SessionKeys,
        *,
        clock: Callable[[], float] = time.time,
        revocation_poll_s: float = 2.0,
    ) -> None:
        self._registry = registry
        self._store = store
        self._keys = keys
        self._clock = clock
        self._poll_s = revocation_poll_s
        self._revoked: dict[str, float] = {}  # session id -> when its tokens stop mattering (session expiry)
        self._since = datetime.fromtimestamp(clock(), UTC) - timedelta(days=3650)
        self._watcher = PeriodicTask("session revocations refresh", self._poll_s, self._refresh_revocations)
        # Tokens already opened (decrypting is the costly part of a verify); bounded, never trusted past expiry.
        self._verified: BoundedCache[tuple[str, str, str, str], VerifiedSession] = BoundedCache(VERIFIED_CACHE_SIZE)

    # -- revocation cache ---------------------------------------------------------------------------------------

    async def start_watching(self) -> None:
        """Load current revocations and keep following them."""
        await self._refresh_revocations()
        self._watcher.start()

    async def stop_watching(self) -> None:
        """Stop following revocations."""
        await self._watcher.stop()

    async def _refresh_revocations(self) -> None:
        # Overlap the window by a few seconds: clocks of replicas and commit order may differ slightly.
        rows = await self._store.revoked_since(self._since - timedelta(seconds=5))
        now = self._clock()
        for session_id, revoked_at, expires_at in rows:
            if expires_at.timestamp() > now:
                self._revoked[session_id] = expires_at.timestamp()
            self._since = max(self._since, revoked_at)
        for session_id, until in list(self._revoked.items()):
            if until <= now:
                del self._revoked[session_id]

    # -- tokens -------------------------------------------------------------------------------------------------

    def _open(self, kind: str, product: str, env: str, tag: str, token: str) -> dict[str, Any]:
        """The token's payload, if it is valid here, unexpired and of a session not revoked."""
        payload = open_token(self._keys, kind, product, env, tag, token)
        if payload.get("exp", 0) <= self._clock():
            raise SessionError("the session has expired", reason=Reason.SESSION_EXPIRED)
        if payload.get("sid") in self._revoked:
            raise SessionError("the session was revoked", reason=Reason.SESSION_REVOKED)
        return payload

    def _pair(self, product: str, env: str, session_type: SessionType, record: SessionRecord, data: Any) -> TokenPair:
        now = self._clock()
        session_end = record.expires_at.timestamp()
        expires = min(now + session_type.expiry.total_seconds(), session_end)
        common = {"sid": record.session_id, "idn": record.identifier, "d": data}
        token = seal(self._keys, "a", product, env, session_type.tag, {**common, "iat": int(now), "exp": expires})
        refresh = seal(
            self._keys, "r", product, env, session_type.tag, {**common, "g": record.generation, "exp": session_end}
        )
        return TokenPair(
            token=token,
            refresh_token=refresh,
            expires_at=datetime.fromtimestamp(expires, UTC),
            refresh_expires_at=record.expires_at,
            session_id=record.session_id,
        )

    # -- operations ---------------------------------------------------------------------------------------------

    async def _session_type(self, product: str, env: str, tag: str) -> tuple[str, SessionType]:
        if not tag:
            raise InvalidArgument.field("tag", "is required: the session type's tag")
        resolved = await self._registry.resolve(product, env)
        for session_type in resolved.manifest.sessions:
            if session_type.tag == tag:
                return resolved.env.slug, session_type
        raise NotFound(
            f"product {product!r} has no session type {tag!r}",
            reason=Reason.SESSION_TYPE_NOT_FOUND,
            metadata={"product": product, "tag": tag},
        )

    async def start(self, product: str, env: str, tag: str, data: Mapping[str, Any]) -> TokenPair:
        """Check `data` against the session type's schema and start a session."""
        slug, session_type = await self._session_type(product, env, tag)
        checked = check_input(session_type.data_schema, data, "data", root="")
        identifier = checked.get(session_type.identifier_field)
        if identifier is None or identifier == "":
            raise InvalidArgument.field(
                f"data.{session_type.identifier_field}", f"is required: the selector {session_type.selector} names it"
            )
        now = datetime.fromtimestamp(self._clock(), UTC)
        record = SessionRecord(
            session_id=b64(secrets.token_bytes(16)),
            product=product,
            env=slug,
            tag=tag,
            identifier=str(identifier) if not isinstance(identifier, str) else identifier,
            generation=0,
            started_at=now,
            refreshed_at=now,
            expires_at=now + session_type.refresh_expiry,
        )
        await self._store.create_session(record)
        return self._pair(product, slug, session_type, record, checked)

    async def verify(self, product: str, env: str, tag: str, token: str) -> VerifiedSession:
        """The session a token carries; SessionError when it is invalid, expired or revoked."""
        slug, _ = await self._session_type(product, env, tag)
        key = (product, slug, tag, token)
        known = self._verified.get(key)
        if known is not None:
            # A token verified before: only expiry and revocation can have changed since.
            if known.expires_at.timestamp() <= self._clock():
                raise SessionError("the session has expired", reason=Reason.SESSION_EXPIRED)
            if known.session_id in self._revoked:
                raise SessionError("the session was revoked", reason=Reason.SESSION_REVOKED)
            return known
        payload = self._open("a", product, slug, tag, token)
        verified = VerifiedSession(
            data=payload["d"],
            session_id=payload["sid"],
            identifier=payload["idn"],
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
        )
        self._verified.put(key, verified)
        return verified

    async def refresh(self, product: str, env: str, tag: str, refresh_token: str) -> TokenPair:
        """Exchange a refresh token for a new pair; reuse of an exchanged one revokes the session."""
        slug, session_type = await self._session_type(product, env, tag)
        payload = self._open("r", product, slug, tag, refresh_token)
        session_id, generation = payload["sid"], payload["g"]
        now = datetime.fromtimestamp(self._clock(), UTC)
        rotated = await self._store.rotate_session(session_id, generation, now)
        if rotated is not None:
            return self._pair(product, slug, session_type, rotated, payload["d"])
        current = await self._store.get_session(session_id)
        if current is None:
            raise SessionError("the session is not known here", reason=Reason.SESSION_INVALID)
        if current.revoked_at is not None:
            self._revoked[session_id] = current.expires_at.timestamp()
            raise SessionError("the session was revoked", reason=Reason.SESSION_REVOKED)
        if current.expires_at <= now:
            raise SessionError("the session has expired", reason=Reason.SESSION_EXPIRED)
        if current.generation == generation + 1 and (now - current.refreshed_at).total_seconds() < REFRESH_RACE_GRACE_S:
            raise RefreshConflict(
                "this refresh token was exchanged a moment ago by another call; use the tokens that call received",
                metadata={"session_id": session_id},
            )
        await self._revoke(product, slug, tag, session_id=session_id, identifier=None)
        log.warning("refresh token reused: session revoked", extra={"session_id": session_id, "product": product})
        raise SessionError("this refresh token was already used; the session is revoked", reason=Reason.SESSION_REVOKED)

    async def _revoke(
        self, product: str, slug: str, tag: str, *, session_id: str | None, identifier: str | None
    ) -> int:
        now = datetime.fromtimestamp(self._clock(), UTC)
        revoked = await self._store.revoke_sessions(
            product, slug, tag, session_id=session_id, identifier=identifier, now=now
        )
        for revoked_id, expires_at in revoked:
            self._revoked[revoked_id] = expires_at.timestamp()
        return len(revoked)

    async def revoke(self, product: str, env: str, tag: str, *, session_id: str | None, identifier: str | None) -> int:
        """Revoke one session or every session of one user; return how many were live."""
        slug, _ = await self._session_type(product, env, tag)
        return await self._revoke(product, slug, tag, session_id=session_id, identifier=identifier)

    async def list_active(
        self, product: str, env: str, tag: str, identifier: str | None, page_size: int, page_token: str
    ) -> tuple[list[SessionRecord], str]:
        """One page of live sessions, newest first, and the next page's token."""
        size = effective_page_size(page_size)
        slug, _ = await self._session_type(product, env, tag)
        listing = ("sessions", product, slug, tag, identifier or "")
        after = decode_page_token(listing, page_token, time_position) if page_token else None
        now = datetime.fromtimestamp(self._clock(), UTC)
        where = SessionFilter(product, slug, tag, identifier)
        records = await self._store.list_sessions(where, now, after=after, limit=size + 1)
        return page(records, size, listing, lambda record: (record.started_at.timestamp(), record.session_id))
