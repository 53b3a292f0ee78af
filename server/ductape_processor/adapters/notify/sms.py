"""SMS through Twilio's Messages API, Vonage's SMS API and Plivo's Message API, over the actions' HTTP client.

Each delivery is one message to one number, one request. What each request carries is what the provider's public
API reference documents; `tests/test_notifications_http.py` checks it against a local server.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlencode

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.notify.base import ChannelAdapter, ChannelFailure, OutgoingSms, Sent
from ductape_processor.adapters.notify.http import (
    FORM,
    JSON,
    answer_json,
    basic_auth,
    endpoint,
    exchange,
    json_body,
    request_headers,
)
from ductape_processor.reasons import Reason
from ductape_processor.runtime.registry.notifications import PlivoSms, TwilioSms, VonageSms

TWILIO: Final = "https://api.twilio.com"
VONAGE: Final = "https://rest.nexmo.com"
PLIVO: Final = "https://api.plivo.com"
VONAGE_RETRYABLE: Final = frozenset({"1"})
"""Vonage statuses worth another attempt: 1 is Throttled."""


class TwilioChannel(ChannelAdapter):
    """`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, Basic auth (account SID, auth token), form fields
    To, From, Body; the answer's `sid` is the message id."""

    provider = "twilio"

    def __init__(self, settings: TwilioSms, http: HttpClientPool, name: str) -> None:
        self._settings = settings
        self._http = http
        self._name = name
        base = endpoint(settings.endpoint, TWILIO)
        self._url = base / "2010-04-01" / "Accounts" / settings.account_sid / "Messages.json"
        self._headers = request_headers(FORM, basic_auth(settings.account_sid, settings.auth_token))

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingSms)
        form = urlencode({"To": outgoing.to, "From": self._settings.sender, "Body": outgoing.body}).encode()
        response = await exchange(self._http, self._name, "POST", self._url, self._headers, form, timeout_s)
        answer = answer_json("twilio", response)
        return Sent(str(answer.get("sid", "")))


class VonageChannel(ChannelAdapter):
    """`POST /sms/json` with api_key, api_secret, from, to (without `+`), text and `type: unicode` for text outside
    GSM's Latin range; the answer's `messages[0]` has `status` "0" and a `message-id`, or another status and an
    `error-text`."""

    provider = "vonage"

    def __init__(self, settings: VonageSms, http: HttpClientPool, name: str) -> None:
        self._settings = settings
        self._http = http
        self._name = name
        self._url = endpoint(settings.endpoint, VONAGE) / "sms" / "json"
        self._headers = request_headers(JSON)

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingSms)
        body: dict[str, str] = {
            "api_key": self._settings.api_key,
            "api_secret": self._settings.api_secret,
            "from": self._settings.sender,
            "to": outgoing.to.removeprefix("+"),
            "text": outgoing.body,
        }
        if not outgoing.body.isascii():
            body["type"] = "unicode"
        response = await exchange(self._http, self._name, "POST", self._url, self._headers, json_body(body), timeout_s)
        answer = answer_json("vonage", response)
        messages = answer.get("messages") if isinstance(answer, dict) else None
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
        status = str(first.get("status", ""))
        if status == "0":
            return Sent(str(first.get("message-id", "")))
        text = f"vonage refused the message: status {status or '(none)'} {first.get('error-text', '')}".strip()
        if status in VONAGE_RETRYABLE:
            raise ChannelFailure(Reason.UPSTREAM_STATUS, text, retryable=True)
        reason = Reason.UPSTREAM_AUTH_FAILED if status in ("2", "4") else Reason.NOTIFICATION_REJECTED
        raise ChannelFailure(reason, text)


class PlivoChannel(ChannelAdapter):
    """`POST /v1/Account/{auth_id}/Message/`, Basic auth (auth id, auth token), JSON src, dst, text; the answer's
    `message_uuid[0]` is the message id."""

    provider = "plivo"

    def __init__(self, settings: PlivoSms, http: HttpClientPool, name: str) -> None:
        self._settings = settings
        self._http = http
        self._name = name
        self._url = endpoint(settings.endpoint, PLIVO) / "v1" / "Account" / settings.auth_id / "Message" / ""
        self._headers = request_headers(JSON, basic_auth(settings.auth_id, settings.auth_token))

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingSms)
        body = {"src": self._settings.sender, "dst": outgoing.to, "text": outgoing.body}
        response = await exchange(self._http, self._name, "POST", self._url, self._headers, json_body(body), timeout_s)
        answer = answer_json("plivo", response)
        uuids = answer.get("message_uuid") if isinstance(answer, dict) else None
        return Sent(str(uuids[0]) if isinstance(uuids, list) and uuids else "")
