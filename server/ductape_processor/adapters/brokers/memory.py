"""The in-process broker: the embedded default. Nothing to install; nothing survives a restart.

Each topic keeps one queue per consumer group. A group starts with the messages published after it was created.
Consumers of a group share its queue; a message taken is in flight until acked, nacked, or its consumer closes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from ductape_processor.adapters.brokers.base import BrokerAdapter, BrokerSubscription, SubscribeOptions
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent


@dataclass(slots=True)
class _Group:
    ready: deque[tuple[OutgoingEvent, int]] = field(default_factory=deque)
    inflight: dict[str, tuple[OutgoingEvent, int]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, message: OutgoingEvent, attempt: int, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft((message, attempt))
        else:
            self.ready.append((message, attempt))
        self.arrived.set()


class MemoryBroker(BrokerAdapter):
    """Topics and groups in this process's memory."""

    def __init__(self) -> None:
        self._topics: dict[str, dict[str, _Group]] = {}
        self._handles = itertools.count(1)

    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        for group in self._topics.get(topic, {}).values():
            group.put(message, 1)
        return message.id

    async def publish_batch(self, topic: str, messages: list[OutgoingEvent]) -> list[str | ProcessorError]:
        return [await self.publish(topic, message) for message in messages]  # nothing to wait for: no concurrency

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        groups = self._topics.setdefault(topic, {})
        return _MemorySubscription(groups.setdefault(group, _Group()), self._handles)

    async def close(self) -> None:
        self._topics.clear()


class _MemorySubscription(BrokerSubscription):
    def __init__(self, group: _Group, handles: itertools.count[int]) -> None:
        self._group = group
        self._handles = handles
        self._mine: set[str] = set()
        self._closed = False
        self._timers: set[asyncio.TimerHandle] = set()

    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        group = self._group
        if not group.ready:
            group.arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    while not group.ready and not self._closed:
                        await group.arrived.wait()
                        group.arrived.clear()
            except TimeoutError:
                return []
        taken: list[IncomingEvent] = []
        while group.ready and len(taken) < max_messages and not self._closed:
            message, attempt = group.ready.popleft()
            handle = str(next(self._handles))
            group.inflight[handle] = (message, attempt)
            self._mine.add(handle)
            taken.append(_incoming(handle, message, attempt))
        if group.ready:
            group.arrived.set()  # wake another consumer of the group
        return taken

    async def ack(self, handles: list[str]) -> None:
        for handle in handles:
            if handle in self._mine:
                self._mine.discard(handle)
                self._group.inflight.pop(handle, None)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        for handle in handles:
            if handle not in self._mine:
                continue
            self._mine.discard(handle)
            entry = self._group.inflight.pop(handle, None)
            if entry is None:
                continue
            message, attempt = entry
            if delay_s > 0:
                timer = asyncio.get_running_loop().call_later(delay_s, self._group.put, message, attempt + 1)
                self._timers.add(timer)
            else:
                self._group.put(message, attempt + 1, front=True)

    async def release(self, handles: list[str]) -> None:
        for handle in reversed(handles):
            if handle not in self._mine:
                continue
            self._mine.discard(handle)
            entry = self._group.inflight.pop(handle, None)
            if entry is not None:
                self._group.put(*entry, front=True)  # nobody saw it: same attempt

    async def close(self) -> None:
        self._closed = True
        await self.nack(sorted(self._mine, key=int, reverse=True))
        self._group.arrived.set()


def _incoming(handle: str, message: OutgoingEvent, attempt: int) -> IncomingEvent:
    # What `carried` keeps, named here rather than through its dict: this runs for every message delivered.
    return IncomingEvent(
        id=message.id,
        source=message.source,
        type=message.type,
        time=message.time,
        data=message.data,
        content_type=message.content_type,
        ordering_key=message.ordering_key,
        traceparent=message.traceparent,
        tracestate=message.tracestate,
        handle=handle,
        attributes=dict(message.attributes),
        delivery_attempt=attempt,
    )
