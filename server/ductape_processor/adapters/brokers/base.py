"""The interface every message-broker adapter implements.

An adapter is one connection (pool) to one broker environment. It publishes CloudEvents-shaped messages (their types
are the runtime's, in runtime/brokers/messages.py) and opens pull subscriptions: the subscription engine
(runtime/brokers/subscriptions.py) asks for up to N messages at a time, and acks or nacks them by the `handle` the
adapter gave. Redelivery counting (`delivery_attempt`) is the adapter's job; credit, batching, ack deadlines and
dead-lettering are the engine's, written once for every broker.

Adding a broker (Kafka, SQS, ...) is one module that subclasses `BrokerAdapter` and `BrokerSubscription`, plus
one entry in `registry.BROKER_TYPES` (its manifest type name, typed settings model and factory).
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass

from ductape_processor.errors import ProcessorError, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent, PlainEvents

CONCURRENT_PUBLISHES = 256
"""Writes of one publish_batch awaiting their confirmation at once."""


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """What the engine asks of a broker-side consumer."""

    prefetch: int
    ack_deadline_s: float


class BrokerUnavailable(Unavailable, reason=Reason.BROKER_UNAVAILABLE):
    """The broker cannot be reached (after reconnect attempts) or refused the operation."""


class BrokerSubscription(abc.ABC):
    """One consumer of one group on one topic. Messages not acked before `close` are delivered again (to the group)."""

    @abc.abstractmethod
    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        """Up to `max_messages` messages, waiting at most `timeout_s` for the first one; [] when none came.

        A message's `handle` is not that of an earlier delivery by this subscription, but for one given back with
        `release` (which no client saw): the engine sends it to the client as the message's ack id, and tells late
        acks from unknown ones by it."""

    @abc.abstractmethod
    async def ack(self, handles: list[str]) -> None:
        """Done with these messages: they are not delivered again."""

    @abc.abstractmethod
    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        """Deliver these messages again (to any consumer of the group) after `delay_s`, with delivery_attempt + 1."""

    async def wait_ready(self, max_messages: int) -> None:
        """Return once `max_messages` messages are ready for a fetch that need not wait for the broker, or no more
        can come without fetching again. The engine waits this, for at most `max_wait`, to fill a batch its first
        fetch left short (see the engine's "Filling a batch"). By default it never returns: a fetch may be a round
        trip (Redis: a script and a read), so the engine waits out `max_wait` and fetches once; adapters whose
        deliveries arrive into a local buffer return as soon as the batch is there."""
        await asyncio.get_running_loop().create_future()

    async def release(self, handles: list[str]) -> None:
        """Give back messages no client has seen (fetched, never written), without counting a delivery attempt.
        Brokers that count every return (NATS, RabbitMQ) nack and subtract it on the way back (their adapters
        remember each such return)."""
        await self.nack(handles)

    async def hold(self) -> None:
        """Take nothing more for this subscription until its next fetch, so that messages given back next go to
        the group's other consumers. Pull brokers take nothing between fetches already; push brokers stop."""
        return

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the broker-side consumer: no message is taken for this subscription after it returns."""


class BrokerAdapter(abc.ABC):
    """A connection to one broker environment."""

    @abc.abstractmethod
    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        """Publish and return once the broker confirmed the write; returns the broker's id for the message."""

    async def publish_batch(self, topic: str, messages: list[OutgoingEvent]) -> dict[int, ProcessorError]:
        """Publish concurrently, at most CONCURRENT_PUBLISHES at a time (the broker confirms each write on its own),
        and one failure does not stop the others. Returns the failures by their message's position: empty when the
        broker confirmed every message (most batches: the caller then looks at no message's outcome). Adapters may
        pipeline instead."""
        gate = asyncio.Semaphore(CONCURRENT_PUBLISHES)

        async def one(message: OutgoingEvent) -> ProcessorError | None:
            async with gate:
                try:
                    await self.publish(topic, message)
                except ProcessorError as exc:
                    return exc
                return None

        outcomes = await asyncio.gather(*(one(message) for message in messages))
        return {index: outcome for index, outcome in enumerate(outcomes) if outcome is not None}

    async def publish_plain(self, topic: str, events: PlainEvents) -> dict[int, ProcessorError]:
        """`publish_batch` of `events.events()`: the same messages, written the same way, returning the same. An
        adapter that can write the columns as they are overrides this (Redis: no object made a message)."""
        return await self.publish_batch(topic, events.events())

    @abc.abstractmethod
    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        """Join consumer group `group` of `topic` (created when missing) and return a pull subscription."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections. Idempotent."""
