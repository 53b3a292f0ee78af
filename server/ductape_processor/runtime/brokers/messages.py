"""Broker messages in the forms the runtime and the broker adapters pass between them.

The runtime owns these types and the adapters (`adapters/brokers/`) implement the port that carries them, so the
API layer takes them from here and never from an adapter. One naming scheme, the API's: a message goes out or comes
in; as the caller gives it, it is a message (the API's `OutgoingMessage`), and in the CloudEvents envelope a broker
carries, an event:
- `OutgoingMessage`: a message as a caller gave it to publish;
- `OutgoingEvent`: a `CloudEvent` the runtime built around it, which an adapter publishes;
- `IncomingEvent`: a `CloudEvent` an adapter's subscription fetched, with the handle that acks it (the API sends it
  on as a `ReceivedMessage`).

They are built for every message published and delivered, so the events are slotted dataclasses but not frozen: a
frozen dataclass's `__init__` sets each field through `object.__setattr__`, three to four times the cost of a plain
one (0.58 against 0.14 µs for five fields, 1.5 against 0.5 µs for an `OutgoingEvent`). Nothing changes one once
built. `OutgoingMessage`, which lives only until the runtime built its event, is a named tuple: the API makes one
for every message of a batch with `tuple.__new__` (0.14 against 0.53 µs for the dataclass's `__init__`, its
deallocation included) and the runtime unpacks it in one step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, NamedTuple

NO_ATTRIBUTES: Final[Mapping[str, str]] = MappingProxyType({})
"""The attributes of every message that has none: one shared empty mapping instead of a new dict a message (nothing
changes a message's attributes once it is built: a form of the message that needs its own copies them)."""


class OutgoingMessage(NamedTuple):
    """A message as the caller gave it (the API's `OutgoingMessage`). `json_payload`: the caller gave a JSON value
    (the API's `json`), which `data` holds as UTF-8 JSON; a subscriber may ask to receive it as a value again."""

    data: bytes
    content_type: str
    attributes: Mapping[str, str]
    ordering_key: str = ""
    idempotency_key: str = ""
    json_payload: bool = False


@dataclass(slots=True)
class CloudEvent:
    """The CloudEvents 1.0 attributes and payload every message has, published or received."""

    id: str
    source: str
    type: str
    time: datetime
    data: bytes
    content_type: str


@dataclass(slots=True)
class OutgoingEvent(CloudEvent):
    """A message to publish, with the caller's attributes. `json_payload`: `data` is a JSON value the caller gave
    as one (adapters carry the mark as the CloudEvents extension `JSON_PAYLOAD_EXTENSION`)."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    ordering_key: str = ""
    traceparent: str = ""
    tracestate: str = ""
    json_payload: bool = False


@dataclass(slots=True)
class IncomingEvent(CloudEvent):
    """A message received on a subscription. `handle` is what ack/nack take; `id` is the CloudEvents id;
    `json_payload`: it was published as a JSON value (see `OutgoingEvent`).

    An adapter's hot loop may make one with `object.__new__` and set every field itself (the Redis reader and the
    in-process broker do: a class call runs the dataclass's Python `__init__` in a nested frame, about 1k
    instructions more a message); such an adapter's tests compare what it makes with the class's own `__init__`, so
    a field added here and not set there fails them. `attributes` is read-only, as a published message's: the Redis
    reader gives every plain entry's message the shared empty `NO_ATTRIBUTES` (no dict a message)."""

    handle: str
    attributes: Mapping[str, str]
    ordering_key: str
    traceparent: str
    delivery_attempt: int
    tracestate: str = ""
    json_payload: bool = False


class PlainMessages(NamedTuple):
    """The messages of one batch publish when every one is plain, as the caller gave them: a non-empty payload of
    bytes and a content type, nothing else (no attributes, ordering key or idempotency key), in two columns (the
    i-th message is `data[i]`, `content_types[i]`). The API passes a batch on in this form when it can, so that
    no object is made per message between the request and an adapter that takes `PlainEvents`."""

    data: list[bytes]
    content_types: list[str]

    def entries(self) -> list[OutgoingMessage]:
        """The same messages, one `OutgoingMessage` each."""
        return [
            OutgoingMessage(data, content_type, NO_ATTRIBUTES)
            for data, content_type in zip(self.data, self.content_types, strict=True)
        ]


class PlainEvents(NamedTuple):
    """The CloudEvents of `PlainMessages` published in one call, as columns: what they share once (source, type,
    time, trace context), and per message its id, payload and content type (the default one where the caller gave
    none). The i-th event is `events()[i]`: an adapter that takes this form (`BrokerAdapter.publish_plain`) writes
    exactly what it would for those events."""

    ids: list[str]
    source: str
    type: str
    time: datetime
    data: list[bytes]
    content_types: list[str]
    traceparent: str
    tracestate: str

    def events(self) -> list[OutgoingEvent]:
        """One `OutgoingEvent` each (for adapters that publish events), made as the runtime's loop makes them:
        with `object.__new__` and every field set here (no call of the dataclass's `__init__` a message)."""
        source, type_, time, traceparent, tracestate = (
            self.source,
            self.type,
            self.time,
            self.traceparent,
            self.tracestate,
        )
        new_event = object.__new__
        events: list[OutgoingEvent] = []
        append = events.append
        for message_id, data, content_type in zip(self.ids, self.data, self.content_types, strict=True):
            made = new_event(OutgoingEvent)
            made.id = message_id
            made.source = source
            made.type = type_
            made.time = time
            made.data = data
            made.content_type = content_type
            made.attributes = NO_ATTRIBUTES
            made.ordering_key = ""
            made.traceparent = traceparent
            made.tracestate = tracestate
            made.json_payload = False
            append(made)
        return events


JSON_PAYLOAD_EXTENSION: Final = "ductapepayload"
"""The CloudEvents extension attribute that marks a payload published as a JSON value, with the value
`JSON_PAYLOAD_MARK`: brokers carry it like the other attributes (NATS `ce-ductapepayload`, AMQP
`cloudEvents_ductapepayload`, a Redis stream field `ductapepayload`). Messages without it are bytes."""
JSON_PAYLOAD_MARK: Final = "json"

_CARRIED: Final = (
    *(f.name for f in fields(CloudEvent)),
    "ordering_key",
    "traceparent",
    "tracestate",
    "json_payload",
)


def carried(message: OutgoingEvent | IncomingEvent) -> dict[str, Any]:
    """What a message keeps from its publisher to its subscribers, and on to a dead-letter topic: the CloudEvent, its
    ordering key and its trace context. Not its attributes: each form of the message takes its own copy of them."""
    return {name: getattr(message, name) for name in _CARRIED}
