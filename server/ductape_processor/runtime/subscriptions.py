"""The subscription engine: credit, batching, ack deadlines, redelivery and dead-lettering, for every broker.

One `Subscription` serves one Subscribe stream. It pulls from the adapter only as much as the stream has credit for
(`max_in_flight` minus what is out unacknowledged), sends a batch when it holds `max_batch` messages or `max_wait`
after the first one, gives messages back to the broker when their ack deadline passes, and sends a message that
was delivered more than `max_deliveries` times to the dead-letter topic instead of to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from ductape_processor.adapters.broker import BrokerSubscription, InboundMessage
from ductape_processor.errors import FieldViolation, InvalidArgument, ProcessorError

log = logging.getLogger(__name__)

FETCH_POLL_S = 0.5
DeadLetter = Callable[[InboundMessage], Awaitable[None]]


class StreamClosing(ProcessorError):
    """The server is shutting down: reconnect, possibly to another replica."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


@dataclass(frozen=True, slots=True)
class Limits:
    """A stream's flow settings, already checked."""

    max_in_flight: int
    max_batch: int
    max_wait_s: float
    ack_deadline_s: float
    max_deliveries: int


@dataclass(slots=True)
class _Outstanding:
    message: InboundMessage
    deadline: float


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
        self._outstanding: dict[str, _Outstanding] = {}
        self._ids = itertools.count(1)
        self._credit = asyncio.Event()
        self._credit.set()
        self._closed = False
        self.delivered = 0

    @property
    def in_flight(self) -> int:
        """Messages sent on the stream and not yet acked or nacked."""
        return len(self._outstanding)

    async def batches(self) -> AsyncIterator[list[tuple[str, InboundMessage]]]:
        """Batches of (ack id, message) to send, honouring credit and batching; ends when closed."""
        limits = self._limits
        while not self._closed:
            await self._expire()
            room = limits.max_in_flight - len(self._outstanding)
            if room <= 0:
                self._credit.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._next_deadline_in()):
                        await self._credit.wait()
                continue
            batch = await self._collect(min(room, limits.max_batch))
            if batch:
                yield batch

    async def _collect(self, wanted: int) -> list[tuple[str, InboundMessage]]:
        limits = self._limits
        taken: list[tuple[str, InboundMessage]] = []
        first = await self._broker.fetch(wanted, min(FETCH_POLL_S, self._next_deadline_in()))
        taken += await self._admit(first)
        if not first:
            return taken
        until = self._clock() + limits.max_wait_s
        while len(taken) < wanted and not self._closed:
            left = until - self._clock()
            if left <= 0:
                break
            more = await self._broker.fetch(wanted - len(taken), left)
            taken += await self._admit(more)
        return taken

    async def _admit(self, messages: list[InboundMessage]) -> list[tuple[str, InboundMessage]]:
        admitted: list[tuple[str, InboundMessage]] = []
        limits = self._limits
        for message in messages:
            if limits.max_deliveries and message.delivery_attempt > limits.max_deliveries and self._dead_letter:
                await self._to_dead_letter(message)
                continue
            ack_id = f"{next(self._ids):x}"
            self._outstanding[ack_id] = _Outstanding(message, self._clock() + limits.ack_deadline_s)
            admitted.append((ack_id, message))
        self.delivered += len(admitted)
        return admitted

    async def _to_dead_letter(self, message: InboundMessage) -> None:
        assert self._dead_letter is not None
        try:
            await self._dead_letter(message)
        except ProcessorError as exc:
            log.warning("dead-letter publish failed (%s); the message will be delivered again", exc.reason)
            await self._broker.nack([message.handle], 1.0)
            return
        await self._broker.ack([message.handle])

    def _next_deadline_in(self) -> float:
        if not self._outstanding:
            return FETCH_POLL_S
        soonest = min(item.deadline for item in self._outstanding.values())
        return max(min(soonest - self._clock(), FETCH_POLL_S), 0.001)

    async def _expire(self) -> None:
        now = self._clock()
        late = [ack_id for ack_id, item in self._outstanding.items() if item.deadline <= now]
        if late:
            handles = [self._outstanding.pop(ack_id).message.handle for ack_id in late]
            await self._broker.nack(handles)
            self._credit.set()

    def _take(self, ack_ids: list[str], field: str) -> list[_Outstanding]:
        unknown = [ack_id for ack_id in ack_ids if ack_id not in self._outstanding]
        if unknown:
            raise InvalidArgument(
                f"{len(unknown)} ack id(s) are not outstanding on this stream (already acked, expired or unknown)",
                reason="ACK_ID_UNKNOWN",
                violations=[FieldViolation(f"{field}.ack_ids", f"{ack_id!r} is not outstanding") for ack_id in unknown],
            )
        taken = [self._outstanding.pop(ack_id) for ack_id in ack_ids]
        self._credit.set()
        return taken

    async def ack(self, ack_ids: list[str]) -> None:
        """The client is done with these messages."""
        taken = self._take(ack_ids, "ack")
        await self._broker.ack([item.message.handle for item in taken])

    async def nack(self, ack_ids: list[str], delay_s: float, dead_letter: bool) -> None:
        """The client gives these messages back, or sends them to the dead-letter topic."""
        if dead_letter and self._dead_letter is None:
            raise InvalidArgument.field("nack.dead_letter", "this subscription has no dead_letter_event")
        taken = self._take(ack_ids, "nack")
        if dead_letter:
            for item in taken:
                await self._to_dead_letter(item.message)
            return
        await self._broker.nack([item.message.handle for item in taken], delay_s)

    async def close(self) -> None:
        """Give back everything unacked and release the broker-side consumer."""
        if self._closed:
            return
        self._closed = True
        self._credit.set()
        handles = [item.message.handle for item in self._outstanding.values()]
        self._outstanding.clear()
        try:
            if handles:
                await self._broker.nack(handles)
        finally:
            await self._broker.close()
