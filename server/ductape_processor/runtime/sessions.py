"""Sessions: tokens that carry a user's data encrypted, refresh-token rotation with reuse detection, revocation.

Tokens are AES-256-GCM (the `cryptography` package) over a small JSON payload. The key is derived with HKDF-SHA256
from a root key for each product and environment; the authenticated data binds a token to its product, environment,
session type and kind (session or refresh), so a token made for one never opens as another. A token names the id of
its root key: new tokens use the first configured key, older keys keep verifying tokens until they expire.

Verifying costs no store round trip: revocations are kept in memory and refreshed from the store every
`revocation_poll_s` seconds, which bounds how long another replica may still accept a revoked session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ductape_processor.errors import InvalidArgument, NotFound, ProcessorError, Unauthenticated
from ductape_processor.runtime.contract import check_input
from ductape_processor.runtime.manifest import SessionType
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.paging import decode_page_token, effective_page_size, page, time_position
from ductape_processor.runtime.registry import Registry
from ductape_processor.store.base import SessionFilter, SessionRecord, Store
from ductape_processor.store.files import private_directory, private_file

log = logging.getLogger(__name__)

TOKEN_PREFIX = "v1"  # noqa: S105 - a format marker, not a secret
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_TOKEN_CHARS = 16_384
REFRESH_RACE_GRACE_S = 10.0
GENERATED_KEY_FILE = "session-keys"
VERIFIED_CACHE_SIZE = 10_000


class SessionError(Unauthenticated):
    """A session token that cannot be accepted; the reason says why, never what the token held."""


class RefreshConflict(ProcessorError):
    """Two calls exchanged one refresh token at once; the other call got the new pair."""

    code = grpc.StatusCode.ABORTED
    reason = "REFRESH_CONFLICT"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_root_key(spec: str) -> tuple[str, bytes]:
    """`kid:base64url-of-32-bytes` → (kid, key); ValueError with the expected form otherwise."""
    kid, sep, encoded = spec.partition(":")
    if not sep or not kid or not kid.replace("-", "").replace("_", "").isalnum() or len(kid) > 32:
        raise ValueError("a session key is 'id:key' with an id of letters, digits, '-' or '_' (at most 32)")
    try:
        key = _unb64(encoded)
    except (ValueError, binascii.Error):
        raise ValueError(f"session key {kid!r}: the key is not base64url") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"session key {kid!r}: the key must be {KEY_BYTES} bytes ({len(key)} given)")
    return kid, key


def new_root_key(kid: str) -> str:
    """A fresh `kid:key` root key specification."""
    return f"{kid}:{_b64(os.urandom(KEY_BYTES))}"


class SessionKeys:
    """Root keys by id; the first one signs new tokens. Derived keys are cached per (key, product, env)."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one session key is needed")
        self.current = keys[0][0]
        self._roots = dict(keys)
        self._derived: dict[tuple[str, str, str], AESGCM] = {}

    @classmethod
    def load(cls, specs: list[str], data_dir: Path) -> tuple[SessionKeys, bool]:
        """The configured keys, or a key generated once and kept in the data directory (True when so)."""
        if specs:
            return cls([parse_root_key(spec) for spec in specs]), False
        path = data_dir / GENERATED_KEY_FILE
        private_file(path, create=False)
        if not path.exists():
            private_directory(path.parent, tighten=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(new_root_key("local") + "\n")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return cls([parse_root_key(line) for line in lines]), True

    def root_keys(self) -> list[tuple[str, bytes]]:
        """The root keys, the current one first: other secrets the processor keeps derive their keys from them."""
        return [(self.current, self._roots[self.current])] + [
            (kid, root) for kid, root in self._roots.items() if kid != self.current
        ]

    def cipher(self, kid: str, product: str, env: str) -> AESGCM | None:
        """The AEAD for tokens of (product, env) under root key `kid`, or None for an unknown key id."""
        cached = self._derived.get((kid, product, env))
        if cached is not None:
            return cached
        root = self._roots.get(kid)
        if root is None:
            return None
        info = f"ductape-processor/session/v1/{product}/{env}".encode()
        key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(root)
        cipher = AESGCM(key)
        self._derived[(kid, product, env)] = cipher
        return cipher


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
        self._watcher: asyncio.Task[None] | None = None
        # Tokens already opened (decrypting is the costly part of a verify); bounded, never trusted past expiry.
        self._verified: BoundedCache[tuple[str, str, str, str], VerifiedSession] = BoundedCache(VERIFIED_CACHE_SIZE)

    # -- revocation cache ---------------------------------------------------------------------------------------

    async def start_watching(self) -> None:
        """Load current revocations and keep following them."""
        await self._refresh_revocations()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="session-revocations")

    async def stop_watching(self) -> None:
        """Stop following revocations."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._refresh_revocations()
            except Exception as exc:  # keep the last known revocations; try again next time
                log.warning("session revocations: refresh failed: %s", exc)

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

    @staticmethod
    def _aad(kind: str, product: str, env: str, tag: str) -> bytes:
        return f"{TOKEN_PREFIX}|{kind}|{product}|{env}|{tag}".encode()

    def _seal(self, kind: str, product: str, env: str, tag: str, payload: Mapping[str, Any]) -> str:
        kid = self._keys.current
        cipher = self._keys.cipher(kid, product, env)
        assert cipher is not None
        nonce = os.urandom(NONCE_BYTES)
        sealed = cipher.encrypt(
            nonce, json.dumps(payload, separators=(",", ":")).encode(), self._aad(kind, product, env, tag)
        )
        return f"{TOKEN_PREFIX}.{kid}.{_b64(nonce + sealed)}"

    def _open(self, kind: str, product: str, env: str, tag: str, token: str) -> dict[str, Any]:
        invalid = SessionError("the session token is not valid here", reason="SESSION_INVALID")
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise invalid
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise invalid
        cipher = self._keys.cipher(parts[1], product, env)
        if cipher is None:
            raise invalid
        try:
            raw = _unb64(parts[2])
            if len(raw) <= NONCE_BYTES or _b64(raw) != parts[2]:  # one encoding per token: no malleable spellings
                raise invalid
            plain = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(kind, product, env, tag))
            payload = json.loads(plain)
        except (InvalidTag, ValueError, binascii.Error):
            raise invalid from None
        if not isinstance(payload, dict):
            raise invalid
        if payload.get("exp", 0) <= self._clock():
            raise SessionError("the session has expired", reason="SESSION_EXPIRED")
        if payload.get("sid") in self._revoked:
            raise SessionError("the session was revoked", reason="SESSION_REVOKED")
        return payload

    def _pair(self, product: str, env: str, session_type: SessionType, record: SessionRecord, data: Any) -> TokenPair:
        now = self._clock()
        session_end = record.expires_at.timestamp()
        expires = min(now + session_type.expiry.total_seconds(), session_end)
        common = {"sid": record.session_id, "idn": record.identifier, "d": data}
        token = self._seal("a", product, env, session_type.tag, {**common, "iat": int(now), "exp": expires})
        refresh = self._seal(
            "r", product, env, session_type.tag, {**common, "g": record.generation, "exp": session_end}
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
            reason="SESSION_TYPE_NOT_FOUND",
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
            session_id=_b64(secrets.token_bytes(16)),
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
                raise SessionError("the session has expired", reason="SESSION_EXPIRED")
            if known.session_id in self._revoked:
                raise SessionError("the session was revoked", reason="SESSION_REVOKED")
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
            raise SessionError("the session is not known here", reason="SESSION_INVALID")
        if current.revoked_at is not None:
            self._revoked[session_id] = current.expires_at.timestamp()
            raise SessionError("the session was revoked", reason="SESSION_REVOKED")
        if current.expires_at <= now:
            raise SessionError("the session has expired", reason="SESSION_EXPIRED")
        if current.generation == generation + 1 and (now - current.refreshed_at).total_seconds() < REFRESH_RACE_GRACE_S:
            raise RefreshConflict(
                "this refresh token was exchanged a moment ago by another call; use the tokens that call received",
                metadata={"session_id": session_id},
            )
        await self._revoke(product, slug, tag, session_id=session_id, identifier=None)
        log.warning("refresh token reused: session revoked", extra={"session_id": session_id, "product": product})
        raise SessionError("this refresh token was already used; the session is revoked", reason="SESSION_REVOKED")

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
