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
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    """The header names of one CloudEvents protocol binding (each spelled out once, at construction: they are looked
    up for every message)."""

    prefix: str
    """Before every CloudEvents attribute name: `ce-` (NATS, like HTTP), `cloudEvents_` (AMQP), none (Redis)."""
    ordering_key: str
    """The extension carrying the ordering key (prefix included)."""
    content_type: str | None
    """The header of `datacontenttype`, or None when the protocol has a property of its own for it."""
    specversion: str = field(init=False)
    id: str = field(init=False)
    source: str = field(init=False)
    type: str = field(init=False)
    time: str = field(init=False)
    json_payload: str = field(init=False)

    def __post_init__(self) -> None:
        for name in ("specversion", "id", "source", "type", "time"):
            object.__setattr__(self, name, self.prefix + name)
        object.__setattr__(self, "json_payload", self.prefix + JSON_PAYLOAD_EXTENSION)

    def headers(self, message: OutgoingEvent, time: str | None = None) -> dict[str, str]:
        """The message's CloudEvents attributes, trace context and caller attributes as text headers; `time` is
        its time already formatted (`format_time`), which the messages of one publish share."""
        headers = {
            self.specversion: "1.0",
            self.id: message.id,
            self.source: message.source,
            self.type: message.type,
            self.time: time or format_time(message.time),
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
            headers[self.json_payload] = JSON_PAYLOAD_MARK
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
        get = headers.get
        # Positional, in IncomingEvent's field order: this runs for every message delivered.
        return IncomingEvent(
            get(self.id) or default_id,
            get(self.source, ""),
            get(self.type) or default_type,
            parse_time(get(self.time), default_time),
            data,
            (get(self.content_type, "") if self.content_type else "") or content_type or DEFAULT_CONTENT_TYPE,
            handle,
            {key[len(ATTRIBUTE_PREFIX) :]: value for key, value in headers.items() if key.startswith(ATTRIBUTE_PREFIX)},
            get(self.ordering_key, ""),
            get("traceparent", ""),
            max(attempt, 1),
            get("tracestate", ""),
            get(self.json_payload) == JSON_PAYLOAD_MARK,
        )


class TimeText:
    """`format_time` for the messages of one publish, which share one time: formatted once, not once a message."""

    __slots__ = ("_moment", "_text")

    def __init__(self) -> None:
        self._moment: datetime | None = None
        self._text = ""

    def __call__(self, moment: datetime) -> str:
        if moment is not self._moment:
            self._moment, self._text = moment, format_time(moment)
        return self._text


def aware(moment: datetime) -> datetime:
    """A timestamp with a time zone: a naive one is taken as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """CloudEvents `time`: RFC 3339 in UTC, microseconds kept; what `isoformat` writes, in half its time (it formats
    through C's sprintf, 7k instructions for every message published): the part up to the second is formatted once
    for all the messages of that second."""
    moment = aware(moment).astimezone(UTC)
    whole = _to_the_second(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    micro = moment.microsecond
    return f"{whole}.{micro:06d}+00:00" if micro else f"{whole}+00:00"


@functools.lru_cache(maxsize=4)
def _to_the_second(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


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
