"""Notifications from Python: `processor.notification.send(...)`, one result per channel.

    sent = await processor.notification.send(
        product="shop", env="dev", event="users:welcome",
        email={"to": ["Ada <ada@example.com>"], "variables": {"name": "Ada"}},
        sms={"to": ["+447700900123"], "variables": {"name": "Ada"}},
    )
    for result in sent.results:
        print(result.channel, result.success, result.message_ids, result.error_reason)

A channel is sent when its input is given. Ductape's `push_notification` is accepted for `push`. An email
attachment is `{"file_name", "content_type", "data"}` (bytes), a (file_name, data) pair, or a file of the product's
storage: `{"storage_file": {"storage": "files", "file_name": "docs/terms.pdf"}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ductape.processor.calls import CallMetadata, ResourceClient
from ductape.processor.v1 import notification_pb2, notification_pb2_grpc
from ductape.processor.values import SessionLike, record_from, session_ref, struct

_CHANNEL_NAMES = {
    notification_pb2.CHANNEL_EMAIL: "email",
    notification_pb2.CHANNEL_PUSH: "push",
    notification_pb2.CHANNEL_SMS: "sms",
    notification_pb2.CHANNEL_CALLBACK: "callback",
}


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """What one channel's send came to: `channel` is `email`, `push`, `sms` or `callback`."""

    channel: str
    success: bool
    message_ids: list[str]
    error_reason: str = ""
    error_message: str = ""
    attempts: int = 0
    provider: str = ""


@dataclass(frozen=True, slots=True)
class SendResult:
    """One result per channel sent, the execution's process id and the version that ran."""

    results: list[ChannelResult]
    process_id: str = ""
    version: int = 0

    def channel(self, name: str) -> ChannelResult | None:
        """The result of one channel (`email`, `push`, `sms`, `callback`), None when it was not sent."""
        return next((result for result in self.results if result.channel == name), None)


def _attachment(given: Any) -> notification_pb2.Attachment:
    if isinstance(given, tuple):
        return notification_pb2.Attachment(file_name=given[0], data=given[1])
    ref = given.get("storage_file")
    return notification_pb2.Attachment(
        file_name=given.get("file_name", ""),
        content_type=given.get("content_type", ""),
        data=given.get("data", b""),
        storage_file=notification_pb2.StorageFileRef(**ref) if ref is not None else None,
    )


def _email(given: Mapping[str, Any]) -> notification_pb2.EmailInput:
    return notification_pb2.EmailInput(
        to=list(given.get("to", ())),
        cc=list(given.get("cc", ())),
        bcc=list(given.get("bcc", ())),
        variables=struct(given.get("variables")),
        attachments=[_attachment(a) for a in given.get("attachments", ())],
    )


def _push(given: Mapping[str, Any]) -> notification_pb2.PushInput:
    tokens = given.get("device_tokens", given.get("device_token", ()))
    return notification_pb2.PushInput(
        device_tokens=[tokens] if isinstance(tokens, str) else list(tokens),
        variables=struct(given.get("variables")),
        data=struct(given.get("data")),
    )


def _sms(given: Mapping[str, Any]) -> notification_pb2.SmsInput:
    to = given.get("to", ())
    return notification_pb2.SmsInput(
        to=[to] if isinstance(to, str) else list(to), variables=struct(given.get("variables"))
    )


def _callback(given: Mapping[str, Any]) -> notification_pb2.CallbackInput:
    return notification_pb2.CallbackInput(
        query=dict(given.get("query", {})),
        params=dict(given.get("params", {})),
        body=struct(given.get("body")),
        headers=dict(given.get("headers", {})),
        variables=struct(given.get("variables")),
    )


class NotificationClient(ResourceClient):
    """`processor.notification`: send a notification's messages."""

    _stub: notification_pb2_grpc.NotificationServiceAsyncStub

    async def send(
        self,
        *,
        product: str,
        env: str,
        event: str,
        email: Mapping[str, Any] | None = None,
        push: Mapping[str, Any] | None = None,
        sms: Mapping[str, Any] | None = None,
        callback: Mapping[str, Any] | None = None,
        push_notification: Mapping[str, Any] | None = None,
        session: SessionLike | None = None,
        retries: int | None = None,
        idempotency_key: str = "",
        version: int = 0,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
    ) -> SendResult:
        """Send the message `event` (`notification:message`) on each channel given."""
        push = push if push is not None else push_notification
        request = notification_pb2.SendRequest(
            product=product,
            env=env,
            event=event,
            email=_email(email) if email is not None else None,
            push=_push(push) if push is not None else None,
            sms=_sms(sms) if sms is not None else None,
            callback=_callback(callback) if callback is not None else None,
            session=session_ref(session) if session is not None else None,
            retries=retries,
            idempotency_key=idempotency_key,
            version=version,
        )
        response = await self._call(self._stub.Send, request, timeout, metadata)
        results = [
            record_from(
                ChannelResult,
                result,
                channel=_CHANNEL_NAMES.get(result.channel, ""),
                message_ids=list(result.message_ids),
            )
            for result in response.results
        ]
        return record_from(SendResult, response, results=results)
