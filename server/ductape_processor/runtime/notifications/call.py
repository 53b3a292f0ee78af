"""What a Send asks for and what it answers, in plain Python: one input per channel, one result per channel."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ductape_processor.adapters.notify.base import EmailAttachment as EmailAttachment
from ductape_processor.records import record
from ductape_processor.runtime.options import CallOptions


@dataclass(frozen=True, slots=True)
class AttachmentInput:
    """An attachment as the call gives it: bytes, or `storage_file` (storage tag, key) to read them from."""

    file_name: str = ""
    content_type: str = ""
    data: bytes = b""
    storage_file: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class EmailInput:
    """Recipients, variables and attachments of the email channel."""

    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)
    attachments: tuple[AttachmentInput | EmailAttachment, ...] = ()
    """What the call gave (AttachmentInput); the runtime replaces them with the files read (EmailAttachment)."""


@dataclass(frozen=True, slots=True)
class PushInput:
    """Devices, variables and extra data of the push channel."""

    device_tokens: tuple[str, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SmsInput:
    """Numbers and variables of the SMS channel."""

    to: tuple[str, ...] = ()
    variables: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallbackInput:
    """What the callback request adds to the environment's: query, path params, body fields, headers."""

    query: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    variables: Mapping[str, Any] = field(default_factory=dict)


@record
class NotificationCall(CallOptions):
    """One Send: the message (`notification:message`), the input of each channel to send it on, and the options
    every call has."""

    product: str
    env: str
    event: str
    email: EmailInput | None = None
    push: PushInput | None = None
    sms: SmsInput | None = None
    callback: CallbackInput | None = None


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """What one channel's send came to."""

    channel: str
    provider: str
    success: bool
    message_ids: tuple[str, ...] = ()
    error_reason: str = ""
    error_message: str = ""
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class NotificationResult:
    """One result per channel sent, the execution's id and the version that ran."""

    results: tuple[ChannelResult, ...]
    process_id: str = ""
    version: int = 0

    def encode(self) -> bytes:
        """The results as an idempotency record keeps them."""
        return json.dumps([asdict(result) for result in self.results], separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, process_id: str, version: int) -> NotificationResult:
        """The results an idempotency record kept."""
        results = tuple(
            ChannelResult(**{**item, "message_ids": tuple(item["message_ids"])}) for item in json.loads(data)
        )
        return cls(results, process_id, version)
