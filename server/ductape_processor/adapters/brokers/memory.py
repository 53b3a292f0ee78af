"""The in-process broker: the embedded default. Nothing to install; nothing survives a restart.

Each topic keeps one queue per consumer group. A group starts with the messages published after it was created.
Consumers of a group share its queue; a message taken is in flight until acked, nacked, or its consumer closes.

Everything here runs for every message, so a batch is appended to each group's queue at once (one wake-up per
batch, not per message) and a delivery is built field by field.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from ductape_processor.adapters.brokers.base import BrokerAdapter, BrokerSubscription, SubscribeOptions
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent

_Entry = tuple[OutgoingEvent, int]  # a message and the delivery attempt its next delivery is
_new_object = object.__new__


class _Group:
    __slots__ = ("arrived", "ready")

    def __init__(self) -> None:
        self.ready: deque[_Entry] = deque()
        self.arrived = asyncio.Event()

    def put(self, message: OutgoingEvent, attempt: int, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft((message, attempt))
        else:
            self.ready.append((message, attempt))
        self.arrived.set()

    def put_new(self, messages: Iterable[OutgoingEvent]) -> None:
        self.ready.extend((message, 1) for message in messages)
        self.arrived.set()


class _Handles:
    """The broker's delivery handles: numbers in hex (`hex` is cheaper to call through `map` than `str`), never one
    twice, drawn a fetch at a time."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 1

    def take(self, count: int) -> list[str]:
        start = self._next
        self._next = start + count
        return list(map(hex, range(start, start + count)))


class MemoryBroker(BrokerAdapter):
    """Topics and groups in this process's memory."""

    def __init__(self) -> None:
        self._topics: dict[str, dict[str, _Group]] = {}
        self._handles = _Handles()

    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        for group in self._topics.get(topic, {}).values():
            group.put(message, 1)
        return message.id

    async def publish_batch(self, topic: str, messages: list[OutgoingEvent]) -> dict[int, ProcessorError]:
        for group in self._topics.get(topic, {}).values():
            group.put_new(messages)
        return {}

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        groups = self._topics.setdefault(topic, {})
        return _MemorySubscription(groups.setdefault(group, _Group()), self._handles)

    async def close(self) -> None:
        self._topics.clear()


class _MemorySubscription(BrokerSubscription):
    def __init__(self, group: _Group, handles: _Handles) -> None:
        self._group = group
        self._handles = handles
        self._held: dict[str, _Entry] = {}  # taken by this consumer, not yet acked or given back, in taking order
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
        if self._closed:
            return []
        ready = group.ready
        popleft, held = ready.popleft, self._held
        taken: list[IncomingEvent] = []
        append = taken.append
        new_event = _new_object
        for handle in self._handles.take(min(max_messages, len(ready))):
            message, attempt = entry = popleft()
            held[handle] = entry
            # Made with `object.__new__` and every field set here, as the Redis reader does (messages.IncomingEvent;
            # a test compares what this makes with the class's own `__init__`): a class call runs the dataclass's
            # Python `__init__` in a nested frame, for every delivery.
            event = new_event(IncomingEvent)
            event.id = message.id
            event.source = message.source
            event.type = message.type
            event.time = message.time
            event.data = message.data
            event.content_type = message.content_type
            event.handle = handle
            event.attributes = dict(message.attributes) if message.attributes else {}
            event.ordering_key = message.ordering_key
            event.traceparent = message.traceparent
            event.delivery_attempt = attempt
            event.tracestate = message.tracestate
            event.json_payload = message.json_payload
            append(event)
        if ready:
            group.arrived.set()  # wake another consumer of the group
        return taken

    async def wait_ready(self, max_messages: int) -> None:
        group = self._group
        while len(group.ready) < max_messages and not self._closed:
            group.arrived.clear()
            await group.arrived.wait()

    async def ack(self, handles: list[str]) -> None:
        held = self._held
        for handle in handles:
            held.pop(handle, None)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        for handle in handles:
            entry = self._held.pop(handle, None)
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
            entry = self._held.pop(handle, None)
            if entry is not None:
                self._group.put(*entry, front=True)  # nobody saw it: same attempt

    async def close(self) -> None:
        self._closed = True
        await self.nack(list(reversed(self._held)))
        self._group.arrived.set()
