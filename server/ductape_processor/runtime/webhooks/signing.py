"""Webhook signatures: Standard Webhooks (https://www.standardwebhooks.com) both ways, and a plain HMAC-SHA256 of the
body for providers that sign that way (GitHub's `X-Hub-Signature-256`, Shopify's `X-Shopify-Hmac-Sha256`).

Standard Webhooks: the signed content is `<webhook-id>.<webhook-timestamp>.<body>`, HMAC-SHA256 with the secret's key
(the base64 after `whsec_`), written `v1,<base64>`; `webhook-signature` holds one or more, space-separated (one per
secret during a rotation). Every comparison is constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the prefix of every secret, not one
SIGNATURE_VERSION: Final = "v1"
MAX_SIGNATURES: Final = 16
"""Signatures of one `webhook-signature` header checked at most (a header of thousands costs a HMAC each)."""


class SignatureRefused(Exception):
    """A received webhook's signature does not verify; the message says why (for the log, never the sender)."""


def signing_key(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: the base64 after `whsec_` (the prefix is optional)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("a webhook secret is whsec_ followed by base64 of at least one byte")
    return key


def _digest(key: bytes, message_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(message_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per key, space-separated."""
    return " ".join(
        f"{SIGNATURE_VERSION},{base64.b64encode(_digest(key, message_id, timestamp, body)).decode()}" for key in keys
    )


def signed_headers(message_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> dict[str, str]:
    """The three headers of a Standard Webhooks delivery."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(message_id, timestamp, body, keys),
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureRefused(f"the {name} header is missing")
    return value


def verify_standard(headers: Mapping[str, str], body: bytes, key: bytes, now: float, tolerance_s: float) -> str:
    """The webhook's id when `headers` (lower-case names) carry a valid Standard Webhooks signature of `body`, made
    within `tolerance_s` of `now` (either way); SignatureRefused otherwise."""
    message_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:  # str.isdigit takes '²' and other scripts
        raise SignatureRefused("webhook-timestamp is not a number of seconds")
    timestamp = int(stamp)
    if abs(now - timestamp) > tolerance_s:
        raise SignatureRefused(f"webhook-timestamp is more than {tolerance_s:g} s from now")
    expected = _digest(key, message_id, timestamp, body)
    for entry in _header(headers, "webhook-signature").split(" ")[:MAX_SIGNATURES]:
        version, _, given = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            decoded = base64.b64decode(given, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(decoded, expected):
            return message_id
    raise SignatureRefused("no signature of webhook-signature matches")


def verify_hmac(
    headers: Mapping[str, str], body: bytes, secret: bytes, header: str, encoding: str, prefix: str = ""
) -> str:
    """The signature (which names the webhook for replay checks) when `header` holds HMAC-SHA256 of `body` with
    `secret`, hex or base64 after `prefix`; SignatureRefused otherwise."""
    given = _header(headers, header.lower()).strip()
    if prefix:
        if not given.startswith(prefix):
            raise SignatureRefused(f"{header} does not start with {prefix!r}")
        given = given[len(prefix) :]
    digest = hmac.new(secret, body, hashlib.sha256).digest()
    try:
        decoded = bytes.fromhex(given) if encoding == "hex" else base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRefused(f"{header} is not {encoding}") from None
    if not hmac.compare_digest(decoded, digest):
        raise SignatureRefused(f"{header} does not match the body")
    return hashlib.sha256(decoded).hexdigest()
