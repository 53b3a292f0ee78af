"""NATS message headers: CloudEvents 1.0 in the binary content mode of the NATS binding (as the CloudEvents Go SDK
writes it), every value percent-encoded, and the defaults of messages other producers wrote (see `nats`)."""

from __future__ import annotations

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


_PLAIN = bytes(code for code in range(0x21, 0x7F) if chr(code) not in '"%')


def _plain(value: str) -> bool:
    """Nothing in `value` to percent-encode: printable ASCII but space, '"' and '%' (most values: ids, times, types).
    Deleting those bytes leaves nothing: one C loop over a table, a third of the instructions of the regular
    expression that says the same."""
    return value.isascii() and not value.encode().translate(None, _PLAIN)


def encode(value: str) -> str:
    """Percent-encode a header value (CloudEvents HTTP binding 3.1.3.2): space, '"', '%' and non-printable ASCII."""
    if _plain(value):
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
    # JetStream's headers first: nats-server reads a header at the first place its name appears in the block, so
    # an attribute value holding the text `Nats-Msg-Id` (encoded or not) must come after the real one.
    headers = {
        _MSG_ID: f"{topic}:{message.id}",
        _EXPECTED_STREAM: stream,
        **_BINDING.headers(message, time),
    }
    # Most messages have nothing to encode: one look at all their values, rather than one call for each (this runs
    # for every message published).
    if _plain("".join(headers.values())):
        return headers
    return {key: encode(value) for key, value in headers.items()}


def prepared_headers(
    max_payload: int, topic: str, message: OutgoingEvent, stream: str, time: str | None = None
) -> bytes:
    """The message's header block as written on the wire (`NATS/1.0`, a `name: value` line per header of
    `outgoing_headers`, an empty line), once the message and it are known to fit the server's max_payload (else
    INVALID_ARGUMENT `MESSAGE_TOO_LARGE`). Percent-encoding leaves no space, CR or LF in a value and attribute keys
    are tokens, so nothing in it needs nats-py's own checks (see `nats_publish.write`)."""
    head = "".join([f"{key}: {value}\r\n" for key, value in outgoing_headers(topic, message, stream, time).items()])
    block = f"NATS/1.0\r\n{head}\r\n".encode()
    size = len(message.data) + len(block)
    if size > max_payload:
        raise InvalidArgument(
            f"the message and its headers are {size} bytes; the NATS server accepts at most {max_payload}",
            reason=Reason.MESSAGE_TOO_LARGE,
            violations=[FieldViolation("message.data", f"is larger than the NATS max_payload ({max_payload})")],
        )
    return block


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
