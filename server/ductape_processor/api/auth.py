"""API-key authentication: `authorization: Bearer <key>` checked against configured SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from ductape_processor.errors import Unauthenticated
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.caches import BoundedCache

MAX_REMEMBERED = 1024


class ApiKeyAuthenticator:
    """Accepts a call whose bearer key hashes to one of the configured hashes (constant-time comparison)."""

    def __init__(self, key_hashes: Iterable[str]) -> None:
        self._hashes = [bytes.fromhex(h) for h in key_hashes]
        # Authorization values already accepted, so a caller's every call does not hash its key again. Only
        # accepted values are kept (a miss costs a hash and the constant-time comparison); bounded in size.
        self._accepted: BoundedCache[str, bool] = BoundedCache(MAX_REMEMBERED)

    @property
    def enabled(self) -> bool:
        """True when keys are configured, so every call (but health) must carry one."""
        return bool(self._hashes)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is `Bearer <a configured key>`."""
        if authorization is not None and self._accepted.get(authorization):
            return
        if authorization is None:
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>'", reason=Reason.API_KEY_MISSING
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization: expected 'Bearer <key>'", reason=Reason.API_KEY_INVALID)
        digest = hashlib.sha256(key.strip().encode("utf-8")).digest()
        matched = False
        for expected in self._hashes:
            matched |= hmac.compare_digest(digest, expected)
        if not matched:
            raise Unauthenticated("API key not accepted", reason=Reason.API_KEY_INVALID)
        self._accepted.put(authorization, True)


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key, as PROCESSOR_API_KEY_HASHES expects it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
