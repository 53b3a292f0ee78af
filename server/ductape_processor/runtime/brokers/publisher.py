"""BrokerRuntime: publish to and subscribe on a product's topics, whatever broker each environment uses.

It resolves `broker_tag:topic_tag` in the caller's environment, opens (lazily, once) the adapter of that broker
environment, adds the CloudEvents 1.0 envelope and the current trace context to each message, applies publish
idempotency keys through the store, and opens Subscribe streams (stream.py) on the subscription engine
(subscriptions.py); it ends them all at shutdown. Adapters are found by type name in
`adapters.brokers.registry.BROKER_TYPES`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from ductape_processor.adapters.brokers.base import BrokerAdapter, BrokerUnavailable, SubscribeOptions
from ductape_processor.adapters.brokers.registry import BROKER_TYPES
from ductape_processor.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import (
    NO_ATTRIBUTES,
    IncomingEvent,
    OutgoingEvent,
    OutgoingMessage,
    PlainEvents,
    PlainMessages,
    carried,
)
from ductape_processor.runtime.brokers.stream import SubscribeStream
from ductape_processor.runtime.brokers.subscriptions import Limits, StreamClosing, Subscription
from ductape_processor.runtime.policies import Deadline
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.deadline import Timeouts
from ductape_processor.runtime.policies.environments import EnvironmentAdapters, EnvironmentRef
from ductape_processor.runtime.policies.idempotency import claim, idempotency_key_problem, key_reused, record_key
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.manifest import Broker, BrokerEnv, Topic
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.services import CallServices
from ductape_processor.store.base import IdempotencyRecord
from ductape_processor.telemetry.context import outgoing_trace_context

PUBLISH_LIMIT_S: Final = 8.0
"""The longest one Publish or PublishBatch waits for its broker, connecting included, when the caller's deadline is
later (or unset); then it answers UNAVAILABLE `BROKER_UNAVAILABLE` (docs/brokers.md says what that means)."""
PUBLISH_LEASE: Final = timedelta(seconds=PUBLISH_LIMIT_S + 5)
"""How long an idempotency key stays claimed by a publish: past PUBLISH_LIMIT_S its owner has given up or died."""
MAX_ATTRIBUTES = 64
MAX_ORDERING_KEY: Final = 256
"""Characters in a message's ordering key, at most."""
ROUTES_REMEMBERED: Final = 1024
"""Routes (product, environment, event) kept, the least recently used forgotten first."""
ID_BYTES: Final = 12
"""Random bytes in a message id (24 hex characters) when the publish has no idempotency key."""
ID_CHARS: Final = 2 * ID_BYTES
"""Characters in every message id: ID_BYTES in hex, or the hex digest's first ID_CHARS with an idempotency key."""
MAX_BATCH_ENTRIES = 1000
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
"""The CloudEvents `datacontenttype` of a message published without a content type."""
IDS_DRAWN: Final = 1024
"""Message ids drawn from the system's random source at once (12 KiB), for single publishes and batches."""
_ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")  # \Z: "$" would let a trailing newline through
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved `broker:topic` in one environment, and the CloudEvents `source` of messages published there."""

    resolved: Resolved
    broker: Broker
    topic: Topic
    source: str = field(init=False)
    ref: EnvironmentRef = field(init=False)
    """The broker environment, the key of its adapter."""
    opener: Callable[[BrokerEnv], BrokerAdapter] = field(init=False, compare=False, repr=False)
    """Opens the adapter of `ref` from its settings (made once a route, not once a publish)."""

    def __post_init__(self) -> None:
        resolved, tag = self.resolved, self.broker.tag
        ref = EnvironmentRef(resolved.product, resolved.version, resolved.env.slug, tag)
        object.__setattr__(self, "source", f"/ductape/{resolved.product}/{resolved.env.slug}/{tag}")
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "opener", lambda settings: _open(ref, settings))


class BrokerRuntime:
    """Publishing and subscribing, with one adapter per broker environment."""

    def __init__(self, services: CallServices, *, max_message_bytes: int) -> None:
        self._services = services
        self._max_bytes = max_message_bytes
        self._adapters = EnvironmentAdapters[BrokerAdapter]("broker", services.secrets)
        self._closing = asyncio.Event()
        self._subscriptions: set[Subscription] = set()
        self._routes = BoundedCache[tuple[str, str, str], Route](ROUTES_REMEMBERED)
        self._ids: list[str] = []  # drawn, not handed out yet (`_new_id`)
        self._timeouts = Timeouts()  # every publish has a time limit: asyncio.timeout's cost, a fifth of it

    # -- resolution ---------------------------------------------------------------------------------------------

    async def route(self, product: str, env: str, event: str, field: str = "event") -> Route:
        """The broker and topic an event names in the caller's environment. A route is remembered for as long as
        the environment resolves to the same model (finding it again took about 20 µs of a Publish's CPU)."""
        broker_tag, sep, topic_tag = event.partition(":")
        if not sep or not broker_tag or not topic_tag:
            raise InvalidArgument.field(field, "must be broker_tag:topic_tag")
        resolved = await self._services.registry.resolve(product, env)
        key = (product, env, event)
        known = self._routes.get(key)
        if known is not None and known.resolved is resolved:
            return known
        broker = named(product, resolved.manifest.brokers, "broker", broker_tag, Reason.BROKER_NOT_FOUND)
        topic = next((t for t in broker.topics if t.tag == topic_tag), None)
        if topic is None:
            raise NotFound.in_resource(product, "broker", broker_tag, "topic", topic_tag, Reason.TOPIC_NOT_FOUND)
        route = Route(resolved, broker, topic)
        self._routes.put(key, route)
        return route

    def adapter(self, route: Route) -> BrokerAdapter:
        """The (lazily opened, shared) adapter of the route's broker environment."""
        ref = route.ref
        return self._adapters.get(ref, route.broker.envs[ref.env], route.opener)

    # -- publishing ---------------------------------------------------------------------------------------------

    def _check(self, outgoing: OutgoingMessage, field: str) -> None:
        if _nothing_to_check(outgoing, self._max_bytes):
            return
        problems: list[FieldViolation] = []
        if len(outgoing.data) > self._max_bytes:
            too_large = InvalidArgument.field(
                f"{field}.data", f"is {len(outgoing.data)} bytes; the limit is {self._max_bytes}"
            )
            too_large.reason = Reason.MESSAGE_TOO_LARGE
            raise too_large
        if len(outgoing.attributes) > MAX_ATTRIBUTES:
            problems.append(FieldViolation(f"{field}.attributes", f"has more than {MAX_ATTRIBUTES} entries"))
        for key, value in outgoing.attributes.items():
            if not _ATTRIBUTE_KEY.match(key):
                problems.append(FieldViolation(f"{field}.attributes.{key}", "keys are letters, digits, '-', '_', '.'"))
            elif len(value) > 4096:
                problems.append(FieldViolation(f"{field}.attributes.{key}", "is longer than 4096 characters"))
        if len(outgoing.ordering_key) > MAX_ORDERING_KEY:
            problems.append(FieldViolation(f"{field}.ordering_key", f"is longer than {MAX_ORDERING_KEY} characters"))
        key_problem = idempotency_key_problem(outgoing.idempotency_key)
        if key_problem is not None:
            problems.append(FieldViolation(f"{field}.idempotency_key", key_problem))
        if problems:
            # Worded like every other field error (`<field>: <why>`), so a batch entry reads the same whichever
            # layer refused it.
            raise InvalidArgument(f"{problems[0].field}: {problems[0].description}", violations=problems)

    def _message(
        self, route: Route, outgoing: OutgoingMessage, trace: Mapping[str, str], message_id: str = ""
    ) -> OutgoingEvent:
        return _events(route, [outgoing], trace, [message_id or self._new_id()])[0]

    def _new_id(self) -> str:
        """A new message id, from ids drawn `IDS_DRAWN` at a time: one read of the system's random source for that
        many single publishes instead of one each."""
        if not self._ids:
            self._ids = _new_ids(IDS_DRAWN)
        return self._ids.pop()

    def _new_id_list(self, count: int) -> list[str]:
        """`count` new message ids, from the same ids drawn ahead (a batch of 100 once in ten reads)."""
        drawn = self._ids
        if len(drawn) < count:
            drawn += _new_ids(max(count, IDS_DRAWN))
        taken = drawn[-count:] if count else []
        del drawn[len(drawn) - count :]
        return taken

    async def _send(self, route: Route, send: Awaitable[T], seconds: float, *, keyed: bool) -> T:
        """Await one broker write (connecting included) for at most `seconds`."""
        try:
            return await self._timeouts.within(seconds, send)
        except TimeoutError:
            retry = (
                "publishing it again with the same idempotency key cannot store a second copy under another id"
                if keyed
                else "publishing it again may store a second copy (an idempotency key prevents that)"
            )
            raise BrokerUnavailable(
                f"broker {route.broker.tag!r} did not confirm the publish within {max(seconds, 0.0):.3g}s: the message "
                f"may or may not have been stored; {retry}",
                metadata={"broker": route.broker.tag, "topic": route.topic.tag},
            ) from None

    async def publish(
        self,
        product: str,
        env: str,
        event: str,
        outgoing: OutgoingMessage,
        field: str = "message",
        deadline: Deadline | None = None,
    ) -> str:
        """Publish one message; return its id once the broker confirmed it (within the caller's deadline and
        PUBLISH_LIMIT_S, else BrokerUnavailable). It carries the current trace context (as an action's request does)."""
        give_up = time.monotonic() + (deadline or Deadline(None)).bound(PUBLISH_LIMIT_S)
        self._check(outgoing, field)
        route = await self.route(product, env, event)
        adapter = self.adapter(route)
        trace = outgoing_trace_context()
        if not outgoing.idempotency_key:
            message = self._message(route, outgoing, trace)
            await self._send(route, adapter.publish(route.topic.name, message), give_up - time.monotonic(), keyed=False)
            return message.id
        return await self._publish_once(route, adapter, outgoing, trace, give_up)

    async def _publish_once(
        self, route: Route, adapter: BrokerAdapter, outgoing: OutgoingMessage, trace: Mapping[str, str], give_up: float
    ) -> str:
        key = record_key(
            ("publish", route.resolved.product, route.resolved.env.slug, f"{route.broker.tag}:{route.topic.tag}"),
            outgoing.idempotency_key,
        )
        digest = hashlib.sha256()
        for part in (
            outgoing.data,
            outgoing.content_type.encode(),
            json.dumps(dict(outgoing.attributes), sort_keys=True).encode(),
            outgoing.ordering_key.encode(),
        ):
            digest.update(len(part).to_bytes(8, "big") + part)
        request_hash = digest.hexdigest()
        # The id is a function of where, the key and the message: every attempt for one key publishes the same id, so
        # a copy stored by an attempt that answered UNAVAILABLE is dropped by JetStream (Nats-Msg-Id) and carries the
        # same id as the retry everywhere else. The message is part of it because a key may come back with another
        # message once its record has expired.
        message_id = hashlib.sha256(f"{key}\n{request_hash}".encode()).hexdigest()[:ID_CHARS]
        owner = os.urandom(8).hex()

        async def wait(_: IdempotencyRecord) -> None:
            if time.monotonic() + 0.05 >= give_up:
                raise BrokerUnavailable(
                    "another publish with this idempotency key is not confirmed yet: the message may or may not have "
                    "been stored; publishing it again with the same idempotency key is safe",
                    metadata={"broker": route.broker.tag, "idempotency_key": outgoing.idempotency_key},
                )
            await asyncio.sleep(0.05)

        answer = await claim(
            self._services.store,
            key,
            request_hash,
            owner,
            lease=PUBLISH_LEASE,
            retention=self._services.idempotency_retention,
            reused=lambda: key_reused("message", outgoing.idempotency_key),
            wait=wait,
        )
        if answer is not None:
            return answer.decode()
        message = self._message(route, outgoing, trace, message_id)
        try:
            await self._send(route, adapter.publish(route.topic.name, message), give_up - time.monotonic(), keyed=True)
        except BaseException:
            await self._services.store.idempotency_release(key, owner)
            raise
        await self._services.store.idempotency_complete(key, owner, message.id.encode())
        return message.id

    async def publish_batch(
        self,
        product: str,
        env: str,
        event: str,
        entries: Sequence[OutgoingMessage | ProcessorError] | PlainMessages,
        deadline: Deadline | None = None,
    ) -> Sequence[str | ProcessorError]:
        """Publish entries independently; each result is an id or the entry's error.

        An entry the caller's layer already refused is passed as its error and comes back as it is, so every entry
        keeps its position (`messages[i]` names the i-th entry of the request). A batch of plain messages may come
        as `PlainMessages` (columns): published as the same entries would be, with no object made a message on
        the way to an adapter that takes `PlainEvents`.
        """
        give_up = time.monotonic() + (deadline or Deadline(None)).bound(PUBLISH_LIMIT_S)
        columns: PlainMessages | None = None
        if isinstance(entries, PlainMessages):
            # Nothing in a plain message but its size for `_check` to refuse: one pass over the sizes (in C) for
            # the batch; a batch with one too large (or none at all) goes the whole way, each entry checked.
            if entries.data and max(map(len, entries.data)) <= self._max_bytes:
                columns, entries = entries, ()
            else:
                entries = entries.entries()
        count = len(entries) if columns is None else len(columns.data)
        if count > MAX_BATCH_ENTRIES:
            raise InvalidArgument.field("messages", f"holds more than {MAX_BATCH_ENTRIES} entries")
        route = await self.route(product, env, event)
        adapter = self.adapter(route)
        trace = outgoing_trace_context()
        if columns is not None:
            return await self._publish_plain(route, adapter, columns, trace, give_up)
        # Everything below runs for every message, so most messages (no attributes, no idempotency key, within the
        # limits: nothing `_check` could refuse) become their event in this one loop, unpacked in one step, with
        # what the messages of a publish share (source, type, time, trace context, the random read of their ids)
        # looked up once. The others go the whole way: their error kept, their fields checked (the field names
        # spelled only for them), a keyed message published on its own.
        source, type_, now = route.source, route.topic.name, datetime.now(UTC)
        traceparent, tracestate = trace.get("traceparent", ""), trace.get("tracestate", "")
        ids = self._new_id_list(count)
        max_bytes = self._max_bytes
        new_event = object.__new__
        messages: list[OutgoingEvent] = []
        append = messages.append
        others: dict[int, str | ProcessorError] = {}  # the outcomes of entries not published with the others
        for index, outgoing in enumerate(entries):
            if type(outgoing) is OutgoingMessage:
                data, content_type, attributes, ordering_key, key, json_payload = outgoing
                if not attributes and not key and len(data) <= max_bytes and len(ordering_key) <= MAX_ORDERING_KEY:
                    # Every field set here, in the loop, rather than by the dataclass's `__init__`: a call of
                    # Python code a message (3.8k instructions a message against 5.0k).
                    made = new_event(OutgoingEvent)
                    made.id = ids[index]
                    made.source = source
                    made.type = type_
                    made.time = now
                    made.data = data
                    made.content_type = content_type or DEFAULT_CONTENT_TYPE
                    made.attributes = NO_ATTRIBUTES
                    made.ordering_key = ordering_key
                    made.traceparent = traceparent
                    made.tracestate = tracestate
                    made.json_payload = json_payload
                    append(made)
                    continue
            if isinstance(outgoing, ProcessorError):
                others[index] = outgoing
                continue
            try:
                self._check(outgoing, f"messages[{index}]")
            except ProcessorError as exc:
                others[index] = exc
                continue
            if outgoing.idempotency_key:
                try:
                    others[index] = await self._publish_once(route, adapter, outgoing, trace, give_up)
                except ProcessorError as exc:
                    others[index] = exc
                continue
            append(_events(route, [outgoing], trace, [ids[index]], now)[0])
        outcomes: list[str | ProcessorError] = []
        if messages:
            try:
                failures = await self._send(
                    route,
                    adapter.publish_batch(route.topic.name, messages),
                    give_up - time.monotonic(),
                    keyed=False,
                )
            except BrokerUnavailable as exc:
                failures = dict.fromkeys(range(len(messages)), exc)
            if not others and not failures:
                return ids  # every entry plain and stored (most batches): each one's id is the one drawn for it
            outcomes = [failures.get(index, message.id) for index, message in enumerate(messages)]
        if not others:
            return outcomes
        # Put the plain messages' outcomes back between the others, in the entries' order.
        plain = iter(outcomes)
        return [others[index] if index in others else next(plain) for index in range(count)]

    async def _publish_plain(
        self, route: Route, adapter: BrokerAdapter, plain: PlainMessages, trace: Mapping[str, str], give_up: float
    ) -> Sequence[str | ProcessorError]:
        """`publish_batch` of plain messages within the limits, handed on as columns (`PlainEvents`)."""
        data, content_types = plain
        count = len(data)
        ids = self._new_id_list(count)
        if "" in content_types:  # a scan in C; a new list only when a message has no content type
            content_types = [content_type or DEFAULT_CONTENT_TYPE for content_type in content_types]
        shared = (route.source, route.topic.name, datetime.now(UTC))
        events = PlainEvents(
            ids, *shared, data, content_types, trace.get("traceparent", ""), trace.get("tracestate", "")
        )
        try:
            failures = await self._send(
                route, adapter.publish_plain(route.topic.name, events), give_up - time.monotonic(), keyed=False
            )
        except BrokerUnavailable as exc:
            return [exc] * count
        if not failures:
            return ids  # every message stored (most batches): each one's id is the one drawn for it
        return [failures.get(index, message_id) for index, message_id in enumerate(ids)]

    # -- subscribing --------------------------------------------------------------------------------------------

    async def subscribe(
        self, product: str, env: str, event: str, group: str, limits: Limits, dead_letter_event: str
    ) -> SubscribeStream:
        """Open one Subscribe stream (its subscription engine joined `group`); `run` it to serve it."""
        if self._closing.is_set():
            raise StreamClosing("the server is shutting down; reconnect to another replica")
        route = await self.route(product, env, event, "init.event")
        dead_letter = None
        if dead_letter_event:
            dead_route = await self.route(product, env, dead_letter_event, "init.dead_letter_event")
            dead_adapter = self.adapter(dead_route)

            async def dead_letter(message: IncomingEvent, reason: str) -> None:
                attributes = {
                    **message.attributes,
                    "dead_letter_from": event,
                    "dead_letter_reason": reason,
                    "delivery_attempt": str(message.delivery_attempt),
                }
                await dead_adapter.publish(
                    dead_route.topic.name, OutgoingEvent(**carried(message), attributes=attributes)
                )

        adapter = self.adapter(route)
        broker_subscription = await adapter.subscribe(
            route.topic.name,
            group,
            SubscribeOptions(prefetch=limits.max_in_flight, ack_deadline_s=limits.ack_deadline_s),
        )
        subscription = Subscription(broker_subscription, limits, dead_letter)
        self._subscriptions.add(subscription)
        return SubscribeStream(subscription, self._closing, self._subscriptions.discard)

    async def shutdown_streams(self) -> None:
        """End every stream (they answer UNAVAILABLE), giving their unacked messages back."""
        self._closing.set()
        await asyncio.gather(*(subscription.close() for subscription in list(self._subscriptions)))

    async def close(self) -> None:
        """Close every adapter."""
        await self.shutdown_streams()
        await self._adapters.close()


def _nothing_to_check(outgoing: OutgoingMessage, max_bytes: int) -> bool:
    """Nothing in the message that `_check` could refuse: most messages (no attributes, no idempotency key)."""
    return (
        not outgoing.attributes
        and not outgoing.idempotency_key
        and len(outgoing.data) <= max_bytes
        and len(outgoing.ordering_key) <= MAX_ORDERING_KEY
    )


def _new_ids(count: int) -> list[str]:
    """`count` new message ids (ID_BYTES random bytes each, in hex) from one read of the system's random source."""
    width = ID_BYTES * 2
    drawn = os.urandom(ID_BYTES * count).hex()
    return [drawn[start : start + width] for start in range(0, len(drawn), width)]


def _events(
    route: Route,
    messages: Sequence[OutgoingMessage],
    trace: Mapping[str, str],
    ids: Sequence[str],
    now: datetime | None = None,
) -> list[OutgoingEvent]:
    """The CloudEvents of messages published in one call: they share the source, the type, the time (the call's)
    and the trace context. Built positionally, in OutgoingEvent's field order."""
    source, type_, now = route.source, route.topic.name, now or datetime.now(UTC)
    traceparent, tracestate = trace.get("traceparent", ""), trace.get("tracestate", "")
    return [
        OutgoingEvent(
            message_id,
            source,
            type_,
            now,
            outgoing.data,
            outgoing.content_type or DEFAULT_CONTENT_TYPE,
            dict(outgoing.attributes) if outgoing.attributes else NO_ATTRIBUTES,
            outgoing.ordering_key,
            traceparent,
            tracestate,
            outgoing.json_payload,
        )
        for outgoing, message_id in zip(messages, ids, strict=True)
    ]


def _open(ref: EnvironmentRef, settings: BrokerEnv) -> BrokerAdapter:
    broker_type = BROKER_TYPES.get(settings.type)
    if broker_type is None:
        raise FailedPrecondition(
            f"broker type {settings.type!r} is not available on this processor",
            reason=Reason.BROKER_TYPE_UNAVAILABLE,
            metadata={"broker": ref.tag, "type": settings.type},
        )
    return broker_type.open(settings, ref.name)
