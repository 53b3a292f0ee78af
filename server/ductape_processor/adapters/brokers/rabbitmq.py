"""RabbitMQ (AMQP 0-9-1) through aio-pika: topic exchanges, one durable quorum queue per consumer group.

Topology
    A topic publishes to a durable *topic* exchange with the topic name as routing key. The exchange is the
    environment's `exchange` setting; when that is empty (the default) each topic has its own exchange named like
    the topic (`orders.created` publishes to exchange `orders.created`; a topic named `amq.…` needs the setting, as
    RabbitMQ reserves those exchange names; `exchange: amq.topic` itself works). A consumer group is a durable
    quorum queue `ductape.<topic>:<group>` bound to that exchange with the topic's routing key, declared on the
    group's first subscribe, so a group holds the messages published after it was created, keeps them while no
    subscriber is connected, and survives restarts of the processor and of RabbitMQ. Topic names cannot contain
    `:`, so two (topic, group) pairs never share a queue; a name longer than RabbitMQ's 255 bytes is cut and ends
    in a hash of the whole. Consumers of one group compete on its queue; every group has its own queue and gets
    every message. Queues are never deleted by the processor: remove a group that is no longer used with
    `rabbitmqctl delete_queue`. A queue of the same name declared elsewhere with other arguments (a classic queue,
    another delivery limit) makes subscribe fail with BrokerUnavailable (PRECONDITION_FAILED).

Messages (CloudEvents 1.0, AMQP binary mode)
    data is the body and `datacontenttype` the `content_type` property. Headers carry `cloudEvents_specversion`
    ("1.0"), `cloudEvents_id`, `cloudEvents_source`, `cloudEvents_type`, `cloudEvents_time` (ISO 8601, microseconds)
    and, when set, `cloudEvents_partitionkey` (the ordering key) and `traceparent`/`tracestate` (W3C, as
    OpenTelemetry's AMQP instrumentations write them). The caller's attributes travel as `attr-<key>` headers, so
    they never collide with these. The `message_id`, `type` and `timestamp` (seconds) properties repeat id, type and
    time for AMQP tools. Messages are persistent (delivery mode 2). A message from another producer without these
    headers is still received: id from `message_id`, type from `type` or the routing key, time from `timestamp`.

Publishing
    One publisher channel per adapter with publisher confirms: `publish` returns once RabbitMQ acked the message
    (written to the quorum queues it was routed to). A `basic.nack` raises BrokerUnavailable. Messages are
    published with mandatory=False: a topic with no group yet drops them, as every broker type does. If the
    connection drops, a publish waits up to OPERATION_WAIT_S for it to come back and is sent again; a message whose
    confirm was lost with the connection may so arrive twice (at-least-once).

Subscribing, redelivery, attempts
    Each subscription has its own channel with `basic.qos(prefetch_count=options.prefetch)` and a consumer that
    fills a local buffer; `fetch` takes from it. ack is `basic.ack`; nack is `basic.reject(requeue=True)` (reject,
    not nack: from RabbitMQ 4.3 on only reject counts as a failed delivery), sent on the next turn of the event
    loop: the engine ends a stream with nack(all outstanding) then close(), and close() cancels the consumer
    before it rejects them, so they are returned once instead of coming straight back into this consumer's
    prefetch buffer and being returned again by the close. A nack with a delay keeps the message
    unacknowledged (it still counts against the prefetch) and rejects it when the delay is over; if the processor
    dies during the delay, the channel closes and RabbitMQ hands the message back at once. `delivery_attempt` is
    1 + the queue's count of earlier deliveries (`x-delivery-count`, or `x-acquired-count` on RabbitMQ 4.x when
    larger), which grows on every nack, ack-deadline expiry and consumer close. Prefetched messages that the
    engine had not yet taken when a consumer closed count too: their next attempt number is one higher although
    no client saw them. Quorum queues are declared with `x-delivery-limit` DELIVERY_LIMIT so that RabbitMQ never
    drops a message itself (4.x defaults to 20); dead-lettering after `max_deliveries` is the engine's.
    `close` cancels the consumer (`basic.cancel`) and closes the channel: RabbitMQ takes the unacknowledged
    messages back into the group and sends this subscription nothing more.

Ordering
    A quorum queue is FIFO: one consumer receives one ordering key's messages (in fact all of a group's messages)
    in publish order, when they were published one after another. Several consumers of a group each see a subset
    in order; a nacked or returned message is delivered again ahead of or after later ones, and a publish retried
    after a connection drop may land after later ones.

Connection
    One connection per adapter, opened on first use (`connect_robust`, CONNECT_TIMEOUT_S). When it drops, aio-pika
    reconnects in the background, waiting longer the longer the outage lasts (RECONNECT_MIN_S up to
    RECONNECT_MAX_S), re-declares exchanges and queues and restarts the consumers. Messages that were delivered on
    the lost channel are redelivered by RabbitMQ; their old handles are dropped from the buffer, and acking or
    nacking them is a no-op. A drop is logged once, as a warning (`... lost (reason); reconnecting`), and its
    restoration as info; what aiormq and aio-pika log as errors about a drop the robust connection handles is
    filtered out (`_HandledDriverNoise`). A broker that cannot be reached raises BrokerUnavailable; RabbitMQ's own
    `consumer_timeout` (30 min by default) must stay above the longest ack deadline (plus nack delay) used.

Checked against RabbitMQ 3.10 (quorum queues count every return in `x-delivery-count` there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    IncompatibleProtocolError,
    MessageProcessError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource
from pamqp.common import FieldTable
from yarl import URL

from ductape_processor.adapters.brokers.base import (
    BrokerAdapter,
    BrokerSubscription,
    BrokerUnavailable,
    InboundMessage,
    OutboundMessage,
    SubscribeOptions,
)
from ductape_processor.errors import ProcessorError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
OPERATION_WAIT_S = 8.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0
CLOSE_TIMEOUT_S = 3.0
DELIVERY_LIMIT = 1_000_000_000
QUEUE_PREFIX = "ductape."
ATTRIBUTE_PREFIX = "attr-"
CE = "cloudEvents_"
MAX_NAME_BYTES = 255

# Refusals that waiting will not cure: raised at once. Anything else in CONNECTION_EXCEPTIONS is a drop to wait out.
_REFUSED: tuple[type[BaseException], ...] = (
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ChannelLockedResource,
    AuthenticationError,
    ProbableAuthenticationError,
    IncompatibleProtocolError,
)
_TRANSIENT: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)

T = TypeVar("T")


class _BackoffConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, with a reconnect pause that grows with the outage instead of a fixed one."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        self._down_since: float | None = None
        super().__init__(url, loop, **kwargs)

    @property
    def reconnect_interval(self) -> float:
        """The pause before the next attempt: a quarter of the outage so far, RECONNECT_MIN_S to RECONNECT_MAX_S."""
        if self._down_since is None:
            return RECONNECT_MIN_S
        return min(max((time.monotonic() - self._down_since) / 4, RECONNECT_MIN_S), RECONNECT_MAX_S)

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        """aio-pika sets its fixed interval here; the pause is computed instead."""

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            if not self._close_called and not self.is_closed:
                why = closing.exception() if closing.done() and not closing.cancelled() else None
                log.warning("RabbitMQ connection %s lost (%s); reconnecting", self, why or "closed")
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self._down_since is not None:
            log.info("RabbitMQ connection %s restored after %.1fs", self, time.monotonic() - self._down_since)
        self._down_since = None


class _HandledDriverNoise(logging.Filter):
    """Drops what aiormq and aio-pika log, as errors, about a connection drop that the robust connection handles:
    one drop gave three ERROR records (and a traceback); `_BackoffConnection` logs it once as a warning instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "aiormq.connection":
            if message.startswith("Unexpected connection close from remote"):
                return False
            if message.startswith("Cancelling cause reader exited abnormally"):
                failure = record.exc_info[1] if record.exc_info else None
                return not isinstance(failure, aiormq.exceptions.AMQPConnectionError | ConnectionError)
        elif record.name == "aio_pika.tools" and message.startswith("Callback %r error"):
            # A robust channel's close callback failing because its connection is gone: the channel is reopened
            # with the connection.
            args = record.args if isinstance(record.args, tuple) else ()
            return not (
                len(args) >= 2
                and "RobustChannel._on_close" in repr(args[0])
                and args[1] in ("RuntimeError", "ChannelInvalidStateError")
            )
        elif record.name == "aio_pika.robust_connection" and message.startswith("Connection to %s closed."):
            return False
        return True


def _quiet_driver_logs() -> None:
    """Install `_HandledDriverNoise` on the driver's loggers (once per process)."""
    for name in ("aiormq.connection", "aio_pika.tools", "aio_pika.robust_connection"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _HandledDriverNoise) for existing in logger.filters):
            logger.addFilter(_HandledDriverNoise())


def queue_name(topic: str, group: str) -> str:
    """The quorum queue of a consumer group: `ductape.<topic>:<group>`, cut to 255 bytes with a hash when longer."""
    name = f"{QUEUE_PREFIX}{topic}:{group}"
    encoded = name.encode()
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    head = encoded[: MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return str(value)


def _count(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _to_amqp(message: OutboundMessage) -> aio_pika.Message:
    headers: dict[str, Any] = {
        f"{CE}specversion": "1.0",
        f"{CE}id": message.id,
        f"{CE}source": message.source,
        f"{CE}type": message.type,
        f"{CE}time": message.time.isoformat(),
    }
    if message.ordering_key:
        headers[f"{CE}partitionkey"] = message.ordering_key
    if message.traceparent:
        headers["traceparent"] = message.traceparent
    if message.tracestate:
        headers["tracestate"] = message.tracestate
    for key, value in message.attributes.items():
        headers[f"{ATTRIBUTE_PREFIX}{key}"] = value
    return aio_pika.Message(
        message.data,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.id,
        type=message.type,
        timestamp=message.time,
    )


def delivery_attempt(message: AbstractIncomingMessage) -> int:
    """1 on the first delivery, then 1 + the number of earlier deliveries the queue counted."""
    headers = message.headers or {}
    earlier = max(_count(headers.get("x-delivery-count")), _count(headers.get("x-acquired-count")))
    if earlier == 0 and message.redelivered:
        earlier = 1  # a classic queue (declared outside the processor) counts nothing; it only flags redeliveries
    return earlier + 1


def _time(headers: Mapping[str, Any], message: AbstractIncomingMessage) -> datetime:
    raw = headers.get(f"{CE}time")
    if raw is not None:
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(_text(raw))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(message.timestamp, datetime):
        stamp = message.timestamp
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _to_inbound(handle: str, message: AbstractIncomingMessage) -> InboundMessage:
    headers: Mapping[str, Any] = message.headers or {}
    return InboundMessage(
        handle=handle,
        id=_text(headers.get(f"{CE}id", message.message_id or "")),
        source=_text(headers.get(f"{CE}source", "")),
        type=_text(headers.get(f"{CE}type", message.type or message.routing_key or "")),
        time=_time(headers, message),
        data=message.body,
        content_type=message.content_type or "application/octet-stream",
        attributes={
            key[len(ATTRIBUTE_PREFIX) :]: _text(value)
            for key, value in headers.items()
            if key.startswith(ATTRIBUTE_PREFIX)
        },
        ordering_key=_text(headers.get(f"{CE}partitionkey", "")),
        traceparent=_text(headers.get("traceparent", "")),
        tracestate=_text(headers.get("tracestate", "")),
        delivery_attempt=delivery_attempt(message),
    )


def _stale(message: AbstractIncomingMessage) -> bool:
    """True when the channel the message came on is gone: RabbitMQ delivers it again, its tag is void."""
    try:
        message.channel  # noqa: B018 - the property raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


class RabbitMQBroker(BrokerAdapter):
    """One RabbitMQ connection (one broker environment): a publisher channel plus a channel per subscription."""

    def __init__(self, url: str, exchange: str, name: str) -> None:
        self._url = url
        self._exchange_setting = exchange
        self._name = name
        try:
            parsed = URL(url)
        except ValueError:
            # Not the parser's message: it may quote a piece of the password.
            raise BrokerUnavailable(
                f"RabbitMQ broker {name}: the URL cannot be parsed (reserved characters in a password must be "
                "percent-encoded)",
                metadata={"broker": name},
            ) from None
        self._where = f"{parsed.host or 'localhost'}:{parsed.port or 5672}"
        # As written (percent-encoded) and as sent: an exception may quote either.
        self._passwords = sorted({parsed.password or "", parsed.raw_password or ""} - {""}, key=len, reverse=True)
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self._subscriptions: set[_RabbitSubscription] = set()
        self._closed = False
        _quiet_driver_logs()

    @property
    def reconnections(self) -> int:
        """How many times the connection was restored after a drop (0 while the first one holds; for monitoring)."""
        connection = self._connection
        if not isinstance(connection, aio_pika.RobustConnection):
            return 0
        return max(connection.connection_attempt - 1, 0)

    def exchange_name(self, topic: str) -> str:
        """The exchange a topic publishes to."""
        return self._exchange_setting or topic

    def describe(self, exc: BaseException) -> str:
        """An exception as text for an error message, without the password."""
        text = str(exc) or type(exc).__name__
        for password in self._passwords:
            text = text.replace(password, "******")
        return f"{type(exc).__name__}: {text}"

    def unavailable(self, what: str, exc: BaseException | None = None) -> BrokerUnavailable:
        """The error callers see."""
        why = f": {self.describe(exc)}" if exc is not None else ""
        return BrokerUnavailable(
            f"RabbitMQ broker {self._name} at {self._where}: {what}{why}",
            metadata={"broker": self._name, "address": self._where},
        )

    # -- connection ---------------------------------------------------------------------------------------------

    async def connection(self) -> AbstractRobustConnection:
        """The adapter's connection, opened on first use; aio-pika keeps it up afterwards."""
        if self._closed:
            raise self.unavailable("the adapter is closed (the processor is shutting down)")
        connection = self._connection
        if connection is not None and not connection.is_closed:
            return connection
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                return connection
            self._publisher = None
            self._exchanges.clear()
            properties: FieldTable | None = None
            if "name" not in URL(self._url).query:  # `?name=` in the URL names the connection instead
                properties = {"connection_name": f"ductape-processor {self._name}"}
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
                    connection = await aio_pika.connect_robust(
                        self._url,
                        connection_class=_BackoffConnection,
                        timeout=CONNECT_TIMEOUT_S,
                        client_properties=properties,
                    )
            except _TRANSIENT as exc:
                raise self.unavailable("cannot connect", exc) from None
            self._connection = connection
            return connection

    async def retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`; while the connection is being restored, try again for up to OPERATION_WAIT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPERATION_WAIT_S
        pause = 0.05
        while True:
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.05)):
                    return await operation()
            except ProcessorError:
                raise
            except DeliveryError as exc:
                raise self.unavailable(f"{what} was refused (basic.nack)", exc) from None
            except _REFUSED as exc:
                raise self.unavailable(f"{what} was refused", exc) from None
            except _TRANSIENT as exc:
                if isinstance(exc, ChannelNotFoundEntity):
                    self._exchanges.clear()  # deleted behind our back: declare again
                if loop.time() + pause >= deadline:
                    if isinstance(exc, RuntimeError | TimeoutError):  # a channel or connection that is not back yet
                        raise self.unavailable(
                            f"{what} failed: the connection is down and did not come back within {OPERATION_WAIT_S:g}s"
                        ) from None
                    raise self.unavailable(f"{what} failed after {OPERATION_WAIT_S:g}s of retrying", exc) from None
                log.debug("RabbitMQ %s: %s failed (%s); retrying", self._name, what, self.describe(exc))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    # -- publishing ---------------------------------------------------------------------------------------------

    async def _exchange(self, topic: str) -> AbstractExchange:
        name = self.exchange_name(topic)
        exchange = self._exchanges.get(name)
        if exchange is not None:
            return exchange  # while the connection is down its channel raises, and `retrying` waits
        connection = await self.connection()
        async with self._lock:
            if self._publisher is None:  # one per connection: aio-pika reopens it after drops and channel errors
                channel = connection.channel(publisher_confirms=True)
                await channel.initialize()
                self._publisher = channel
            exchange = self._exchanges.get(name)
            if exchange is None:
                exchange = await self._publisher.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
                self._exchanges[name] = exchange
            return exchange

    async def _publish_once(self, topic: str, message: aio_pika.Message) -> None:
        exchange = await self._exchange(topic)
        await exchange.publish(message, routing_key=topic, mandatory=False)

    async def publish(self, topic: str, message: OutboundMessage) -> str:
        amqp = _to_amqp(message)
        await self.retrying(f"publish to {topic!r}", lambda: self._publish_once(topic, amqp))
        return message.id

    async def publish_batch(self, topic: str, messages: list[OutboundMessage]) -> list[str | ProcessorError]:
        """Pipelined: every message is sent before the first confirm is awaited (sent in list order)."""

        async def one(message: OutboundMessage) -> str | ProcessorError:
            try:
                return await self.publish(topic, message)
            except ProcessorError as exc:
                return exc

        return list(await asyncio.gather(*(one(message) for message in messages)))

    # -- subscribing --------------------------------------------------------------------------------------------

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        subscription = _RabbitSubscription(self, topic, group, options)
        await self.retrying(f"subscribe to {topic!r} as group {group!r}", subscription.open)
        self._subscriptions.add(subscription)
        return subscription

    def forget(self, subscription: _RabbitSubscription) -> None:
        """A subscription closed."""
        self._subscriptions.discard(subscription)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        connection, self._connection, self._publisher = self._connection, None, None
        self._exchanges.clear()
        if connection is not None:
            with contextlib.suppress(*_TRANSIENT):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()


class _RabbitSubscription(BrokerSubscription):
    def __init__(self, adapter: RabbitMQBroker, topic: str, group: str, options: SubscribeOptions) -> None:
        self._adapter = adapter
        self._topic = topic
        self._group = group
        self._prefetch = max(options.prefetch, 1)
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._tag: str | None = None
        self._buffer: deque[AbstractIncomingMessage] = deque()
        self._arrived = asyncio.Event()
        self._held: dict[str, AbstractIncomingMessage] = {}
        self._delayed: dict[str, tuple[asyncio.TimerHandle, AbstractIncomingMessage]] = {}
        self._requeue: deque[AbstractIncomingMessage] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._handles = itertools.count(1)
        self._holding = False
        self._closed = False

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
                queue_name(self._topic, self._group),
                durable=True,
                arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT},
            )
            await queue.bind(exchange, routing_key=self._topic)
            self._channel, self._queue = channel, queue
            self._tag = await queue.consume(self._deliver)
        except BaseException:
            self._channel = self._queue = None
            with contextlib.suppress(*_TRANSIENT):
                if channel.is_initialized:
                    await channel.close()
            raise

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        if self._closed:
            return  # left unacked: the channel's close gives it back to the group
        self._buffer.append(message)
        self._arrived.set()

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
        with contextlib.suppress(*_TRANSIENT):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await queue.cancel(tag)
        self._requeue.extend(self._buffer)
        self._buffer.clear()
        if self._requeue and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _resume(self) -> None:
        queue = self._queue
        if queue is None:
            return
        try:
            self._tag = await queue.consume(self._deliver)
        except _TRANSIENT as exc:
            raise self._adapter.unavailable(f"consuming {self._topic!r} again", exc) from exc
        self._holding = False

    async def fetch(self, max_messages: int, timeout_s: float) -> list[InboundMessage]:
        if self._holding and not self._closed:
            await self._resume()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        taken: list[InboundMessage] = []
        while not self._closed:
            while self._buffer and len(taken) < max_messages:
                message = self._buffer.popleft()
                if _stale(message):
                    continue  # delivered on a channel that was lost; RabbitMQ sends it again
                handle = str(next(self._handles))
                self._held[handle] = message
                taken.append(_to_inbound(handle, message))
            if taken or max_messages <= 0:
                break
            left = until - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
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
        except _TRANSIENT as exc:
            log.debug("RabbitMQ: settling a message failed (%s); it will be delivered again", exc)

    async def ack(self, handles: list[str]) -> None:
        for handle in handles:
            message = self._held.pop(handle, None)
            if message is not None:
                await self._settle(message, requeue=None)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        """Requeue on the next turn of the event loop (or after `delay_s`), not inside this call.

        The engine ends a stream with nack(everything outstanding) then close(). Rejected at once, the messages
        would come straight back into this consumer's prefetch buffer and be returned a second time by the close,
        each return adding one to their attempt count. Deferred, close() cancels the consumer first and then
        rejects them: one return, one attempt more.
        """
        loop = asyncio.get_running_loop()
        for handle in handles:
            message = self._held.pop(handle, None)
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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        self._adapter.forget(self)
        channel, queue, tag = self._channel, self._queue, self._tag
        self._channel = self._queue = self._tag = None
        if queue is not None and tag is not None and channel is not None and not channel.is_closed:
            with contextlib.suppress(*_TRANSIENT):
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
        self._buffer.clear()
        self._held.clear()
        if channel is not None:
            with contextlib.suppress(*_TRANSIENT):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await channel.close()  # what is still unacked (prefetched, held) goes back to the group
