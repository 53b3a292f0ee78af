"""NATS JetStream: one stream per broker environment, one durable pull consumer per (topic, group).

Settings (manifest `NatsBrokerEnv`): `url` (`nats://` or `tls://`, credentials in the URL) and `stream`, the
JetStream stream that holds this environment's topics. When `stream` is absent the stream is `ductape`
(`DEFAULT_STREAM`): the factory only sees the environment's settings, and one shared stream per server keeps two
products that name the same topic from claiming overlapping subjects (which JetStream refuses).

Topics and the stream
    A topic's NATS subject is the topic name. On first use the stream is created (file storage, limits retention,
    no limits set: an operator sets max_age / max_bytes with the `nats` CLI, and later updates keep them) or updated
    to add the subject. Messages are never removed by consumption.

Publishing
    A PUB with `Nats-Expected-Stream` = the stream and `Nats-Msg-Id` = `<topic>:<CloudEvents id>`, so JetStream
    drops a re-sent copy inside its duplicate window (2 min by default); the topic is part of the key because the
    window is per stream and a dead-lettered copy keeps its id while moving to another topic. The PubAck is the
    confirmation; the returned broker id is `<stream>:<sequence>`. Each PUB has a reply subject of its own under one
    inbox subscription of the connection, and its PubAck resolves a future (`nats_publish.PubAcks`: what nats-py's
    `js.publish_async` does, for less CPU), where `js.publish` makes each a request of its own (a new reply inbox, a
    response map entry, `wait_for`); a batch writes all its messages before waiting for any PubAck, in order, so
    JetStream stores them in publish order. A publish that gets no PubAck
    (connection dropped, JetStream electing a leader) is re-sent with the same id until `PUBLISH_DEADLINE_S`,
    then fails with BrokerUnavailable; the PubAcks awaited when the connection comes back are given up at once (a
    PUB written before a drop never gets one) and re-sent. The runtime cuts the whole publish (connecting and
    preparing the stream included) at the caller's deadline or its own limit, whichever is first. A publish with an
    idempotency key carries the same CloudEvents id on every attempt, so the server also drops a copy re-sent by a
    later call.

Headers (CloudEvents 1.0, binary content mode of the NATS binding as the CloudEvents Go SDK writes it)
    ce-specversion "1.0", ce-id, ce-source, ce-type, ce-time (ISO 8601, UTC) and `content-type` (datacontenttype);
    the ordering key travels as the extension ce-orderingkey, W3C trace context as `traceparent` and `tracestate`,
    and each of the caller's attributes as `attr-<key>` (keys keep their case; no `ce-`/`attr-` clash is
    possible). Every value is
    percent-encoded as the CloudEvents HTTP binding prescribes (space, '"', '%' and anything outside printable
    ASCII), so a value holding CR/LF cannot forge a header; receiving decodes them back exactly. Messages that
    did not come from a processor get defaults: id = Nats-Msg-Id or `<stream>:<seq>`, type = the subject,
    time = the stream timestamp.

Groups
    A group is a durable pull consumer named `<group>__<topic>_<hash>` (characters other than letters, digits,
    '_' and '-' become '_'; the hash of the exact topic and group keeps distinct groups distinct), filter subject =
    the topic, deliver policy `new` (a group starts after its creation), explicit acks, max_deliver -1 (the
    engine dead-letters), max_ack_pending `MAX_ACK_PENDING`. `ack_wait` is the engine's ack deadline plus
    max(`ACK_WAIT_MARGIN_S`, 20 %): the engine gives messages back itself when its deadline passes, so
    JetStream's ack_wait is only the backstop for a processor that died holding messages; it is raised (never
    lowered) when a subscriber asks for a longer deadline. The consumer outlives every subscriber, so the group
    keeps collecting messages while nobody is connected and a restarted processor resumes it.

Subscriptions, redelivery and close
    Each subscription is one inbox subscription that receives the answers to its own pull requests
    (`$JS.API.CONSUMER.MSG.NEXT`, each answered on its own subject under the inbox, so the late end of an earlier
    request is never taken for the end of the open one), one request open at a time, for at most n messages and at most
    `PULL_EXPIRES_MAX_S`: what the broker hands out never exceeds what the engine asked for (its credit), and the
    messages land in a local queue from the subscription callback, so a cancelled fetch loses nothing.
    `delivery_attempt` and copies not to hand out again come from the adapter's own record of each message
    (`nats_deliveries.Deliveries`): on a server that loses redeliveries (before 2.10.16: it counts one it sends
    nowhere, and may hand the newest message out again with num_delivered 1) it is the deliveries this processor
    made to clients, plus one; on a fixed server, JetStream's `num_delivered` minus the returns this adapter made of
    that message without a client having seen it (released by the engine, fetched but not handed out at close),
    since JetStream counts those too. A copy of a message acked here is acked again and dropped; a copy of one a
    subscriber here still holds is not handed out. ack = `+ACK`; nack(delay) = `-NAK` with that delay
    (JetStream redelivers to any consumer of the group with num_delivered + 1); both are sent without waiting for
    an answer, as JetStream clients do (one lost with a dropped connection means a redelivery after ack_wait).
    A nack while nobody is fetching (the stream is closing, or waits for credit) first lets the open request end,
    so the redelivery goes to the group instead of back into this subscription.
    close() stops asking, lets the open request end (at most `PULL_EXPIRES_MAX_S`), and naks what arrived but was
    never handed out. The inbox stays subscribed for `RETIRE_AFTER_S` more, naking at once what still reaches it:
    a pull request whose inbox has no subscriber is one of those the server loses a redelivery to, and a request
    can outlive the end close() saw (`nats_pull.RetiredInboxes`). No phantom consumer is left
    (dapr#10228): a pull consumer pushes nothing, it only answers pull requests, and after close() this
    subscription sends none.
    The durable consumer itself stays: it is the group, not this subscriber.

Connection
    One connection per adapter, opened on first use (`CONNECT_DEADLINE_S` to succeed, else BrokerUnavailable).
    When it drops, nats-py reconnects forever, with capped exponential backoff and jitter (`_reconnect_delay`),
    replaying the inbox subscriptions; fetches return [] meanwhile, publishes wait for the PubAck up to their
    deadline. A message in flight when the connection dropped comes back after ack_wait (the server fault above can
    also strike a pull request cut off by the drop: at worst one message late, never a loss).
    close() closes the connection.

Ordering
    A stream stores a subject's messages in publish order and a consumer delivers them in stream order, so one
    consumer of a group receives one ordering key's messages in publish order, as long as none is redelivered.
    There is no per-key affinity: consumers of one group share messages regardless of key, and a message given
    back (nack, expired deadline, closed subscriber) comes again after later messages that were already handed
    out (JetStream serves redeliveries before messages not yet delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.js import JetStreamContext, api

from ductape_processor.adapters.brokers.base import (
    BrokerAdapter,
    BrokerSubscription,
    BrokerUnavailable,
    SubscribeOptions,
)
from ductape_processor.adapters.brokers.codec import TimeText
from ductape_processor.adapters.brokers.connection import Endpoint, LazyConnection
from ductape_processor.adapters.brokers.nats_deliveries import Deliveries, loses_redeliveries
from ductape_processor.adapters.brokers.nats_headers import prepared_headers
from ductape_processor.adapters.brokers.nats_names import check_subject, consumer_name, subject_covered
from ductape_processor.adapters.brokers.nats_publish import PubAcks, lost
from ductape_processor.adapters.brokers.nats_pull import CLOSE_DEADLINE_S, NatsPullSubscription, RetiredInboxes
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import OutgoingEvent
from ductape_processor.runtime.policies import Backoff, Deadline, RetryBudget

log = logging.getLogger(__name__)

DEFAULT_STREAM = "ductape"
CONNECT_DEADLINE_S = 5.0
REQUEST_TIMEOUT_S = 5.0
PUBLISH_DEADLINE_S = 8.0
PUBLISH_ATTEMPT_S = 2.0
ACK_WAIT_MARGIN_S = 5.0  # above the engine's own delays in giving an expired message back (fetch end, pull end)
ACK_WAIT_MARGIN_RATIO = 0.2
MAX_ACK_PENDING = 20_000
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
RECONNECT_BACKOFF = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)  # with jitter: clients of one server spread out
PUBLISH_BACKOFF = Backoff(0.05, 1.0, jitter=False)

_ERR_STREAM_NAME_IN_USE = 10058
_ERR_STREAM_NOT_FOUND = 10059
_ERR_EXPECTED_STREAM = 10060
_ERR_SUBJECTS_OVERLAP = 10065


_Retryable = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
)


class StreamConflict(ProcessorError):
    """The JetStream stream cannot hold the topic as configured (e.g. another stream already owns the subject)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.BROKER_STREAM_CONFLICT


# -- the adapter ---------------------------------------------------------------------------------------------------


class NatsBroker(BrokerAdapter):
    """A connection to one NATS server (or cluster) with JetStream, and the stream of this broker environment."""

    def __init__(self, url: str, stream: str, name: str) -> None:
        self._url = url
        self._stream = stream
        self._name = name
        self._endpoint = Endpoint(f"NATS broker {name}", url, {"broker": name, "stream": stream})
        self._connection = LazyConnection(self._connect, lambda connection: not connection[0].is_closed)
        self._stream_lock = asyncio.Lock()
        self._subjects: set[str] = set()
        self._consumers: dict[str, float] = {}  # consumer name -> ack_wait known to be set
        self._subscriptions: set[BrokerSubscription] = set()
        self.retired = RetiredInboxes()
        self.deliveries = Deliveries()  # what this processor did with each message (see `nats_deliveries`)
        self._closed = False
        self._last_error = ""
        self._reconnect_attempts = 0
        self._pub_acks = PubAcks()

    # -- connection --------------------------------------------------------------------------------------------

    def unavailable(self, what: str, exc: BaseException | None = None) -> BrokerUnavailable:
        """The error callers see."""
        return self._endpoint.unavailable(what, exc)

    def _conflict(self, topic: str, why: str) -> StreamConflict:
        return StreamConflict(
            f"NATS broker {self._name}: {why}", metadata={"broker": self._name, "stream": self._stream, "topic": topic}
        )

    async def _connected(self) -> tuple[NATS, JetStreamContext]:
        if self._closed:
            raise self.unavailable("the adapter is closed")
        return await self._connection.get()

    async def _connect(self) -> tuple[NATS, JetStreamContext]:
        if self._closed:
            raise self.unavailable("the adapter is closed")
        nc = NATS()
        try:
            async with asyncio.timeout(CONNECT_DEADLINE_S):
                await nc.connect(
                    servers=[self._url],
                    name=f"ductape-processor {self._name}",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    reconnect_to_server_handler=self._reconnect_delay,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            why = self._last_error or self._endpoint.describe(exc)
            raise self.unavailable(
                f"cannot connect within {CONNECT_DEADLINE_S:g}s to {self._endpoint.redacted_url} ({why})"
            ) from None
        except asyncio.CancelledError:  # the publish's deadline came first: leave no half-open client behind
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._subjects.clear()
        self._consumers.clear()
        self.deliveries.own_count = loses_redeliveries(nc.connected_server_version)
        where = self._endpoint.redacted_url
        log.info("connected to NATS %s for broker %s (stream %s)", where, self._name, self._stream)
        return nc, nc.jetstream(timeout=REQUEST_TIMEOUT_S)

    def _reconnect_delay(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        """Capped exponential backoff with jitter between reconnect attempts; the least-tried server first."""
        self._reconnect_attempts += 1
        return min(servers, key=lambda server: server.reconnects), RECONNECT_BACKOFF.delay(self._reconnect_attempts)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = self._endpoint.describe(exc)
        current = self._connection.current
        if current is not None and current[0].is_connected and not isinstance(exc, OSError):
            log.warning("NATS broker %s: %s", self._name, self._last_error)
        else:
            log.debug("NATS broker %s: connection attempt failed: %s", self._name, self._last_error)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("NATS broker %s: connection lost; reconnecting", self._name)

    async def _on_reconnected(self) -> None:
        self._reconnect_attempts = 0
        # A PUB written before the drop never gets its PubAck: give those up now, so they are sent again at once
        # instead of after their attempt's timeout (JetStream drops a copy that was stored after all, by its id).
        self._pub_acks.give_up()
        log.warning("NATS broker %s: reconnected", self._name)

    # -- stream and consumers ----------------------------------------------------------------------------------

    async def _ensure_subject(self, js: JetStreamContext, topic: str) -> None:
        """Make the stream exist and hold `topic` (created with file storage and limits retention when missing)."""
        if topic in self._subjects:
            return
        check_subject(topic)
        async with self._stream_lock:
            if topic in self._subjects:
                return
            for _ in range(5):
                try:
                    try:
                        info = await js.stream_info(self._stream)
                    except nats.js.errors.NotFoundError:
                        await js.add_stream(
                            api.StreamConfig(
                                name=self._stream,
                                subjects=[topic],
                                retention=api.RetentionPolicy.LIMITS,
                                storage=api.StorageType.FILE,
                            )
                        )
                        continue  # read it back
                    subjects = list(info.config.subjects or [])
                    if subject_covered(topic, subjects):
                        self._subjects.add(topic)
                        return
                    await js.update_stream(info.config.evolve(subjects=[*subjects, topic]))
                    # read back: a concurrent update from another processor may have replaced the subject list
                except nats.js.errors.APIError as exc:
                    if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                        raise self._conflict(
                            topic,
                            f"subject {topic!r} already belongs to another JetStream stream than {self._stream!r}; "
                            "set the broker's `stream` to that stream or move the subject",
                        ) from None
                    if exc.err_code in (_ERR_STREAM_NAME_IN_USE, _ERR_STREAM_NOT_FOUND):
                        continue  # created or deleted concurrently: look again
                    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                        raise self.unavailable("JetStream does not answer (is it enabled on the server?)") from exc
                    if isinstance(exc, nats.js.errors.BadRequestError):
                        raise self._conflict(
                            topic, f"stream {self._stream!r} refused subject {topic!r}: {exc.description}"
                        ) from None
                    raise self.unavailable(f"preparing stream {self._stream!r}", exc) from exc
                except (nats.errors.Error, TimeoutError) as exc:
                    raise self.unavailable(f"preparing stream {self._stream!r}", exc) from exc
            raise self.unavailable(f"stream {self._stream!r} kept changing while adding subject {topic!r}")

    async def _ensure_consumer(self, js: JetStreamContext, topic: str, group: str, ack_wait: float) -> str:
        name = consumer_name(topic, group)
        if self._consumers.get(name, 0.0) >= ack_wait:
            return name
        try:
            try:
                info = await js.consumer_info(self._stream, name)
            except nats.js.errors.NotFoundError:
                info = None
            if info is None:
                try:
                    info = await js.add_consumer(
                        self._stream,
                        api.ConsumerConfig(
                            name=name,
                            durable_name=name,
                            description=f"ductape group {group!r} of {topic!r}",
                            filter_subject=topic,
                            deliver_policy=api.DeliverPolicy.NEW,
                            ack_policy=api.AckPolicy.EXPLICIT,
                            ack_wait=ack_wait,
                            max_deliver=-1,
                            max_ack_pending=MAX_ACK_PENDING,
                            replay_policy=api.ReplayPolicy.INSTANT,
                        ),
                    )
                except nats.js.errors.APIError as refused:
                    try:  # created concurrently by another processor?
                        info = await js.consumer_info(self._stream, name)
                    except nats.js.errors.NotFoundError:
                        raise self.unavailable(f"creating consumer {name!r} of group {group!r}", refused) from refused
            current = info.config.ack_wait or 0.0
            if current < ack_wait:
                info = await js.add_consumer(self._stream, info.config.evolve(ack_wait=ack_wait))
                current = info.config.ack_wait or ack_wait
        except nats.js.errors.ServiceUnavailableError as exc:
            raise self.unavailable("JetStream does not answer (is it enabled on the server?)") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise self.unavailable(f"preparing consumer {name!r} of group {group!r}", exc) from exc
        self._consumers[name] = current
        return name

    # -- publishing ---------------------------------------------------------------------------------------------

    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        current = self._connection.current  # open, most of the time: no coroutine (two levels) to find it
        if self._closed or current is None or current[0].is_closed:
            current = await self._connected()
        nc, js = current
        head = prepared_headers(nc.max_payload, topic, message, self._stream)
        if topic not in self._subjects:
            await self._ensure_subject(js, topic)
        return await self._publish_until_confirmed(nc, js, topic, message.data, head)

    async def publish_batch(self, topic: str, messages: list[OutgoingEvent]) -> dict[int, ProcessorError]:
        """Write every message, then wait for their PubAcks together (no task per message); a message whose first
        attempt fails in a way worth retrying goes through `publish`'s retries on its own."""
        nc, js = await self._connected()
        await self._ensure_subject(js, topic)
        results: list[str | ProcessorError | None] = [None] * len(messages)
        sent: list[tuple[int, bytes, asyncio.Future[str]]] = []
        time = TimeText()
        for index, message in enumerate(messages):
            try:
                head = prepared_headers(nc.max_payload, topic, message, self._stream, time(message.time))
            except ProcessorError as exc:
                results[index] = exc
                continue
            try:
                sent.append((index, head, await self._pub_acks.send(nc, topic, message.data, head)))
            except _Retryable:
                sent.append((index, head, lost()))
            except nats.errors.Error as exc:
                results[index] = self._refused(topic, exc)
        if sent:
            await asyncio.wait([future for _, _, future in sent], timeout=PUBLISH_ATTEMPT_S)
        retry: list[tuple[int, bytes]] = []
        for index, head, future in sent:
            if not future.done():
                future.cancel()
                retry.append((index, head))
            elif future.cancelled() or isinstance(future.exception(), _Retryable):
                retry.append((index, head))
            elif (failure := future.exception()) is not None:
                results[index] = self._refused(topic, failure)
            else:
                results[index] = future.result()
        for index, head in retry:
            try:
                results[index] = await self._publish_until_confirmed(nc, js, topic, messages[index].data, head)
            except ProcessorError as exc:
                results[index] = exc
        return {
            index: self.unavailable("not published") if result is None else result
            for index, result in enumerate(results)
            if not isinstance(result, str)
        }

    async def _publish_until_confirmed(
        self, nc: NATS, js: JetStreamContext, topic: str, data: bytes, head: bytes
    ) -> str:
        """Publish (`head`: the encoded header block) and wait for the PubAck, sending again (same Nats-Msg-Id) while
        failures are worth retrying, for at most PUBLISH_DEADLINE_S."""
        deadline = Deadline(PUBLISH_DEADLINE_S)
        budget: RetryBudget | None = None  # built at the first failure: most publishes have none
        while True:
            try:
                attempt_s = max(deadline.bound(PUBLISH_ATTEMPT_S), 0.1)
                return await self._pub_acks.confirmed(nc, topic, data, head, attempt_s)
            except (nats.js.errors.ServiceUnavailableError, *_Retryable) as exc:
                failure: BaseException = exc
                if isinstance(exc, nats.js.errors.NoStreamResponseError):
                    self._subjects.discard(topic)  # the stream was deleted or lost the subject: set it up again
                    with contextlib.suppress(BrokerUnavailable):
                        await self._ensure_subject(js, topic)
            except (nats.errors.Error, nats.js.errors.APIError) as exc:
                raise self._refused(topic, exc) from exc
            if budget is None:
                budget = RetryBudget(PUBLISH_BACKOFF, deadline)
            if not await budget.pause():
                raise self.unavailable(
                    f"publish to {topic!r} was not confirmed within {PUBLISH_DEADLINE_S:g}s", failure
                ) from failure

    def _refused(self, topic: str, exc: BaseException) -> ProcessorError:
        """The error a publish that will not succeed by being sent again answers with."""
        if isinstance(exc, nats.errors.MaxPayloadError):
            return InvalidArgument(f"NATS refused the message size: {exc}", reason=Reason.MESSAGE_TOO_LARGE)
        if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _ERR_EXPECTED_STREAM:
            return self._conflict(topic, f"subject {topic!r} is stored by another stream than {self._stream!r}")
        if isinstance(exc, nats.errors.ConnectionClosedError):
            return self.unavailable(f"publish to {topic!r}: the connection is closed", exc)
        if isinstance(exc, nats.js.errors.APIError):
            return self.unavailable(f"publish to {topic!r} was refused", exc)
        return self.unavailable(f"publish to {topic!r}", exc)

    # -- subscribing --------------------------------------------------------------------------------------------

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        nc, js = await self._connected()
        await self._ensure_subject(js, topic)
        ack_wait = options.ack_deadline_s + max(ACK_WAIT_MARGIN_S, options.ack_deadline_s * ACK_WAIT_MARGIN_RATIO)
        consumer = await self._ensure_consumer(js, topic, group, round(ack_wait, 3))
        subscription = NatsPullSubscription(self, nc, consumer)
        try:
            await subscription.start()
        except nats.errors.Error as exc:
            raise self.unavailable(f"subscribing to group {group!r} of {topic!r}", exc) from exc
        self._subscriptions.add(subscription)
        return subscription

    def forget(self, subscription: BrokerSubscription) -> None:
        self._subscriptions.discard(subscription)

    def forget_consumer(self, name: str) -> None:
        self._consumers.pop(name, None)

    @property
    def stream(self) -> str:
        """The JetStream stream of this broker environment."""
        return self._stream

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(
            *(subscription.close() for subscription in list(self._subscriptions)), return_exceptions=True
        )
        self.retired.cancel()
        current = self._connection.take()
        nc = current[0] if current is not None else None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_DEADLINE_S):
                    await nc.close()
