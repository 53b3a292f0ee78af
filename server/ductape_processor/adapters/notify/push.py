"""Push notifications through Firebase Cloud Messaging's HTTP v1 API and Expo's push API, over the actions' HTTP
client.

FCM is authorised by an OAuth 2 access token that the service account's JWT (RS256, signed with its private key)
is exchanged for at the account's `token_uri`; the token is kept until a minute before it expires, minted again
then, or at once when FCM answers 401.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

import jwt
from yarl import URL

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.notify.base import ChannelAdapter, ChannelFailure, OutgoingPush, Sent
from ductape_processor.adapters.notify.http import (
    FORM,
    JSON,
    answer_json,
    endpoint,
    exchange,
    json_body,
    request_headers,
    status_failure,
)
from ductape_processor.reasons import Reason
from ductape_processor.runtime.registry.notifications import ExpoPush, FcmPush

FCM: Final = "https://fcm.googleapis.com"
FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
TOKEN_LIFETIME_S: Final = 3600
"""What the service account's JWT asks for (Google's maximum)."""
TOKEN_MARGIN_S: Final = 60.0
"""An access token is minted again this long before it expires."""
EXPO: Final = "https://exp.host"


class FcmChannel(ChannelAdapter):
    """`POST /v1/projects/{project_id}/messages:send` with `Authorization: Bearer <access token>` and
    `{"message": {"token", "notification": {"title", "body"}, "data"}}`; the answer's `name` is the message id."""

    provider = "fcm"

    def __init__(self, settings: FcmPush, http: HttpClientPool, name: str) -> None:
        self._http = http
        self._name = name
        try:
            account = json.loads(settings.credentials)
            self._email = str(account["client_email"])
            self._key = str(account["private_key"])
            self._token_uri = URL(str(account.get("token_uri") or "https://oauth2.googleapis.com/token"))
        except (ValueError, KeyError, TypeError):
            self._email = self._key = ""
            self._token_uri = URL()
        self._url = endpoint(settings.endpoint, FCM) / "v1" / "projects" / settings.project_id / "messages:send"
        self._token = ""
        self._expires = 0.0
        self._minting = asyncio.Lock()

    async def _access_token(self, timeout_s: float) -> str:
        async with self._minting:
            if self._token and time.monotonic() < self._expires:
                return self._token
            if not self._email or not self._key or not self._token_uri.is_absolute():
                raise ChannelFailure(
                    Reason.UPSTREAM_AUTH_FAILED,
                    "the FCM credentials are not a service account's JSON key (client_email, private_key, token_uri)",
                )
            now = int(time.time())
            claims = {
                "iss": self._email,
                "scope": FCM_SCOPE,
                "aud": str(self._token_uri),
                "iat": now,
                "exp": now + TOKEN_LIFETIME_S,
            }
            try:
                assertion = jwt.encode(claims, self._key, algorithm="RS256")
            except (ValueError, TypeError, jwt.PyJWTError):
                raise ChannelFailure(
                    Reason.UPSTREAM_AUTH_FAILED, "the service account's private_key cannot sign (not an RSA PEM key)"
                ) from None
            form = f"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}".encode()
            headers = request_headers(FORM)
            response = await exchange(
                self._http, f"{self._name}/token", "POST", self._token_uri, headers, form, timeout_s
            )
            if response.status in (400, 401, 403):
                failure = status_failure("the FCM token endpoint", response)
                raise ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, failure.message)
            answer = answer_json("the FCM token endpoint", response)
            token = answer.get("access_token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token:
                raise ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, "the FCM token endpoint answered no access_token")
            lifetime = answer.get("expires_in", TOKEN_LIFETIME_S)
            lifetime = lifetime if isinstance(lifetime, int | float) else TOKEN_LIFETIME_S
            self._token, self._expires = token, time.monotonic() + max(float(lifetime) - TOKEN_MARGIN_S, 0.0)
            return token

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingPush)
        message: dict[str, Any] = {
            "token": outgoing.device_token,
            "notification": {"title": outgoing.title, "body": outgoing.body},
        }
        if outgoing.data:
            message["data"] = dict(outgoing.data)
        body = json_body({"message": message})
        for _ in range(2):
            started = time.monotonic()
            token = await self._access_token(timeout_s)
            left = timeout_s - (time.monotonic() - started)
            headers = request_headers(JSON, f"Bearer {token}")
            response = await exchange(self._http, self._name, "POST", self._url, headers, body, left)
            if response.status != 401:
                break
            async with self._minting:  # the token was revoked or expired early: mint a new one, once
                if self._token == token:
                    self._token = ""
        answer = answer_json("fcm", response)
        return Sent(str(answer.get("name", "")) if isinstance(answer, dict) else "")


class ExpoChannel(ChannelAdapter):
    """`POST /--/api/v2/push/send` with `{to, title, body, data}` (and `Authorization: Bearer <access token>` when
    push security is on); the answer's `data` is a ticket, `status` ok with an `id`, or error with a `message`."""

    provider = "expo"

    def __init__(self, settings: ExpoPush, http: HttpClientPool, name: str) -> None:
        self._http = http
        self._name = name
        self._url = endpoint(settings.endpoint, EXPO) / "--" / "api" / "v2" / "push" / "send"
        self._headers = request_headers(JSON, f"Bearer {settings.access_token}" if settings.access_token else "")

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingPush)
        body: dict[str, Any] = {"to": outgoing.device_token, "title": outgoing.title, "body": outgoing.body}
        if outgoing.data:
            body["data"] = dict(outgoing.data)
        response = await exchange(self._http, self._name, "POST", self._url, self._headers, json_body(body), timeout_s)
        answer = answer_json("expo", response)
        ticket = answer.get("data") if isinstance(answer, dict) else None
        if isinstance(ticket, list):
            ticket = ticket[0] if ticket else None
        if isinstance(ticket, dict) and ticket.get("status") == "ok":
            return Sent(str(ticket.get("id", "")))
        details = ticket.get("details") if isinstance(ticket, dict) else None
        error = details.get("error") if isinstance(details, dict) else None
        text = ticket.get("message") if isinstance(ticket, dict) else None
        raise ChannelFailure(Reason.NOTIFICATION_REJECTED, f"expo refused the notification: {error or ''} {text or ''}")
