"""Session tokens: AES-256-GCM over a small JSON payload, bound to their product, environment, type and kind.

A token is `v1.<kid>.<base64url(nonce + ciphertext)>`. The authenticated data names the token's product, environment,
session type and kind (`a` for a session token, `r` for a refresh token), so a token made for one never opens as
another; it names its root key's id, so older keys keep opening tokens until they expire.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

from ductape_processor.errors import Unauthenticated
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.secrets import aead_open
from ductape_processor.runtime.sessions.keys import SessionKeys, b64, unb64

TOKEN_PREFIX = "v1"  # noqa: S105 - a format marker, not a secret
NONCE_BYTES = 12
MAX_TOKEN_CHARS = 16_384


class SessionError(Unauthenticated):
    """A session token that cannot be accepted; the reason says why, never what the token held."""


def _aad(kind: str, product: str, env: str, tag: str) -> bytes:
    return f"{TOKEN_PREFIX}|{kind}|{product}|{env}|{tag}".encode()


def seal(keys: SessionKeys, kind: str, product: str, env: str, tag: str, payload: Mapping[str, Any]) -> str:
    """A token of `kind` carrying `payload`, under the current root key."""
    kid = keys.current
    cipher = keys.cipher(kid, product, env)
    assert cipher is not None
    nonce = os.urandom(NONCE_BYTES)
    sealed = cipher.encrypt(nonce, json.dumps(payload, separators=(",", ":")).encode(), _aad(kind, product, env, tag))
    return f"{TOKEN_PREFIX}.{kid}.{b64(nonce + sealed)}"


def open_token(keys: SessionKeys, kind: str, product: str, env: str, tag: str, token: str) -> dict[str, Any]:
    """The payload of a token of `kind` for (product, env, tag); SESSION_INVALID for anything else, whatever it is."""
    invalid = SessionError("the session token is not valid here", reason=Reason.SESSION_INVALID)
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise invalid
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise invalid
    cipher = keys.cipher(parts[1], product, env)
    if cipher is None:
        raise invalid
    try:
        raw = unb64(parts[2])
        if len(raw) <= NONCE_BYTES or b64(raw) != parts[2]:  # one encoding per token: no malleable spellings
            raise invalid
        plain = aead_open(cipher, raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(kind, product, env, tag))
        if plain is None:
            raise invalid
        payload = json.loads(plain)
    except (ValueError, binascii.Error):
        raise invalid from None
    if not isinstance(payload, dict):
        raise invalid
    return payload
