"""The buffer between a driver's delivery callback and `fetch`, with the handles of what was handed out.

A push driver (aio-pika's consumer, the NATS inbox of a pull request) calls `put` from its callback; `fetch` waits
for something to arrive and hands messages out, each under a new handle, holding them until ack, nack or close.
A message kept in `ready` is lost by nothing: a cancelled fetch leaves it for the next one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ductape_processor.adapters.brokers.base import BrokerSubscription
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.policies.caches import BoundedCache

M = TypeVar("M")

UNSEEN_REMEMBERED = 100_000  # messages whose unseen returns one adapter remembers (least recently touched go first)


class DeliveryBuffer(Generic[M]):
    """Delivered messages waiting for a fetch (`ready`) and those handed out, by handle (`held`)."""

    __slots__ = ("_arrived", "_handles", "held", "ready")

    def __init__(self) -> None:
        self.ready: deque[M] = deque()
        self.held: dict[str, M] = {}
        self._arrived = asyncio.Event()
        self._handles = itertools.count(1)

    def put(self, message: M) -> None:
        """A delivery from the driver's callback."""
        self.ready.append(message)
        self._arrived.set()

    def wake(self) -> None:
        """End the current `wait` without a message (the subscription closes, a request ended)."""
        self._arrived.set()

    async def wait(self, seconds: float) -> bool:
        """Wait until something arrives or `wake` is called, at most `seconds`; False when the time ran out."""
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._arrived.wait()
                return True
        return False

    def hand_out(self, count: int, read: Callable[[str, M], IncomingEvent | None]) -> list[IncomingEvent]:
        """Up to `count` ready messages, each read under a new handle and held until `settle`. A message `read`
        answers None for is dropped (the broker delivers it again, or it cannot be acked at all)."""
        taken: list[IncomingEvent] = []
        while self.ready and len(taken) < count:
            message = self.ready.popleft()
            handle = str(next(self._handles))
            incoming = read(handle, message)
            if incoming is not None:
                self.held[handle] = message
                taken.append(incoming)
        return taken

    def settle(self, handle: str) -> M | None:
        """The held message of `handle`, no longer held; None for a handle that is unknown or settled already."""
        return self.held.pop(handle, None)

    def drain(self) -> list[M]:
        """Everything held and ready, forgotten: what a closing subscription gives back."""
        leftovers = [*self.held.values(), *self.ready]
        self.held.clear()
        self.ready.clear()
        return leftovers


class BufferedSubscription(BrokerSubscription, Generic[M]):
    """A subscription whose driver pushes deliveries into a `DeliveryBuffer`. Closing wakes a waiting fetch, has
    the adapter forget the subscription, then lets the broker-side consumer go (`_give_back`)."""

    def __init__(self, forget: Callable[[BrokerSubscription], None]) -> None:
        self._buffer = DeliveryBuffer[M]()
        self._closed = False
        self._forget = forget

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.wake()
        self._forget(self)
        await self._give_back()

    @abc.abstractmethod
    async def _give_back(self) -> None:
        """Stop the broker-side consumer and return to the group what this subscription still holds."""


class UnseenReturns:
    """The returns a processor made of messages no client had seen, for brokers that count every return as a
    delivery (RabbitMQ's x-delivery-count; the NATS adapter keeps a fuller record, `nats_deliveries.Deliveries`).

    A message fetched into the processor and given back before any stream wrote it (the stream ended or was held
    first) costs nothing on memory and Redis; on these brokers the broker counts it. The adapter notes each such
    return under the message's broker-side key and subtracts them from the count when the message comes back to
    this processor, so `delivery_attempt` (and the dead-letter decision on it) counts only deliveries to clients.
    One adapter's memory: a message that comes back through another processor replica, or after this one
    restarted or forgot it (bounded to UNSEEN_REMEMBERED messages), still carries the broker's count.
    """

    __slots__ = ("_counts",)

    def __init__(self, size: int = UNSEEN_REMEMBERED) -> None:
        self._counts = BoundedCache[Hashable, int](size)

    def __bool__(self) -> bool:
        return len(self._counts) > 0

    def returned(self, key: Hashable) -> None:
        """A message no client saw went back to the broker (which counts one delivery more)."""
        self._counts.put(key, (self._counts.get(key) or 0) + 1)

    def attempt(self, key: Hashable, counted: int) -> int:
        """The delivery attempt to report for a message the broker counted `counted` deliveries of."""
        returned = self._counts.get(key) if self._counts else None
        return max(counted - returned, 1) if returned else counted

    def settled(self, key: Hashable) -> None:
        """The message was acked (or dead-lettered): nothing to remember."""
        if self._counts:
            self._counts.pop(key)
