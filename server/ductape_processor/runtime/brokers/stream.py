"""One Subscribe stream's whole life, for every broker: from `ready` to the end of the call.

A stream runs three things at once: the client's acks and nacks (read from its requests), the next batch (fetched
by the subscription engine within the stream's credit), and the engine's lease watch (expiries; a client that
stopped reading). It also ends when the processor shuts down. Acks and nacks for ids that are not outstanding any
more are reported back (`StaleAcks`), never an error. Whichever way it ends, the stream forgets its subscription and
closes it, which gives back every unacked message.

The API layer turns the proto requests into `Ack`/`Nack`, and the `StreamEvent`s into proto responses; nothing here
knows gRPC, except that a stuck stream is ended through the `Abort` the API gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.brokers.subscriptions import (
    Ignored,
    StreamClosing,
    SubscriberNotReading,
    Subscription,
)

MAX_STALE_REPORTED = 10_000  # ids in one StaleAcks notice; more are dropped from the notice (still ignored)
# Characters of ids in one StaleAcks notice (each id at most once more, in `expired_ack_ids`): the ids past it are
# dropped from the notice, as past MAX_STALE_REPORTED, so that a notice fits in a response (4 MiB by default) and a
# client acking long ids it was never given, without reading, cannot grow what the server keeps for it.
MAX_STALE_REPORTED_CHARS = 512 * 1024
MAX_NACK_DELAY_S = 3600.0
FETCHES_AHEAD = 2  # batches a stream asks the engine for at a time (see `_events`)


@dataclass(frozen=True, slots=True)
class Ack:
    """The client is done with these messages."""

    ack_ids: list[str]


@dataclass(frozen=True, slots=True)
class Nack:
    """The client gives these messages back (after `delay_s`), or sends them to the dead-letter topic."""

    ack_ids: list[str]
    delay_s: float = 0.0
    dead_letter: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """The subscription is open: the stream's first response."""

    subscription_id: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Messages to write; the client settles each by its ack id, the message's `handle`."""

    messages: list[IncomingEvent]


@dataclass(slots=True)
class StaleAcks:
    """Ack ids of acks and nacks that were ignored (not outstanding), and those of them whose deadline had passed."""

    ack_ids: list[str] = field(default_factory=list)
    expired_ack_ids: list[str] = field(default_factory=list)


StreamRequest = Ack | Nack
StreamEvent = Ready | Batch | StaleAcks
Abort = Callable[[ProcessorError], Awaitable[None]]
"""Ends the call from outside its handler with this error (a handler stuck in a write cannot raise it)."""


class SubscribeStream:
    """The server side of one Subscribe stream, around its subscription engine."""

    def __init__(
        self, subscription: Subscription, closing: asyncio.Event, forget: Callable[[Subscription], None]
    ) -> None:
        self.subscription = subscription
        self._closing = closing
        self._forget = forget

    async def run(self, requests: AsyncIterator[StreamRequest], abort: Abort) -> AsyncGenerator[StreamEvent]:
        """`Ready`, then batches and stale-ack notices until the client stops sending, the subscription closes, or
        an error ends the stream (raised: a bad request, a broker failure, `StreamClosing` at shutdown)."""
        try:
            yield Ready(subscription_id=secrets.token_hex(8))
            async with contextlib.aclosing(self._events(requests, abort)) as events:
                async for event in events:
                    yield event
        finally:
            self._forget(self.subscription)
            await self.subscription.close()

    async def undeliverable(self, messages: list[IncomingEvent], limit: int) -> None:
        """Messages of the batch being written that are each too large for one response of `limit` bytes: the API
        found them encoding the batch (`Subscription.undeliverable` says where they go)."""
        await self.subscription.undeliverable(messages, limit)

    async def _events(self, requests: AsyncIterator[StreamRequest], abort: Abort) -> AsyncGenerator[StreamEvent]:
        subscription = self.subscription
        stale = StaleAcks()
        stale_chars = 0  # characters of the ids in `stale`
        # One event wakes the loop for whatever happened (a fetch ended, the reader or the watch ended, shutdown,
        # acks to report), and the loop looks at what did: waiting on every worker anew for each batch
        # (`asyncio.wait`) cost more than the rest of the loop.
        wake = asyncio.Event()

        def woken(_: object = None) -> None:
            wake.set()

        def report(ignored: Ignored | None) -> None:
            nonlocal stale_chars
            if ignored is not None and len(stale.ack_ids) < MAX_STALE_REPORTED:
                included = ignored.ack_ids[: MAX_STALE_REPORTED - len(stale.ack_ids)]
                chars = sum(map(len, included))
                if stale_chars + chars > MAX_STALE_REPORTED_CHARS:
                    kept: list[str] = []
                    for ack_id in included:
                        if stale_chars + len(ack_id) <= MAX_STALE_REPORTED_CHARS:
                            stale_chars += len(ack_id)
                            kept.append(ack_id)
                    included = kept
                else:
                    stale_chars += chars
                if not included:
                    return
                stale.ack_ids.extend(included)
                stale.expired_ack_ids.extend(set(ignored.expired).intersection(included))
                wake.set()

        async def read() -> None:
            async for request in requests:
                if isinstance(request, Ack):
                    report(await subscription.ack(request.ack_ids))
                else:
                    if not 0 <= request.delay_s <= MAX_NACK_DELAY_S:
                        raise InvalidArgument.field("nack.delay", "must be between 0 and 1 h")
                    report(await subscription.nack(request.ack_ids, request.delay_s, request.dead_letter))

        async def watch() -> None:
            if await subscription.watch():
                # The handler is stuck in a write the client does not read: end the call from here (the generator
                # is only finalised later, by the garbage collector).
                self._forget(subscription)
                await abort(
                    SubscriberNotReading(
                        f"the stream was not read for {subscription.stall_s:g} s; its messages went back to the group"
                    )
                )

        reader = asyncio.ensure_future(read())
        closing = asyncio.ensure_future(self._closing.wait())
        watcher = asyncio.ensure_future(watch())
        for worker in (reader, closing, watcher):
            worker.add_done_callback(woken)
        # The batches asked for, oldest first: FETCHES_AHEAD at a time, so that the next fetch starts as soon as
        # the one before returns (the engine runs them in turn, within the stream's credit), rather than when this
        # loop has taken that one's batch, which waits for the write before it.
        fetches: deque[asyncio.Future[list[IncomingEvent]]] = deque()

        def ask() -> None:
            while len(fetches) < FETCHES_AHEAD:
                fetch = asyncio.ensure_future(subscription.next_batch())
                fetch.add_done_callback(woken)
                fetches.append(fetch)

        try:
            while True:
                wake.clear()
                ask()
                if stale.ack_ids:
                    response, stale, stale_chars = stale, StaleAcks(), 0
                    yield response
                    continue
                fetching = fetches[0]
                if fetching.done() and not fetching.exception() and fetching.result():
                    batch = fetches.popleft().result()
                    # The batches after it are fetched while this one is written (within the stream's credit,
                    # which counts this one already): a broker's round trips overlap gRPC's write instead of
                    # following it.
                    ask()
                    subscription.writing(batch)
                    yield Batch(batch)
                    subscription.written(batch)
                    continue
                if closing.done():
                    raise StreamClosing("the server is shutting down; reconnect to another replica")
                if fetching.done() or reader.done() or watcher.done():
                    for ended in (reader, fetching):
                        failure = ended.exception() if ended.done() else None
                        if failure is not None:
                            raise failure
                    return  # the client finished sending (or the subscription closed): the stream is over
                await wake.wait()
        finally:
            workers: set[asyncio.Future[Any]] = {reader, closing, watcher, *fetches}
            for pending in workers:
                pending.cancel()
            # Bounded: a driver that swallows a cancellation must not keep the stream (and its status) hanging;
            # the subscription's close() below stops any fetch still running.
            await asyncio.wait(workers, timeout=1.0)
            for pending in workers:
                if pending.done() and not pending.cancelled():
                    pending.exception()  # retrieved: already reported through the stream
