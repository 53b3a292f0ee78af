"""Broker messages in the forms the runtime and the broker adapters pass between them.

The runtime owns these types and the adapters (`adapters/brokers/`) implement the port that carries them, so the
API layer takes them from here and never from an adapter. One naming scheme, the API's: a message goes out or comes
in; as the caller gives it, it is a message (the API's `OutgoingMessage`), and in the CloudEvents envelope a broker
carries, an event:
- `OutgoingMessage`: a message as a caller gave it to publish;
- `OutgoingEvent`: a `CloudEvent` the runtime built around it, which an adapter publishes;
- `IncomingEvent`: a `CloudEvent` an adapter's subscription fetched, with the handle that acks it (the API sends it
  on as a `ReceivedMessage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message as the caller gave it (the API's `OutgoingMessage`)."""

    data: bytes
    content_type: str
    attributes: Mapping[str, str]
    ordering_key: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """The CloudEvents 1.0 attributes and payload every message has, published or received."""

    id: str
    source: str
    type: str
    time: datetime
    data: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class OutgoingEvent(CloudEvent):
    """A message to publish, with the caller's attributes."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    ordering_key: str = ""
    traceparent: str = ""
    tracestate: str = ""


@dataclass(frozen=True, slots=True)
class IncomingEvent(CloudEvent):
    """A message received on a subscription. `handle` is what ack/nack take; `id` is the CloudEvents id."""

    handle: str
    attributes: dict[str, str]
    ordering_key: str
    traceparent: str
    delivery_attempt: int
    tracestate: str = ""


_CARRIED: Final = (*(f.name for f in fields(CloudEvent)), "ordering_key", "traceparent", "tracestate")


def carried(message: OutgoingEvent | IncomingEvent) -> dict[str, Any]:
    """What a message keeps from its publisher to its subscribers, and on to a dead-letter topic: the CloudEvent, its
    ordering key and its trace context. Not its attributes: each form of the message takes its own copy of them."""
    return {name: getattr(message, name) for name in _CARRIED}
