"""A consumer group's quorum queue on RabbitMQ: its name, the messages read from it, and one subscriber of it (a
consumer on its own channel); see `rabbitmq` for the design."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError, MessageProcessError

from ductape_processor.adapters.brokers.base import SubscribeOptions
from ductape_processor.adapters.brokers.buffer import BufferedSubscription
from ductape_processor.adapters.brokers.codec import Binding, aware, text
from ductape_processor.runtime.brokers.messages import IncomingEvent

if TYPE_CHECKING:
    from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 3.0
DELIVERY_LIMIT = 1_000_000_000
QUEUE_PREFIX = "ductape."
MAX_NAME_BYTES = 255
BINDING = Binding(prefix="cloudEvents_", ordering_key="cloudEvents_partitionkey", content_type=None)
TRANSIENT: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)
"""Failures of a connection or channel that is down (aio-pika brings it back)."""


def queue_name(topic: str, group: str) -> str:
    """The quorum queue of a consumer group: `ductape.<topic>:<group>`, cut to 255 bytes with a hash when longer."""
    name = f"{QUEUE_PREFIX}{topic}:{group}"
    encoded = name.encode()
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    head = encoded[: MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _count(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def delivery_attempt(message: AbstractIncomingMessage) -> int:
    """1 on the first delivery, then 1 + the number of earlier deliveries the queue counted."""
    headers = message.headers or {}
    earlier = max(_count(headers.get("x-delivery-count")), _count(headers.get("x-acquired-count")))
    if earlier == 0 and message.redelivered:
        earlier = 1  # a classic queue (declared outside the processor) counts nothing; it only flags redeliveries
    return earlier + 1


def _to_incoming(handle: str, message: AbstractIncomingMessage, attempt: int) -> IncomingEvent:
    stamp = message.timestamp
    return BINDING.incoming(
        {key: text(value) for key, value in (message.headers or {}).items()},
        handle=handle,
        data=message.body,
        attempt=attempt,
        default_id=message.message_id or "",
        default_type=message.type or message.routing_key or "",
        default_time=aware(stamp) if isinstance(stamp, datetime) else datetime.now(UTC),
        content_type=message.content_type or "",
    )


def _stale(message: AbstractIncomingMessage) -> bool:
    """True when the channel the message came on is gone: RabbitMQ delivers it again, its tag is void."""
    try:
        message.channel  # noqa: B018 - the property raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


class RabbitQueueSubscription(BufferedSubscription[AbstractIncomingMessage]):
    """One consumer of a group's quorum queue, on its own channel."""

    def __init__(self, adapter: RabbitMQBroker, topic: str, group: str, options: SubscribeOptions) -> None:
        super().__init__(adapter.forget)
        self._adapter = adapter
        self._topic = topic
        self._group = group
        self._prefetch = max(options.prefetch, 1)
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._tag: str | None = None
        self._delayed: dict[str, tuple[asyncio.TimerHandle, AbstractIncomingMessage]] = {}
        self._requeue: deque[AbstractIncomingMessage] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._holding = False
        self._queue_name = queue_name(topic, group)

    async def open(self) -> None:
        """Declare the exchange and the group's queue, bind them, and start consuming (one attempt)."""
        connection = await self._adapter.connection()
        channel = connection.channel(publisher_confirms=False)
        try:
            await channel.initialize()
            await channel.set_qos(prefetch_count=self._prefetch)
            exchange = await channel.declare_exchange(
                self._adapter.exchange_name(self._topic), aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                self._queue_name,
                durable=True,
                arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT},
            )
            await queue.bind(exchange, routing_key=self._topic)
            self._channel, self._queue = channel, queue
            self._tag = await queue.consume(self._deliver)
        except BaseException:
            self._channel = self._queue = None
            with contextlib.suppress(*TRANSIENT):
                if channel.is_initialized:
                    await channel.close()
            raise

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        if self._closed:
            return  # left unacked: the channel's close gives it back to the group
        self._buffer.put(message)

    async def hold(self) -> None:
        """Cancel the consumer (basic.cancel) and give back what it buffered, until the next fetch consumes again.

        Without this RabbitMQ would push the messages the engine gives back next (expired ones) straight back into
        this consumer's free prefetch room, away from the group's other consumers.
        """
        queue, tag, channel = self._queue, self._tag, self._channel
        if self._closed or self._holding or queue is None or tag is None or channel is None or channel.is_closed:
            return
        self._holding = True
        self._tag = None
        with contextlib.suppress(*TRANSIENT):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await queue.cancel(tag)
        self._note_unseen(self._buffer.ready)
        self._requeue.extend(self._buffer.ready)
        self._buffer.ready.clear()
        if self._requeue and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _resume(self) -> None:
        queue = self._queue
        if queue is None:
            return
        try:
            self._tag = await queue.consume(self._deliver)
        except TRANSIENT as exc:
            raise self._adapter.unavailable(f"consuming {self._topic!r} again", exc) from exc
        self._holding = False

    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        if self._holding and not self._closed:
            await self._resume()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        taken: list[IncomingEvent] = []
        while not self._closed:
            # A message of a channel that was lost is dropped: RabbitMQ sends it again.
            taken += self._buffer.hand_out(max_messages - len(taken), self._readable)
            if taken or max_messages <= 0:
                break
            left = until - loop.time()
            if left <= 0 or not await self._buffer.wait(left):
                break
        return taken

    async def _settle(self, message: AbstractIncomingMessage, *, requeue: bool | None) -> None:
        """ack (requeue None) or reject; a message of a lost channel is left alone: RabbitMQ redelivers it."""
        if _stale(message):
            return
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.reject(requeue=requeue)
        except MessageProcessError:
            pass
        except TRANSIENT as exc:
            log.debug("RabbitMQ: settling a message failed (%s); it will be delivered again", exc)

    def _readable(self, handle: str, message: AbstractIncomingMessage) -> IncomingEvent | None:
        if _stale(message):
            return None
        attempt = delivery_attempt(message)
        if attempt > 1 and self._adapter.unseen and message.message_id:
            attempt = self._adapter.unseen.attempt((self._queue_name, message.message_id), attempt)
        return _to_incoming(handle, message, attempt)

    def _note_unseen(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        """These go back to the queue without a client having seen them; RabbitMQ counts the return."""
        for message in messages:
            if message.message_id:
                self._adapter.unseen.returned((self._queue_name, message.message_id))

    async def ack(self, handles: list[str]) -> None:
        for handle in handles:
            message = self._buffer.settle(handle)
            if message is not None:
                if self._adapter.unseen and message.message_id:
                    self._adapter.unseen.settled((self._queue_name, message.message_id))
                await self._settle(message, requeue=None)

    async def release(self, handles: list[str]) -> None:
        """A nack, as RabbitMQ has no uncounted return; the adapter remembers it was one (`UnseenReturns`)."""
        self._note_unseen(message for handle in handles if (message := self._buffer.held.get(handle)) is not None)
        await self.nack(handles)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        """Requeue on the next turn of the event loop (or after `delay_s`), not inside this call.

        The engine ends a stream with nack(everything outstanding) then close(). Rejected at once, the messages
        would come straight back into this consumer's prefetch buffer and be returned a second time by the close,
        each return adding one to their attempt count. Deferred, close() cancels the consumer first and then
        rejects them: one return, one attempt more.
        """
        loop = asyncio.get_running_loop()
        for handle in handles:
            message = self._buffer.settle(handle)
            if message is None:
                continue
            if delay_s > 0 and not self._closed:
                timer = loop.call_later(delay_s, self._delay_over, handle)
                self._delayed[handle] = (timer, message)
            else:
                self._requeue.append(message)
        if self._requeue and not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = loop.create_task(self._flush())

    def _delay_over(self, handle: str) -> None:
        entry = self._delayed.pop(handle, None)
        if entry is None or self._closed:
            return
        self._requeue.append(entry[1])
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._requeue and not self._closed:
            await self._settle(self._requeue.popleft(), requeue=True)

    async def _give_back(self) -> None:
        channel, queue, tag = self._channel, self._queue, self._tag
        self._channel = self._queue = self._tag = None
        if queue is not None and tag is not None and channel is not None and not channel.is_closed:
            with contextlib.suppress(*TRANSIENT):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await queue.cancel(tag)  # basic.cancel: nothing more is delivered to this consumer
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        for timer, message in self._delayed.values():
            timer.cancel()
            self._requeue.append(message)
        self._delayed.clear()
        while self._requeue:
            await self._settle(self._requeue.popleft(), requeue=True)
        self._note_unseen(self._buffer.ready)  # prefetched, never handed out
        self._buffer.drain()  # what is still unacked (prefetched, held) goes back to the group with the channel
        if channel is not None:
            with contextlib.suppress(*TRANSIENT):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await channel.close()  # what is still unacked (prefetched, held) goes back to the group
