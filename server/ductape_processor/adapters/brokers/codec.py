"""CloudEvents 1.0 in binary content mode, written once for every broker: which header names a protocol binding
uses, the headers of an outgoing message, and the incoming message read back from them (leniently, with the
defaults a broker gives for messages other producers wrote).

Each adapter maps its protocol's headers (Redis stream fields, AMQP headers, NATS headers) to and from plain text;
the caller's attributes travel as `attr-<key>`, so they never collide with the CloudEvents names. A payload published
as a JSON value carries the extension `ductapepayload: json` (`messages.JSON_PAYLOAD_EXTENSION`), so that a
subscriber can receive it as a value again; a message without it is bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from ductape_processor.runtime.brokers.messages import (
    JSON_PAYLOAD_EXTENSION,
    JSON_PAYLOAD_MARK,
    IncomingEvent,
    OutgoingEvent,
)

ATTRIBUTE_PREFIX = "attr-"
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Binding:
    """The header names of one CloudEvents protocol binding."""

    prefix: str
    """Before every CloudEvents attribute name: `ce-` (NATS, like HTTP), `cloudEvents_` (AMQP), none (Redis)."""
    ordering_key: str
    """The extension carrying the ordering key (prefix included)."""
    content_type: str | None
    """The header of `datacontenttype`, or None when the protocol has a property of its own for it."""

    def headers(self, message: OutgoingEvent) -> dict[str, str]:
        """The message's CloudEvents attributes, trace context and caller attributes as text headers."""
        headers = {
            f"{self.prefix}specversion": "1.0",
            f"{self.prefix}id": message.id,
            f"{self.prefix}source": message.source,
            f"{self.prefix}type": message.type,
            f"{self.prefix}time": format_time(message.time),
        }
        if self.content_type is not None:
            headers[self.content_type] = message.content_type
        if message.ordering_key:
            headers[self.ordering_key] = message.ordering_key
        if message.traceparent:
            headers["traceparent"] = message.traceparent
        if message.tracestate:
            headers["tracestate"] = message.tracestate
        if message.json_payload:
            headers[f"{self.prefix}{JSON_PAYLOAD_EXTENSION}"] = JSON_PAYLOAD_MARK
        for key, value in message.attributes.items():
            headers[ATTRIBUTE_PREFIX + key] = value
        return headers

    def incoming(
        self,
        headers: Mapping[str, str],
        *,
        handle: str,
        data: bytes,
        attempt: int,
        default_id: str,
        default_type: str,
        default_time: datetime,
        content_type: str = "",
    ) -> IncomingEvent:
        """A received message from its text headers; the defaults stand in for attributes a foreign producer left
        out, `content_type` for the protocol's own content-type property."""
        return IncomingEvent(
            handle=handle,
            id=headers.get(f"{self.prefix}id") or default_id,
            source=headers.get(f"{self.prefix}source", ""),
            type=headers.get(f"{self.prefix}type") or default_type,
            time=parse_time(headers.get(f"{self.prefix}time"), default_time),
            data=data,
            content_type=(headers.get(self.content_type, "") if self.content_type else "")
            or content_type
            or DEFAULT_CONTENT_TYPE,
            attributes={
                key[len(ATTRIBUTE_PREFIX) :]: value
                for key, value in headers.items()
                if key.startswith(ATTRIBUTE_PREFIX)
            },
            ordering_key=headers.get(self.ordering_key, ""),
            traceparent=headers.get("traceparent", ""),
            tracestate=headers.get("tracestate", ""),
            delivery_attempt=max(attempt, 1),
            json_payload=headers.get(f"{self.prefix}{JSON_PAYLOAD_EXTENSION}") == JSON_PAYLOAD_MARK,
        )


def aware(moment: datetime) -> datetime:
    """A timestamp with a time zone: a naive one is taken as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """CloudEvents `time`: RFC 3339 in UTC, microseconds kept."""
    return aware(moment).astimezone(UTC).isoformat()


def parse_time(text: str | None, fallback: datetime) -> datetime:
    """A CloudEvents `time` (a naive one is UTC), or `fallback` when it is absent or unreadable."""
    if text:
        with contextlib.suppress(ValueError):
            return aware(datetime.fromisoformat(text))
    return fallback


def text(value: object) -> str:
    """A header value some driver gave as bytes, str or another type, as text (undecodable bytes replaced)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
