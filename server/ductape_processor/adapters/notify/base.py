"""The channel interface every notification provider implements, and what passes through it.

The runtime renders a message and hands the adapter one `Outgoing` delivery at a time (an email to all its
recipients; a push to one device; an SMS to one number; one callback). The adapter sends it once: it answers the
provider's message id, or raises `ChannelFailure` saying whether another attempt is safe and worth it. Retrying is
the runtime's (`runtime/policies/retry.py`), so a message a provider accepted is never sent again.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any

from ductape_processor.reasons import Reason


@dataclass(frozen=True, slots=True)
class EmailAttachment:
    """A file attached to an email."""

    file_name: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """One email to all its recipients."""

    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    subject: str
    html: str | None
    text: str | None
    attachments: tuple[EmailAttachment, ...] = ()
    message_id: str = ""
    """The Message-ID to send with it (the runtime makes one per send, so a retry carries the same)."""


@dataclass(frozen=True, slots=True)
class OutgoingPush:
    """One push notification to one device."""

    device_token: str
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutgoingSms:
    """One SMS to one number (E.164)."""

    to: str
    body: str


@dataclass(frozen=True, slots=True)
class OutgoingCallback:
    """One callback request."""

    query: Mapping[str, str]
    params: Mapping[str, str]
    headers: Mapping[str, str]
    body: Mapping[str, Any]


Outgoing = OutgoingEmail | OutgoingPush | OutgoingSms | OutgoingCallback


@dataclass(frozen=True, slots=True)
class Sent:
    """A delivery the provider accepted: its id there, and what the execution log shows of it (`shown`: for the
    `log` provider the rendered message; never a credential)."""

    message_id: str
    shown: Mapping[str, Any] | None = None


class ChannelFailure(Exception):
    """A delivery that failed. `retryable`: the provider did not accept it and may on another attempt (unreachable
    before it read the message, 429, 5xx, a transient SMTP 4xx); `retry_after_s`: the provider's Retry-After."""

    def __init__(
        self, reason: Reason, message: str, *, retryable: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class ChannelAdapter(abc.ABC):
    """One provider of one notification environment's channel; shared by every call, safe for concurrent use."""

    provider: str = ""
    """The provider's name as the manifest says it (`smtp`, `fcm`, `log` …)."""

    @abc.abstractmethod
    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        """Send one delivery once, within `timeout_s`; raise ChannelFailure."""

    async def close(self) -> None:  # noqa: B027 - most providers hold nothing to close
        """Release connections (at shutdown, or when the environment's settings changed)."""
