"""Web Push (RFC 8030) with VAPID (RFC 8292), the payload encrypted as RFC 8291 says (aes128gcm, http_ece).

A device token is the browser's subscription as JSON: `{"endpoint": "https://…", "keys": {"p256dh": …, "auth": …}}`.
The endpoint is the caller's, so it is checked before anything is sent: https, on one of the environment's
`push_services` (a host or a parent domain; loopback is allowed over http for local testing). The payload is the
JSON `{"title", "body", "data"}`.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Final

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.notify.base import ChannelAdapter, ChannelFailure, OutgoingPush, Sent
from ductape_processor.adapters.notify.http import exchange, json_body, status_failure
from ductape_processor.reasons import Reason
from ductape_processor.runtime.registry.notifications import WebPush

VAPID_LIFETIME_S: Final = 12 * 3600
"""How long a VAPID token is valid (RFC 8292 allows at most 24 hours)."""
LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def vapid_key(text: str) -> ec.EllipticCurvePrivateKey:
    """The VAPID private key from PEM, or from the base64url of its 32-byte scalar; ValueError otherwise."""
    if "BEGIN" in text:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    else:
        raw = _b64url_decode(text.strip())
        if len(raw) != 32:
            raise ValueError("a VAPID key in base64url is 32 bytes")
        key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("a VAPID key is a P-256 key")
    return key


def _subscription(token: str) -> tuple[URL, bytes, bytes]:
    try:
        subscription = json.loads(token)
        url = URL(str(subscription["endpoint"]))
        p256dh = _b64url_decode(str(subscription["keys"]["p256dh"]))
        auth = _b64url_decode(str(subscription["keys"]["auth"]))
    except (ValueError, KeyError, TypeError):
        raise ChannelFailure(
            Reason.NOTIFICATION_REJECTED, 'a Web Push device token is a subscription: {"endpoint", "keys": {…}}'
        ) from None
    if len(p256dh) != 65 or len(auth) != 16:
        raise ChannelFailure(Reason.NOTIFICATION_REJECTED, "the subscription's keys are not a P-256 key and 16 bytes")
    return url, p256dh, auth


class WebPushChannel(ChannelAdapter):
    """`POST <subscription endpoint>` with `Authorization: vapid t=<JWT>, k=<public key>`, `TTL`,
    `Content-Encoding: aes128gcm` and the encrypted payload; 201 accepted (the `Location` is the message id),
    404 and 410 mean the subscription is gone."""

    provider = "webpush"

    def __init__(self, settings: WebPush, http: HttpClientPool, name: str) -> None:
        self._settings = settings
        self._http = http
        self._name = name
        self._services = tuple(host.lower().lstrip(".") for host in settings.push_services)
        try:
            self._key: ec.EllipticCurvePrivateKey | None = vapid_key(settings.vapid_private_key)
        except (ValueError, TypeError):
            self._key = None
        self._public = ""
        if self._key is not None:
            point = self._key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            self._public = _b64url(point)

    def _allowed(self, url: URL) -> bool:
        host = (url.host or "").lower()
        if host in LOOPBACK:
            return url.scheme in ("http", "https")
        return url.scheme == "https" and any(host == s or host.endswith("." + s) for s in self._services)

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingPush)
        if self._key is None:
            raise ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, "the VAPID private key is not a P-256 key")
        url, p256dh, auth = _subscription(outgoing.device_token)
        if not self._allowed(url):
            raise ChannelFailure(
                Reason.NOTIFICATION_REJECTED,
                f"the subscription's endpoint host {url.host!r} is not one of the environment's push_services",
            )
        payload = json_body({"title": outgoing.title, "body": outgoing.body, "data": dict(outgoing.data)})
        encrypted = http_ece.encrypt(
            payload,
            salt=os.urandom(16),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=p256dh,
            auth_secret=auth,
            version="aes128gcm",
        )
        claims = {
            "aud": str(url.origin()),
            "exp": int(time.time()) + VAPID_LIFETIME_S,
            "sub": self._settings.vapid_subject,
        }
        token = jwt.encode(claims, self._key, algorithm="ES256")
        headers = {
            "Authorization": f"vapid t={token}, k={self._public}",
            "TTL": str(int(self._settings.ttl.total_seconds())),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": "normal",
        }
        response = await exchange(self._http, self._name, "POST", url, headers, encrypted, timeout_s)
        if response.status in (404, 410):
            raise ChannelFailure(Reason.NOTIFICATION_REJECTED, f"the subscription is gone ({response.status})")
        if not 200 <= response.status < 300:
            raise status_failure("the push service", response)
        return Sent(response.header("Location") or f"webpush-{response.status}")
