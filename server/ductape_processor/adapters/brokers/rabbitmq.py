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
    larger), which grows on every nack, ack-deadline expiry and consumer close, minus the returns this adapter
    made of messages no client saw (released by the engine, prefetched but not taken at a hold or close;
    `buffer.UnseenReturns`). Quorum queues are declared with `x-delivery-limit` DELIVERY_LIMIT so that RabbitMQ never
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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AuthenticationError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    IncompatibleProtocolError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource
from pamqp.common import FieldTable
from yarl import URL

from ductape_processor.adapters.brokers.base import (
    BrokerAdapter,
    BrokerSubscription,
    BrokerUnavailable,
    SubscribeOptions,
)
from ductape_processor.adapters.brokers.buffer import UnseenReturns
from ductape_processor.adapters.brokers.connection import Endpoint, LazyConnection
from ductape_processor.adapters.brokers.rabbitmq_queue import (
    BINDING,
    CLOSE_TIMEOUT_S,
    TRANSIENT,
    RabbitQueueSubscription,
)
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.brokers.messages import OutgoingEvent
from ductape_processor.runtime.policies import Backoff, Deadline, RetryBudget

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
OPERATION_WAIT_S = 8.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0
RETRY_BACKOFF = Backoff(0.05, 0.25, jitter=False)

# Refusals that waiting will not cure: raised at once. Anything else in CONNECTION_EXCEPTIONS is a drop to wait out.
_REFUSED: tuple[type[BaseException], ...] = (
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ChannelLockedResource,
    AuthenticationError,
    ProbableAuthenticationError,
    IncompatibleProtocolError,
)

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


def _to_amqp(message: OutgoingEvent) -> aio_pika.Message:
    return aio_pika.Message(
        message.data,
        headers=dict(BINDING.headers(message)),
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.id,
        type=message.type,
        timestamp=message.time,
    )


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
        where = f"{parsed.host or 'localhost'}:{parsed.port or 5672}"
        self.endpoint = Endpoint(f"RabbitMQ broker {name} at {where}", url, {"broker": name, "address": where})
        self._connection = LazyConnection(self._connect, lambda connection: not connection.is_closed)
        self._publisher: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self._subscriptions: set[BrokerSubscription] = set()
        self.unseen = UnseenReturns()  # returns of messages no client saw, which the queue counts (see `buffer`)
        self._closed = False
        _quiet_driver_logs()

    @property
    def reconnections(self) -> int:
        """How many times the connection was restored after a drop (0 while the first one holds; for monitoring)."""
        connection = self._connection.current
        if not isinstance(connection, aio_pika.RobustConnection):
            return 0
        return max(connection.connection_attempt - 1, 0)

    def exchange_name(self, topic: str) -> str:
        """The exchange a topic publishes to."""
        return self._exchange_setting or topic

    def unavailable(self, what: str, exc: BaseException | None = None) -> BrokerUnavailable:
        """The error callers see."""
        return self.endpoint.unavailable(what, exc)

    # -- connection ---------------------------------------------------------------------------------------------

    async def connection(self) -> AbstractRobustConnection:
        """The adapter's connection, opened on first use; aio-pika keeps it up afterwards."""
        if self._closed:
            raise self.unavailable("the adapter is closed (the processor is shutting down)")
        return await self._connection.get()

    async def _connect(self) -> AbstractRobustConnection:
        self._publisher = None
        self._exchanges.clear()
        properties: FieldTable | None = None
        if "name" not in URL(self._url).query:  # `?name=` in the URL names the connection instead
            properties = {"connection_name": f"ductape-processor {self._name}"}
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + 1):
                return await aio_pika.connect_robust(
                    self._url,
                    connection_class=_BackoffConnection,
                    timeout=CONNECT_TIMEOUT_S,
                    client_properties=properties,
                )
        except TRANSIENT as exc:
            raise self.unavailable("cannot connect", exc) from None

    async def retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`; while the connection is being restored, try again for up to OPERATION_WAIT_S."""
        deadline = Deadline(OPERATION_WAIT_S)
        budget = RetryBudget(RETRY_BACKOFF, deadline)
        while True:
            try:
                async with asyncio.timeout(max(deadline.bound(OPERATION_WAIT_S), 0.05)):
                    return await operation()
            except ProcessorError:
                raise
            except DeliveryError as exc:
                raise self.unavailable(f"{what} was refused (basic.nack)", exc) from None
            except _REFUSED as exc:
                raise self.unavailable(f"{what} was refused", exc) from None
            except TRANSIENT as exc:
                if isinstance(exc, ChannelNotFoundEntity):
                    self._exchanges.clear()  # deleted behind our back: declare again
                if not await budget.pause():
                    if isinstance(exc, RuntimeError | TimeoutError):  # a channel or connection that is not back yet
                        raise self.unavailable(
                            f"{what} failed: the connection is down and did not come back within {OPERATION_WAIT_S:g}s"
                        ) from None
                    raise self.unavailable(f"{what} failed after {OPERATION_WAIT_S:g}s of retrying", exc) from None
                log.debug("RabbitMQ %s: %s failed (%s); retrying", self._name, what, self.endpoint.describe(exc))

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

    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        amqp = _to_amqp(message)
        await self.retrying(f"publish to {topic!r}", lambda: self._publish_once(topic, amqp))
        return message.id

    # -- subscribing --------------------------------------------------------------------------------------------

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        subscription = RabbitQueueSubscription(self, topic, group, options)
        await self.retrying(f"subscribe to {topic!r} as group {group!r}", subscription.open)
        self._subscriptions.add(subscription)
        return subscription

    def forget(self, subscription: BrokerSubscription) -> None:
        """A subscription closed."""
        self._subscriptions.discard(subscription)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        connection, self._publisher = self._connection.take(), None
        self._exchanges.clear()
        if connection is not None:
            with contextlib.suppress(*TRANSIENT):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()
