"""NotificationService: proto in, NotificationRuntime call, proto out."""

from __future__ import annotations

from typing import Any

from ductape.processor.v1 import notification_pb2, notification_pb2_grpc

from ductape_processor.api.calls import Context, call_options, deadline, product_env
from ductape_processor.api.values import required, struct_to_dict
from ductape_processor.runtime.notifications.call import (
    AttachmentInput,
    CallbackInput,
    ChannelResult,
    EmailInput,
    NotificationCall,
    PushInput,
    SmsInput,
)
from ductape_processor.runtime.notifications.sender import NotificationRuntime

_CHANNELS = {
    "email": notification_pb2.CHANNEL_EMAIL,
    "push": notification_pb2.CHANNEL_PUSH,
    "sms": notification_pb2.CHANNEL_SMS,
    "callback": notification_pb2.CHANNEL_CALLBACK,
}


def _variables(message: Any, field: str = "variables") -> dict[str, Any]:
    return struct_to_dict(getattr(message, field)) if message.HasField(field) else {}


def _email(given: notification_pb2.EmailInput) -> EmailInput:
    return EmailInput(
        to=tuple(given.to),
        cc=tuple(given.cc),
        bcc=tuple(given.bcc),
        variables=_variables(given),
        attachments=tuple(_attachment(a) for a in given.attachments),
    )


def _attachment(given: notification_pb2.Attachment) -> AttachmentInput:
    ref = (given.storage_file.storage, given.storage_file.file_name) if given.HasField("storage_file") else None
    return AttachmentInput(given.file_name, given.content_type, given.data, ref)


def _push(given: notification_pb2.PushInput) -> PushInput:
    return PushInput(tuple(given.device_tokens), _variables(given), _variables(given, "data"))


def _sms(given: notification_pb2.SmsInput) -> SmsInput:
    return SmsInput(tuple(given.to), _variables(given))


def _callback(given: notification_pb2.CallbackInput) -> CallbackInput:
    return CallbackInput(
        dict(given.query), dict(given.params), _variables(given, "body"), dict(given.headers), _variables(given)
    )


def _result(result: ChannelResult) -> notification_pb2.ChannelResult:
    return notification_pb2.ChannelResult(
        channel=_CHANNELS[result.channel],
        success=result.success,
        message_ids=list(result.message_ids),
        error_reason=result.error_reason,
        error_message=result.error_message,
        attempts=result.attempts,
        provider=result.provider,
    )


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    """Serves NotificationService."""

    def __init__(self, runtime: NotificationRuntime) -> None:
        self._runtime = runtime

    async def Send(self, request: notification_pb2.SendRequest, context: Context) -> notification_pb2.SendResponse:
        call = NotificationCall(
            **product_env(request),
            event=required(request.event, "event", "notification_tag:message_tag"),
            email=_email(request.email) if request.HasField("email") else None,
            push=_push(request.push) if request.HasField("push") else None,
            sms=_sms(request.sms) if request.HasField("sms") else None,
            callback=_callback(request.callback) if request.HasField("callback") else None,
            **call_options(request),
        )
        result = await self._runtime.send(call, deadline(context))
        return notification_pb2.SendResponse(
            results=[_result(r) for r in result.results], process_id=result.process_id, version=result.version
        )
