"""The subscription engine: credit, batching, ack deadlines, redelivery and dead-lettering, for every broker.

One `Subscription` serves one Subscribe stream. It pulls from the adapter only as much as the stream has credit for
(`max_in_flight` minus what is out unacknowledged), sends a batch when it holds `max_batch` messages or `max_wait`
after the first one, gives messages back to the broker when their ack deadline passes, and sends a message that
was delivered more than `max_deliveries` times to the dead-letter topic instead of to the client.

Leases and frozen clients
    A message's ack deadline starts when its batch was written to the stream, not when it was fetched: time spent
    in the processor's own hands never counts against the client, and messages the processor fetched but never
    wrote are given back with `release` (their delivery attempt is not counted).
    A stream whose messages expired takes nothing more from the broker (`held`) until its client acks or nacks
    again, so the expired messages go to the other consumers of the group first instead of back to a client that
    is not processing them. A stream whose write stays pending longer than `stall_s` (HTTP/2 flow control: the
    client stopped reading) gives back everything it holds (`watch` returns) and the API ends it.
    An ack or nack for an id that is not outstanding any more (its deadline passed, or it was settled) is ignored
    and reported back, never an error: a slow handler must not cost the whole stream.

Filling a batch
    The first fetch waits for a message; when it brings fewer than the batch holds, the engine waits for the rest
    (`wait_ready`) for at most `max_wait`, and fetches once more, rather than fetching again for each message as they
    trickle in (on Redis a fetch is a script and a read: trickling messages made 1.6 messages a fetch). Adapters
    that receive into a local buffer (memory, NATS) end the wait as soon as the batch is there, so a busy stream's
    batches are not held `max_wait` each; on the others the engine waits out `max_wait` (Redis fills a batch from
    one fetch when its read, woken by a batch publish's first entry, reads the rest of that publish at once).

Cost per message
    A message's ack id is its adapter's handle (unique among a subscription's deliveries), so there is no second id
    to make and map back on every ack. Outstanding messages are kept by ack id, and their leases by batch: a batch
    written gets one deadline for all its messages (ack ids), and batches are written in order, so leases are in
    deadline order: expiring looks at the oldest batches only, never at every message out, and nothing is done per
    message when a batch is written. Taking a batch in and settling an ack are loops in C (`map` over the batch,
    `dict.pop` over the ack ids), not Python loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ductape_processor.adapters.brokers.base import BrokerSubscription
from ductape_processor.errors import InvalidArgument, ProcessorError, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import IncomingEvent

log = logging.getLogger(__name__)

FETCH_POLL_S = 0.5
STALL_MIN_S = 2.0  # a write pending this long (or the ack deadline, when longer) means the client stopped reading
EXPIRED_REMEMBERED = 10_000  # expired ack ids kept per stream, to tell a late ack from an unknown id
TOO_LARGE_RETRY_S = 60.0
"""When a message too large for its stream comes back to the group, when there is no dead-letter topic to send it to
(`Subscription.undeliverable`)."""
DeadLetter = Callable[[IncomingEvent, str], Awaitable[None]]
"""Publishes a message to the subscription's dead-letter topic; the second argument says why (`dead_letter_reason`)."""
_handle = operator.attrgetter("handle")  # a message's ack id


class StreamClosing(Unavailable, reason=Reason.SHUTTING_DOWN):
    """The server is shutting down: reconnect, possibly to another replica."""


class SubscriberNotReading(Unavailable, reason=Reason.SUBSCRIBER_NOT_READING):
    """The client stopped reading its stream: its messages went back to the group; reconnect when ready."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A stream's flow settings, already checked."""

    max_in_flight: int
    max_batch: int
    max_wait_s: float
    ack_deadline_s: float
    max_deliveries: int

    @classmethod
    def checked(
        cls,
        *,
        max_in_flight: int = 0,
        max_batch: int = 0,
        max_wait_s: float | None = None,
        ack_deadline_s: float | None = None,
        max_deliveries: int = 0,
        dead_letter_event: str = "",
    ) -> Limits:
        """The limits a stream asked for (0 or None: the default), each checked; errors name the `init.` field."""

        def bounded(value: int, default: int, high: int, field: str) -> int:
            if value < 0 or value > high:
                raise InvalidArgument.field(f"init.{field}", f"must be between 1 and {high} (0: {default})")
            return value or default

        max_wait = 0.01 if max_wait_s is None else max_wait_s
        ack_deadline = 30.0 if ack_deadline_s is None else ack_deadline_s
        if not 0 <= max_wait <= 60:
            raise InvalidArgument.field("init.max_wait", "must be between 0 and 60 s")
        if not 0.1 <= ack_deadline <= 3600:
            raise InvalidArgument.field("init.ack_deadline", "must be between 0.1 s and 1 h")
        if max_deliveries < 0:
            raise InvalidArgument.field("init.max_deliveries", "must not be negative")
        if max_deliveries and not dead_letter_event:
            raise InvalidArgument.field("init.dead_letter_event", "is required when max_deliveries is set")
        return cls(
            max_in_flight=bounded(max_in_flight, 100, 10_000, "max_in_flight"),
            max_batch=bounded(max_batch, 100, 1000, "max_batch"),
            max_wait_s=max_wait,
            ack_deadline_s=ack_deadline,
            max_deliveries=max_deliveries,
        )


@dataclass(frozen=True, slots=True)
class Ignored:
    """Ack ids of one ack or nack that were not outstanding: all of them, and those whose deadline had passed."""

    ack_ids: list[str]
    expired: list[str]


class Subscription:
    """The server side of one Subscribe stream."""

    def __init__(
        self,
        broker: BrokerSubscription,
        limits: Limits,
        dead_letter: DeadLetter | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._limits = limits
        self._dead_letter = dead_letter
        self._clock = clock
        self._outstanding: dict[str, IncomingEvent] = {}  # by ack id (the handle), in fetch order
        self._leases: deque[tuple[float, list[str]]] = deque()  # (deadline, ack ids) of written batches, in order
        self._writing: list[IncomingEvent] = []  # handed to gRPC, its write not over yet
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._credit = asyncio.Event()  # set when fetching may go on: credit freed, client acted, or closed
        self._credit.set()
        self._changed = asyncio.Event()  # wakes `watch`: a deadline earlier than `_watch_until`, or closing
        self._watch_until = 0.0  # when `watch` looks next
        self._held = False  # messages expired: take nothing more until the client acks or nacks
        self._in_turn = asyncio.Lock()  # `next_batch` calls fetch one at a time, in the order made (FIFO)
        self._not_fetching = asyncio.Event()
        self._not_fetching.set()
        self._writing_since: float | None = None
        self._closed = False
        self._closing = asyncio.Event()  # set by close: ends a wait for a batch to fill
        self.stall_s = max(limits.ack_deadline_s, STALL_MIN_S)
        self.delivered = 0

    @property
    def in_flight(self) -> int:
        """Messages sent on the stream and not yet acked or nacked."""
        return len(self._outstanding)

    @property
    def held(self) -> bool:
        """Whether the stream waits for its client to ack or nack before it takes more messages."""
        return self._held

    async def next_batch(self) -> list[IncomingEvent]:
        """The next batch of messages to write (each acked by its `handle`), honouring credit and batching; [] once
        closed.

        Call `writing` before writing it and `written` after, so that its ack deadlines start then. Calls may
        overlap (the stream asks for the next batch before it took the one before): they fetch one after the other,
        in the order they were made, each within the credit left by the batches before it (those count as
        outstanding from their fetch on), so batches come in the broker's order and never exceed `max_in_flight`.
        """
        limits = self._limits
        async with self._in_turn:  # a call made while another fetches starts when that one returns
            while not self._closed:
                room = limits.max_in_flight - len(self._outstanding)
                if room <= 0 or self._held:
                    self._credit.clear()
                    await self._credit.wait()
                    continue
                self._not_fetching.clear()
                try:
                    batch = await self._collect(min(room, limits.max_batch))
                finally:
                    self._not_fetching.set()
                if self._held and batch:
                    # Messages expired while this fetch ran: these go back to the group unseen.
                    await self._release(list(map(_handle, batch)))
                    continue
                if batch:
                    return batch
        return []

    async def _collect(self, wanted: int) -> list[IncomingEvent]:
        first = await self._broker.fetch(wanted, FETCH_POLL_S)
        taken = await self._admit(first)
        wait = self._limits.max_wait_s
        if not first or len(first) >= wanted or wait <= 0 or self._closed:
            return taken
        # Let the batch fill for at most max_wait, then take what came in one fetch (see "Filling a batch").
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._filled(wanted - len(first))
        if not self._closed:
            taken += await self._admit(await self._broker.fetch(wanted - len(first), 0.0))
        return taken

    async def _filled(self, count: int) -> None:
        """Until the adapter has `count` messages ready (`wait_ready`) or the stream closes."""
        filling = asyncio.ensure_future(self._broker.wait_ready(count))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((filling, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            filling.cancel()
            closing.cancel()
            if filling.done() and not filling.cancelled():
                filling.exception()  # a broken subscription: the fetch that follows reports it

    async def _admit(self, messages: list[IncomingEvent]) -> list[IncomingEvent]:
        max_deliveries = self._limits.max_deliveries
        if max_deliveries and self._dead_letter and any(m.delivery_attempt > max_deliveries for m in messages):
            admitted: list[IncomingEvent] = []
            for message in messages:
                if message.delivery_attempt > max_deliveries:
                    await self._to_dead_letter(message, "max_deliveries")
                else:
                    admitted.append(message)
            messages = admitted
        self._outstanding.update(zip(map(_handle, messages), messages, strict=False))
        self.delivered += len(messages)
        return messages

    def writing(self, batch: list[IncomingEvent]) -> None:
        """A batch is handed to gRPC: from here it counts as delivered; its deadline waits for the write to end.
        The lease watch need not wake for it: it looks at least every second, and a stall takes STALL_MIN_S."""
        self._writing_since = self._clock()
        self._writing = batch

    def written(self, batch: list[IncomingEvent]) -> None:
        """The batch reached the stream: its messages' ack deadlines start now (the lease watch is woken only when
        they come before the moment it would look anyway)."""
        self._writing_since = None
        self._writing = []
        deadline = self._clock() + self._limits.ack_deadline_s
        self._leases.append((deadline, list(map(_handle, batch))))
        if deadline < self._watch_until:
            self._changed.set()

    async def _to_dead_letter(self, message: IncomingEvent, reason: str) -> None:
        assert self._dead_letter is not None
        try:
            await self._dead_letter(message, reason)
        except ProcessorError as exc:
            log.warning("dead-letter publish failed (%s); the message will be delivered again", exc.reason)
            await self._broker.nack([message.handle], 1.0)
            return
        await self._broker.ack([message.handle])

    async def watch(self) -> bool:
        """Expire leases as their deadlines pass. True once the client stopped reading (everything given back)."""
        while not self._closed:
            now = self._clock()
            if self._writing_since is not None and now - self._writing_since >= self.stall_s:
                log.warning(
                    "a subscriber stopped reading its stream for %.1f s; giving its messages back", self.stall_s
                )
                await self.close()
                return True
            await self._expire(now)
            now = self._clock()
            wake_in = FETCH_POLL_S * 2
            oldest = self._oldest_lease()
            if oldest is not None:
                wake_in = min(wake_in, oldest - now)
            if self._writing_since is not None:
                wake_in = min(wake_in, self._writing_since + self.stall_s - now)
            self._watch_until = now + wake_in
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wake_in, 0.001)):
                    await self._changed.wait()
        return False

    def _oldest_lease(self) -> float | None:
        """The earliest deadline of a message still outstanding (leases whose messages were all settled go)."""
        leases, outstanding = self._leases, self._outstanding
        while leases:
            deadline, ack_ids = leases[0]
            if not outstanding.keys().isdisjoint(ack_ids):  # one of them still outstanding (a loop in C)
                return deadline
            leases.popleft()
        return None

    async def _expire(self, now: float) -> None:
        leases, outstanding = self._leases, self._outstanding
        late: list[str] = []
        while leases and leases[0][0] <= now:  # oldest first: the first one not due ends the search
            late.extend(ack_id for ack_id in leases.popleft()[1] if ack_id in outstanding)
        if not late:
            return
        for ack_id in late:
            del outstanding[ack_id]
            self._expired[ack_id] = None
        while len(self._expired) > EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)
        # Hold, and let a fetch under way end, before giving them back: the group's other consumers get them
        # rather than this stream (a pull request still open here would take them straight back).
        self._held = True
        await self._not_fetching.wait()
        await self._broker.hold()
        await self._broker.nack(late)

    def _take(self, ack_ids: list[str]) -> tuple[list[IncomingEvent], Ignored | None]:
        # The messages of `ack_ids` out of the outstanding ones, in one loop in C (a message never comes out twice:
        # a second occurrence of an id in `ack_ids` finds nothing, and is ignored).
        taken = list(filter(None, map(self._outstanding.pop, ack_ids, itertools.repeat(None))))
        # The client is alive and settling: the stream may take messages again.
        self._held = False
        self._credit.set()
        if len(taken) == len(ack_ids):
            return taken, None
        found = set(map(_handle, taken))
        ignored: list[str] = []
        for ack_id in ack_ids:
            if ack_id in found:
                found.discard(ack_id)  # its first occurrence took it: any other is ignored
            else:
                ignored.append(ack_id)
        return taken, Ignored(ignored, [ack_id for ack_id in ignored if ack_id in self._expired])

    async def ack(self, ack_ids: list[str]) -> Ignored | None:
        """The client is done with these messages; returns the ids that were not outstanding (ignored)."""
        taken, ignored = self._take(ack_ids)
        if taken:
            # An ack id is its message's handle: when all were outstanding, the ids are the handles to ack.
            await self._broker.ack(ack_ids if ignored is None else list(map(_handle, taken)))
        return ignored

    async def nack(self, ack_ids: list[str], delay_s: float, dead_letter: bool) -> Ignored | None:
        """The client gives these messages back, or sends them to the dead-letter topic; returns the ignored ids."""
        if dead_letter and self._dead_letter is None:
            raise InvalidArgument.field("nack.dead_letter", "this subscription has no dead_letter_event")
        taken, ignored = self._take(ack_ids)
        if dead_letter:
            for message in taken:
                await self._to_dead_letter(message, "nack")
        elif taken:
            await self._broker.nack(list(map(_handle, taken)), delay_s)
        return ignored

    async def undeliverable(self, messages: list[IncomingEvent], limit: int) -> None:
        """Messages of a batch being written that the stream cannot carry: each alone is larger than the largest
        response the stream may send (`limit` bytes; another producer wrote it to the broker, or a payload grew as a
        JSON value). Each goes to the dead-letter topic when the subscription has one (reason `too_large`); else it
        goes back to the group for TOO_LARGE_RETRY_S (kept, not lost: a server allowed larger responses delivers it
        then). Logged either way, for the operator to act on."""
        for message in messages:
            if self._outstanding.pop(message.handle, None) is None:
                continue  # settled meanwhile (its deadline passed)
            where = "sent to the dead-letter topic" if self._dead_letter else f"given back for {TOO_LARGE_RETRY_S:g} s"
            log.warning(
                "message %r (%d bytes of payload, delivery %d) is larger than a Subscribe response may be "
                "(%d bytes): %s",
                message.id[:100], len(message.data), message.delivery_attempt, limit, where,
            )  # fmt: skip
            if self._dead_letter is not None:
                await self._to_dead_letter(message, "too_large")
            else:
                await self._broker.nack([message.handle], TOO_LARGE_RETRY_S)

    async def _release(self, ack_ids: list[str]) -> None:
        outstanding = self._outstanding
        handles = [ack_id for ack_id in ack_ids if outstanding.pop(ack_id, None) is not None]
        if handles:
            await self._broker.release(handles)

    async def close(self) -> None:
        """Give back everything unacked and release the broker-side consumer."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._credit.set()
        self._changed.set()
        written = set(map(_handle, self._writing))
        for _, ack_ids in self._leases:
            written.update(ack_ids)
        seen: list[str] = []
        unseen: list[str] = []
        for ack_id, message in self._outstanding.items():
            (seen if ack_id in written else unseen).append(message.handle)
        self._outstanding.clear()
        self._leases.clear()
        try:
            if seen:
                await self._broker.nack(seen)
            if unseen:
                await self._broker.release(unseen)
        finally:
            await self._broker.close()
