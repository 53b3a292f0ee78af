"""NATS message headers: CloudEvents 1.0 in the binary content mode of the NATS binding (as the CloudEvents Go SDK
writes it), every value percent-encoded, and the defaults of messages other producers wrote (see `nats`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import unquote

import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from ductape_processor.adapters.brokers.codec import Binding
from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent

_BINDING = Binding(prefix="ce-", ordering_key="ce-orderingkey", content_type="content-type")


_MSG_ID = api.Header.MSG_ID.value
_EXPECTED_STREAM = api.Header.EXPECTED_STREAM.value
_PLAIN = re.compile(r"[!#$&-~]*\Z")
"""A value with nothing to encode: printable ASCII but space, '"' and '%' (most values: ids, times, types)."""


def encode(value: str) -> str:
    """Percent-encode a header value (CloudEvents HTTP binding 3.1.3.2): space, '"', '%' and non-printable ASCII."""
    if _PLAIN.match(value):
        return value
    out: list[str] = []
    for char in value:
        if "!" <= char <= "~" and char not in '"%':
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode())
    return "".join(out)


def decode(value: str | None) -> str:
    return unquote(value, errors="replace") if value else ""


def outgoing_headers(topic: str, message: OutgoingEvent, stream: str, time: str | None = None) -> dict[str, str]:
    """A message's NATS headers: JetStream's (the message id that dedupes a re-sent copy, the stream expected to
    store it) and the CloudEvents binding's (`time`: the message's, formatted already), every value
    percent-encoded."""
    headers = {
        _MSG_ID: f"{topic}:{message.id}",
        _EXPECTED_STREAM: stream,
        **_BINDING.headers(message, time),
    }
    # Most messages have nothing to encode: one look at all their values, rather than one call for each (this runs
    # for every message published).
    if _PLAIN.match("".join(headers.values())):
        return headers
    return {key: encode(value) for key, value in headers.items()}


def prepared_headers(
    max_payload: int, topic: str, message: OutgoingEvent, stream: str, time: str | None = None
) -> dict[str, str]:
    """`outgoing_headers`, once the message and its headers are known to fit the server's max_payload (else
    INVALID_ARGUMENT `MESSAGE_TOO_LARGE`)."""
    headers = outgoing_headers(topic, message, stream, time)
    size = len(message.data) + header_bytes(headers)
    if size > max_payload:
        raise InvalidArgument(
            f"the message and its headers are {size} bytes; the NATS server accepts at most {max_payload}",
            reason=Reason.MESSAGE_TOO_LARGE,
            violations=[FieldViolation("message.data", f"is larger than the NATS max_payload ({max_payload})")],
        )
    return headers


def header_bytes(headers: Mapping[str, str]) -> int:
    # NATS/1.0\r\n + "key: value\r\n" per header + \r\n
    return 12 + len("".join(headers)) + len("".join(headers.values())) + 4 * len(headers)


def message_key(consumer: str, msg: Msg) -> tuple[str, int] | None:
    """The key of a message in its adapter's `Deliveries`: the consumer and the stream sequence (None for a message
    without JetStream metadata, which is never handed out)."""
    try:
        return consumer, msg.metadata.sequence.stream
    except (nats.errors.Error, ValueError, IndexError, TypeError, AttributeError):
        return None


def incoming(handle: str, msg: Msg, attempt: int) -> IncomingEvent:
    """The event of a JetStream message, handed out under `handle` as delivery `attempt`."""
    headers = msg.headers or {}
    if "%" in "".join(headers.values()):  # one look at all the values, rather than one call for each
        headers = {key: decode(value) for key, value in headers.items()}
    meta = msg.metadata
    return _BINDING.incoming(
        headers,
        handle=handle,
        data=msg.data,
        attempt=attempt,
        default_id=headers.get(_MSG_ID) or f"{meta.stream}:{meta.sequence.stream}",  # foreign
        default_type=msg.subject,
        default_time=meta.timestamp if meta.timestamp is not None else datetime.now(UTC),
        content_type=headers.get("ce-datacontenttype", ""),
    )
