"""Redis Streams with consumer groups (`redis.asyncio`, Redis >= 6.2).

Layout
    One stream per topic, key ``ductape:topic:<topic name>``. A manifest consumer group is a Redis consumer group of
    that stream, created on first subscribe with ``XGROUP CREATE <key> <group> $ MKSTREAM`` (so it starts with the
    messages published after it was created, and keeps collecting them while nobody is subscribed). Each
    subscription is its own Redis consumer, ``ductape:<ack deadline ms>:<random>``; the ack deadline in the name
    lets any consumer tell when another consumer's messages are abandoned (see Redelivery).

Message fields (one stream entry, binary safe)
    CloudEvents 1.0 attributes under their own names: ``specversion`` ("1.0"), ``id``, ``source``, ``type``,
    ``time`` (RFC 3339 / ISO 8601), ``datacontenttype``; the extensions ``traceparent``, ``tracestate`` (W3C) and
    ``orderingkey`` when set; the payload under ``data`` (raw bytes). Every caller attribute ``k`` travels as
    ``attr-k``, so it can never collide with the fields above. Entries written by other producers are read
    leniently: a missing ``id`` becomes the stream entry id, a missing ``time`` the entry id's timestamp, unknown
    fields are ignored.

Delivery and `delivery_attempt`
    Redis keeps, per group, a pending-entries list (PEL) with a delivery counter per entry; `delivery_attempt` *is*
    that counter at the moment of delivery: XREADGROUP `>` sets it to 1, every XCLAIM to a consumer adds 1.
    A handle is ``<entry id>@<attempt>``, one per delivery, so a stale handle never settles a later delivery.
    `fetch` first takes back, in one Lua script (atomic, so two consumers never claim the same entry), the entries
    that are due for redelivery, then reads new entries with ``XREADGROUP ... BLOCK`` (each block at most 0.5 s).
    A blocked read is woken by the first entry stored, and takes only what is there by then (one entry of a batch
    publish, whose other XADDs Redis runs right after): when it brings fewer than asked, one more read, not
    blocking, takes the rest at once, so a batch that fills is not held `max_wait` for entries already stored (when
    that read fails, what the first took is handed out and the next fetch reports the failure).
    A consumer runs that script at most every `RECLAIM_INTERVAL_S`, except that its next fetch runs it at once after
    it gave entries back (nack, release) or when the last run found some: on a busy stream, a script and its scan of
    the pending entries for every fetch of 100 messages cost both the processor and Redis more than the read.

Redelivery (nack, delay, ack deadline, close, crashed processors)
    A nack parks the entry on the group's pseudo-consumer ``ductape:redeliver`` with
    ``XCLAIM ... IDLE (PARK_MS - delay) JUSTID``: the entry stays in the PEL (nothing is copied or re-published, so
    other groups of the stream are unaffected and the counter stays exact), and its idle time reaches `PARK_MS`
    (ten years) exactly `delay` later, when any consumer of the group claims it (counter + 1). The alternative,
    XADD of a copy plus XACK of the original, was rejected: the copy would reach every group of the stream and
    loses the entry id. Trade-offs: a parked entry is taken only when some consumer of the group fetches (at most
    one 0.5 s block, or `RECLAIM_INTERVAL_S`, late), and the parked entries are visible as a consumer in
    ``XINFO CONSUMERS``. The nack script only parks entries this consumer still owns.
    `close` (after the engine nacked what it held) parks whatever the consumer still holds and deletes the consumer
    (``XGROUP DELCONSUMER``) in the same script, so it leaves no phantom consumer and loses nothing (deleting a
    consumer with pending entries would drop them). Entries it took but never handed out (a cancelled read) are
    parked with the counter lowered by one, so their next delivery carries the same attempt number.
    A processor that dies without closing leaves entries in its consumer's PEL; any consumer of the group claims
    them once they are idle longer than the owner's ack deadline (from its name) plus `GRACE_MS`.

Ordering
    A stream is totally ordered, so one consumer receives the first deliveries of one ordering key (indeed of the
    whole topic) in publish order (publish returns after the XADD reply). There is no per-key affinity across the
    consumers of a group, and a redelivered message comes after the messages delivered meanwhile.

Connections and failures
    Per adapter, one connection that every publish, ack and script shares, pipelining them
    (`redis_connection.PipelinedConnection`: a batch publish is one write and one read of its replies), and per
    subscription one more for its blocking reads, each opened on first use by redis-py (URL, TLS, AUTH, SELECT) and
    named ``ductape:<product/env/broker>`` in ``CLIENT LIST``. A lost connection is opened again by the next
    command; every command here is retried on connection errors and timeouts with exponential backoff (50 ms
    doubling to 1 s) for `RETRY_BUDGET_S`, then fails with `BrokerUnavailable`, as does any error reply. A blocking
    read whose connection is killed is retried the same way; one whose fetch is cancelled closes its connection,
    so that Redis stops it before it takes anything for nobody. Delivery is at least once: a publish retried after a
    lost reply may be stored twice; an entry claimed by a read whose reply was lost comes back after the ack
    deadline + grace (its counter then counts that lost delivery too).

Housekeeping
    Streams are never trimmed on XADD (a length cap would drop messages a durable group has not read yet).
    Instead, at most every `MAINTENANCE_INTERVAL_S` per stream and adapter (on publish and on fetch), a script
    trims the stream (``XTRIM MINID ~``) below the oldest entry any group still needs (its oldest pending entry,
    else its last delivered one) — all of it when the stream has no group, as a group created later starts at the
    end anyway — and deletes consumers idle for `STALE_CONSUMER_MS` with nothing pending (left by crashed
    processors; deleting a live one is harmless, its next read recreates it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import hiredis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ductape_processor.adapters.brokers.base import (
    BrokerAdapter,
    BrokerSubscription,
    BrokerUnavailable,
    SubscribeOptions,
)
from ductape_processor.adapters.brokers.codec import text
from ductape_processor.adapters.brokers.connection import Endpoint
from ductape_processor.adapters.brokers.redis_connection import Command, PipelinedConnection
from ductape_processor.adapters.brokers.redis_entries import EntryReader, xack, xadd, xadd_plain
from ductape_processor.adapters.brokers.redis_scripts import CLOSE, MAINTAIN, PARK, RECLAIM
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent, PlainEvents
from ductape_processor.runtime.policies import Backoff, Deadline, RetryBudget

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX = "ductape:topic:"
PARK_CONSUMER = "ductape:redeliver"
PARK_MS = 10 * 365 * 24 * 3600 * 1000  # a parked entry is due once its idle time reaches this
GRACE_MS = 3000  # an entry held this long past its owner's ack deadline is abandoned
UNKNOWN_OWNER_DEADLINE_MS = 60_000  # owners whose name carries no ack deadline (not ours)
BLOCK_CAP_S = 0.5  # one XREADGROUP blocks at most this long, so parked entries are noticed soon
RECLAIM_INTERVAL_S = 0.1  # a consumer looks for entries due for redelivery at most this often (see Redelivery)
SCAN = 100  # pending entries examined per fetch when looking for abandoned ones
REPLY_TIMEOUT_S = 10.0  # a reply (after a blocking read's block) later than this: the connection is dead
RETRY_BUDGET_S = 5.0
RETRY_BACKOFF = Backoff(0.05, 1.0, jitter=False)
CLOSE_RETRY_BUDGET_S = 1.0
MAINTENANCE_INTERVAL_S = 30.0
STALE_CONSUMER_MS = 3_600_000
READ_COMMANDS_KEPT = 256  # encoded XREADGROUPs a subscription keeps (`_read_command`); more and they are made anew
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
_ENTRY_IDS = frozenset({bytes})  # the type of an XADD's reply when it stored its entry


def stream_key(topic: str) -> str:
    """The stream holding a topic's messages."""
    return KEY_PREFIX + topic


class RedisBroker(BrokerAdapter):
    """Topics as Redis streams, groups as Redis consumer groups."""

    def __init__(self, url: str, name: str) -> None:
        self._url = url
        self._name = name
        self._endpoint = Endpoint(f"broker {name}", url, {"broker": name})
        self._pool: ConnectionPool | None = None
        self._shared: PipelinedConnection | None = None
        self._connections: weakref.WeakSet[PipelinedConnection] = weakref.WeakSet()  # closed with the adapter
        self._closed = False
        self._maintained: dict[str, float] = {}

    # -- plumbing -----------------------------------------------------------------------------------------------

    def connection(self) -> PipelinedConnection:
        """The connection every publish, ack and script of this adapter shares."""
        if self._shared is None:
            self._shared = self.new_connection()
        return self._shared

    def new_connection(self, reply_timeout_s: float = REPLY_TIMEOUT_S) -> PipelinedConnection:
        """A connection of its own (a subscription's blocking reads), opened on first use."""
        if self._closed:
            raise self._endpoint.unavailable("the Redis adapter is closed")
        if self._pool is None:
            try:
                # Only its settings and its connection class are used: each connection is opened by redis-py and
                # then driven by PipelinedConnection.
                self._pool = ConnectionPool.from_url(
                    self._url,
                    decode_responses=False,
                    socket_connect_timeout=5.0,
                    socket_timeout=REPLY_TIMEOUT_S,  # the handshake's replies
                    socket_keepalive=True,
                    retry=Retry(NoBackoff(), 0),  # retries are ours (`call`), with backoff and a budget
                    client_name=self.client_name,
                )
            except (ValueError, RedisError):
                # The parser's message quotes the part it could not read, which may be a piece of the password.
                raise self._endpoint.unavailable(
                    "the Redis URL cannot be parsed (reserved characters in a password must be percent-encoded)"
                ) from None
        connection = PipelinedConnection(self._pool, reply_timeout_s)
        self._connections.add(connection)
        return connection

    @property
    def client_name(self) -> str:
        """The name this adapter's connections carry in CLIENT LIST."""
        return "ductape:" + re.sub(r"[^A-Za-z0-9_.:/-]", "_", self._name)

    async def call(self, what: str, op: Callable[[], Awaitable[T]], budget_s: float | None = None) -> T:
        """Run `op()`, retrying connection failures with backoff for `budget_s` (default RETRY_BUDGET_S).

        Failures past the budget and error replies become BrokerUnavailable.
        """
        # The budget is made at the first failure (most calls have none), counted from the call's start.
        started = time.monotonic()
        budget: RetryBudget | None = None
        while True:
            try:
                return await op()
            except ProcessorError:
                raise
            except _CONNECTION_ERRORS as exc:
                if budget is None:
                    left = (RETRY_BUDGET_S if budget_s is None else budget_s) - (time.monotonic() - started)
                    budget = RetryBudget(RETRY_BACKOFF, Deadline(left))
                if self._closed or not await budget.pause():
                    raise self._endpoint.unavailable(
                        f"Redis is unreachable ({what} failed {budget.retries} time(s))", exc
                    ) from None
                if budget.retries == 1:
                    log.warning(
                        "broker %s: Redis connection lost during %s (%s); reconnecting",
                        self._name,
                        what,
                        self._endpoint.describe(exc),
                    )
            except (RedisError, OSError) as exc:
                raise self._endpoint.unavailable(f"Redis refused {what}", exc) from None

    async def maintain(self, key: str) -> None:
        """Trim `key` and drop stale consumers, at most every MAINTENANCE_INTERVAL_S per stream."""
        now = asyncio.get_running_loop().time()
        if self._maintained.get(key, 0.0) > now:
            return
        self._maintained[key] = now + MAINTENANCE_INTERVAL_S
        try:
            await self.call(
                "stream trimming",
                lambda: MAINTAIN.run(self.connection(), key, (STALE_CONSUMER_MS, PARK_CONSUMER)),
                budget_s=0.0,
            )
        except BrokerUnavailable as exc:
            log.warning("%s", exc.message)

    # -- the adapter ----------------------------------------------------------------------------------------------

    async def publish(self, topic: str, message: OutgoingEvent) -> str:
        key = stream_key(topic)
        command = xadd(key, [message])
        [entry_id] = await self.call("publish (XADD)", lambda: self.connection().send(command, 1))
        if isinstance(entry_id, ResponseError):
            raise self._endpoint.unavailable("Redis refused publish (XADD)", entry_id)
        await self.maintain(key)
        return text(entry_id)

    async def publish_batch(self, topic: str, messages: list[OutgoingEvent]) -> dict[int, ProcessorError]:
        key = stream_key(topic)
        return await self._added(key, xadd(key, messages), len(messages))

    async def publish_plain(self, topic: str, events: PlainEvents) -> dict[int, ProcessorError]:
        # The columns encoded as they are (`xadd_plain`): the same XADDs as `publish_batch` of `events.events()`.
        key = stream_key(topic)
        return await self._added(key, xadd_plain(key, events), len(events.ids))

    async def _added(self, key: str, commands: bytes, count: int) -> dict[int, ProcessorError]:
        """Send `count` XADDs encoded in `commands`; the failures by their position."""
        replies = []
        if count:
            replies = await self.call("publish batch (XADD)", lambda: self.connection().send(commands, count))
        await self.maintain(key)
        if set(map(type, replies)) <= _ENTRY_IDS:  # every XADD answered with its entry id (most batches)
            return {}
        return {
            index: self._endpoint.unavailable("Redis refused the publish", reply)
            for index, reply in enumerate(replies)
            if isinstance(reply, ResponseError)
        }

    async def subscribe(self, topic: str, group: str, options: SubscribeOptions) -> BrokerSubscription:
        key = stream_key(topic)
        await self.ensure_group(key, group)
        consumer = f"ductape:{max(round(options.ack_deadline_s * 1000), 1)}:{secrets.token_hex(8)}"
        reads = self.new_connection(BLOCK_CAP_S + REPLY_TIMEOUT_S)
        return RedisSubscription(self, topic, key, group, consumer, reads)

    async def ensure_group(self, key: str, group: str) -> None:
        """Create the group at the stream's end (and the stream) unless it exists."""

        async def create() -> None:
            try:
                await self.connection().one(b"XGROUP", b"CREATE", key, group, b"$", b"MKSTREAM")
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        await self.call("creating the consumer group", create)

    async def close(self) -> None:
        self._closed = True
        self._shared = None
        for connection in list(self._connections):
            await connection.close()


Taken = tuple[bytes, int, list[bytes]]
"""An entry as a fetch took it: its id, its delivery count, its fields and values in turn."""


class RedisSubscription(BrokerSubscription):
    """One Redis consumer of one group."""

    def __init__(
        self, broker: RedisBroker, topic: str, key: str, group: str, consumer: str, reads: PipelinedConnection
    ) -> None:
        self._broker = broker
        self._topic = topic
        self._key = key
        self._group = group
        self.consumer = consumer
        self._reads = reads  # blocking reads only: a blocked command holds up its connection
        # Handed out, not yet acked/nacked: a current delivery's handle -> its entry id (as the reply had it). By
        # handle, so that an ack takes its entries out in one loop in C; an entry has one handle here at a time.
        self._held: dict[str, bytes] = {}
        self._cursor = "-"
        self._reclaim_at = 0.0  # when a fetch looks for entries due for redelivery next (loop time)
        self._lock = asyncio.Lock()  # fetches and close never overlap
        self._closed = False
        self._entries = EntryReader(topic)
        self._read_commands: dict[tuple[int, int | None], bytes] = {}  # `_read_command`'s

    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        if self._closed or max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        until = loop.time() + max(timeout_s, 0.0)
        async with self._lock:
            reclaimed: list[Taken] = []
            read: list[Any] = []
            while not self._closed:
                if loop.time() >= self._reclaim_at:
                    reclaimed = await self._reclaim(max_messages)
                    # While it finds some, look again at the next fetch: more may be due.
                    self._reclaim_at = 0.0 if reclaimed else loop.time() + RECLAIM_INTERVAL_S
                room = max_messages - len(reclaimed)
                if room > 0:
                    block_ms = 0 if reclaimed else int(min(until - loop.time(), BLOCK_CAP_S) * 1000)
                    read = await self._read(room, block_ms if block_ms > 0 else None)
                    if block_ms > 0 and 0 < len(read) < room:
                        # A blocked read is woken by the first entry stored (a batch publish's first XADD) and
                        # takes only what is there by then: one more read, not blocking, takes the rest of the
                        # batch, stored right behind it, rather than leaving it to the engine's max_wait.
                        # Best effort: when it fails, what the first read took is handed out all the same, and the
                        # next fetch reports the failure.
                        with contextlib.suppress(BrokerUnavailable):
                            read += await self._read(room - len(read), None)
                if reclaimed or read or loop.time() >= until:
                    break
            if self._closed:
                return []  # close() parks them, keeping their attempt number: nobody saw them
            messages = []
            if reclaimed:
                self._forget_entries({entry_id for entry_id, _, _ in reclaimed})
            for entry_id, attempt, flat in reclaimed:
                messages += self._entries.messages([(entry_id, flat)], max(attempt, 1), self._held)
            if read:
                messages += self._entries.messages(read, 1, self._held)
            await self._broker.maintain(self._key)
        return messages

    async def _reclaim(self, want: int) -> list[Taken]:
        args = (self._group, self.consumer, want, PARK_CONSUMER, PARK_MS, GRACE_MS, UNKNOWN_OWNER_DEADLINE_MS)
        reply = await self._broker.call(
            "reclaiming messages",
            lambda: RECLAIM.run(self._broker.connection(), self._key, (*args, self._cursor, SCAN)),
        )
        self._cursor = text(reply[0])
        return [(entry_id, int(count), flat) for entry_id, count, flat in reply[1]]

    def _read_command(self, count: int, block_ms: int | None) -> bytes:
        """The XREADGROUP of `count` entries (blocking `block_ms`, or not), encoded once for each pair: hiredis'
        `pack_command` took about 2 µs a read (each argument's length formatted with `sprintf`), and a fetch reads
        with few distinct pairs (a batch's size, the rest of it; a block of about BLOCK_CAP_S)."""
        commands = self._read_commands
        packed = commands.get((count, block_ms))
        if packed is None:
            if len(commands) >= READ_COMMANDS_KEPT:
                commands.clear()
            block: Command = () if block_ms is None else (b"BLOCK", block_ms)
            command = (b"XREADGROUP", b"GROUP", self._group, self.consumer, b"COUNT", count, *block)
            # hiredis' stub declares a tuple of one argument; it takes any number.
            packed = hiredis.pack_command((*command, b"STREAMS", self._key, b">"))  # type: ignore[arg-type]
            commands[count, block_ms] = packed
        return packed

    async def _read(self, count: int, block_ms: int | None) -> list[Any]:
        """New entries `[entry id, [field, value, ...]]` (the reply's own lists) for this consumer."""
        command = self._read_command(count, block_ms)

        async def read() -> Any:
            [reply] = await self._reads.send(command, 1)
            if not isinstance(reply, ResponseError):
                return reply
            if not str(reply).startswith("NOGROUP"):
                raise reply
            # The stream or group was deleted behind our back: start the group again at the end.
            await self._broker.ensure_group(self._key, self._group)
            return None

        try:
            reply = await self._broker.call("reading messages (XREADGROUP)", read)
        except asyncio.CancelledError:
            # Closing the connection stops the read in Redis: it takes nothing more for a fetch nobody waits for.
            self._reads.abandon()
            raise
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            [entries] = reply.values()
        else:
            [[_, entries]] = reply
        return entries  # type: ignore[no-any-return]

    def _mine(self, handles: list[str]) -> dict[str, bytes]:
        """Those of `handles` that are current deliveries to this consumer, with their entry ids."""
        held = self._held
        return {handle: held[handle] for handle in handles if handle in held}

    def _forget(self, mine: dict[str, bytes]) -> None:
        """Settled: `mine` are not held any more."""
        pop = self._held.pop
        for handle in mine:
            pop(handle, None)

    def _forget_entries(self, entry_ids: set[bytes]) -> None:
        """An earlier delivery of these entries is not current any more (they were claimed again): its handle goes."""
        held = self._held
        for handle in [handle for handle, entry_id in held.items() if entry_id in entry_ids]:
            del held[handle]

    async def ack(self, handles: list[str]) -> None:
        # Taken out of `_held` before the XACK is sent (in one loop in C), and put back if it fails: a `close`
        # meanwhile goes out behind the XACK (or its retry) on the same connection, so whichever way it goes these
        # entries end acked, as they would have. A handle that is not current (settled, or an earlier delivery)
        # finds nothing.
        held = self._held
        taken = list(map(held.pop, handles, itertools.repeat(None)))  # each handle's entry id, or None
        entry_ids = list(filter(None, taken))
        if entry_ids:
            command = xack(self._key, self._group, entry_ids)

            async def acknowledge() -> None:
                [reply] = await self._broker.connection().send(command, 1)
                if isinstance(reply, ResponseError):
                    raise reply

            try:
                await self._broker.call("acknowledging (XACK)", acknowledge)
            except BaseException:
                self._put_back(handles, taken)
                raise

    def _put_back(self, handles: list[str], taken: list[bytes | None]) -> None:
        """The entries an ack that failed took out are held again, under their handles, unless delivered again
        meanwhile."""
        held = self._held
        again = set(held.values())  # delivered again meanwhile: the new delivery is current
        for handle, entry_id in zip(handles, taken, strict=True):
            if entry_id is not None and entry_id not in again:
                held[handle] = entry_id

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        idle = PARK_MS - min(max(round(delay_s * 1000), 0), PARK_MS)
        await self._park(handles, idle, "giving messages back")

    async def release(self, handles: list[str]) -> None:
        await self._park(handles, PARK_MS, "giving unseen messages back", lower=True)

    async def _park(self, handles: list[str], idle: int, what: str, *, lower: bool = False) -> None:
        mine = self._mine(handles)  # held until parked: a `close` meanwhile counts them as handed out
        if mine:
            args: Command = (self._group, self.consumer, PARK_CONSUMER, idle, int(lower), *mine.values())
            await self._broker.call(what, lambda: PARK.run(self._broker.connection(), self._key, args))
            self._forget(mine)
            self._reclaim_at = 0.0  # given back: the next fetch looks for what is due

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            args: Command = (self._group, self.consumer, PARK_CONSUMER, PARK_MS, *self._held.values())
            try:
                await self._broker.call(
                    "closing the consumer",
                    lambda: CLOSE.run(self._broker.connection(), self._key, args),
                    budget_s=CLOSE_RETRY_BUDGET_S,
                )
            except BrokerUnavailable as exc:
                # Nothing is lost: the group claims this consumer's entries after its ack deadline + grace.
                log.warning("%s; consumer %s is left for the group to clean up", exc.message, self.consumer)
            finally:
                await self._reads.close()
            self._held.clear()
