"""One subscriber of a NATS JetStream group: an inbox that receives the answers to its own pull requests (see `nats`
for the design: one request open at a time, within the engine's credit; close lets it end before unsubscribing)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api

from ductape_processor.adapters.brokers.buffer import BufferedSubscription
from ductape_processor.adapters.brokers.nats_deliveries import Repeat
from ductape_processor.adapters.brokers.nats_headers import incoming, message_key
from ductape_processor.runtime.brokers.messages import IncomingEvent

if TYPE_CHECKING:
    from ductape_processor.adapters.brokers.nats import NatsBroker

log = logging.getLogger(__name__)

MIN_PULL_EXPIRES_S = 0.05
PULL_EXPIRES_MAX_S = 0.25
PULL_END_GRACE_S = 0.5
CLOSE_DEADLINE_S = 3.0
RETIRE_AFTER_S = 10.0  # a closed subscriber's inbox stays subscribed this long (see `RetiredInboxes`)

_STATUS = api.Header.STATUS.value
_DESCRIPTION = api.Header.DESCRIPTION.value


class RetiredInboxes:
    """The inboxes of closed subscribers, kept subscribed for RETIRE_AFTER_S and then unsubscribed.

    nats-server before 2.10.16 loses a redelivered message until its ack_wait (counting the lost delivery), and
    before 2.10.14 hands a newer one out a second time with num_delivered 1, when it picks a redelivery for a pull
    request whose inbox has no subscriber (`nats_deliveries` absorbs both; this keeps a closing subscriber from
    causing them). close() waits for its open request to end, but the end it sees can be stale: under load a
    request's expiry status can arrive after the local grace has passed and a newer request was sent, and the
    server counts a request's expiry from when it received it. So the inbox keeps interest well past any request
    it may still have on the server; what reaches it after close is given back at once.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, inbox: NatsSubscription) -> None:
        task = asyncio.get_running_loop().create_task(self._unsubscribe_later(inbox))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _unsubscribe_later(inbox: NatsSubscription) -> None:
        await asyncio.sleep(RETIRE_AFTER_S)
        with contextlib.suppress(Exception):
            await inbox.unsubscribe()

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        """The connection closes: its subscriptions go with it."""
        for task in self._tasks:
            task.cancel()


class NatsPullSubscription(BufferedSubscription[Msg]):
    """One consumer of a group: an inbox that receives the answers to its own pull requests."""

    def __init__(self, adapter: NatsBroker, nc: NATS, consumer: str) -> None:
        super().__init__(adapter.forget)
        self._adapter = adapter
        self._nc = nc
        self._consumer = consumer
        self._next = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{adapter.stream}.{consumer}"
        self._inbox = nc.new_inbox()  # each pull request answers to its own subject below it (`_request`)
        self._requests = itertools.count(1)
        self._reply = ""  # the subject of the latest pull request
        self._sub: NatsSubscription | None = None
        self._request_left = 0  # messages the open pull request may still bring
        self._request_until = 0.0  # when the server expires it (loop time)
        self._request_over = asyncio.Event()
        self._request_over.set()
        self._next_request_at = 0.0
        self._fetching = False
        self._broken = ""
        self._retired = False  # closed: what still reaches the inbox is given back at once
        self._repeats: list[Msg] = []  # copies of messages acked already, met while handing out: acked again

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    def _end_request(self) -> None:
        self._request_left = 0
        self._request_over.set()

    def _request_open(self) -> bool:
        """Whether our pull request may still bring messages: until it is filled or the server said it ended (408
        on expiry), or, should that answer be lost with a dropped connection, a grace period after its expiry.
        Each request answers to its own subject, so the late end of an earlier one (the grace passed first under
        load) is never taken for the end of the latest."""
        if self._request_left > 0 and asyncio.get_running_loop().time() < self._request_until + PULL_END_GRACE_S:
            return True
        self._end_request()
        return False

    async def _request_ended(self) -> None:
        """Wait until the open pull request (if any) ended; it expires within PULL_EXPIRES_MAX_S."""
        if self._request_open():
            left = self._request_until + PULL_END_GRACE_S - asyncio.get_running_loop().time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._request_over.wait()
            self._end_request()

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if self._retired:
            if not status:  # brought by a request the server still had open
                self._note_arrived_unseen([msg])
                with contextlib.suppress(Exception):
                    await msg.nak()
            return
        if status:
            if status == "100":  # idle heartbeat
                return
            if msg.subject != self._reply and status in ("404", "408"):
                return  # the end of an earlier request, which the grace had already ended here
            self._end_request()  # 404 no messages, 408 expired, 409 ended early, 503 nobody answers
            description = msg.headers.get(_DESCRIPTION, "") if msg.headers else ""
            if status == "503" or (status == "409" and "deleted" in description.lower()):
                self._broken = f"consumer {self._consumer!r} is gone ({status} {description or 'no responders'})"
                self._adapter.forget_consumer(self._consumer)  # a new Subscribe creates it again
            elif status not in ("404", "408"):
                log.debug("pull request on %s ended: %s %s", self._consumer, status, description)
                self._next_request_at = asyncio.get_running_loop().time() + 0.2
            self._buffer.wake()
            return
        # A JetStream message carries its own subject, not the request's: it counts against the open request.
        self._request_left -= 1
        if self._request_left <= 0:
            self._end_request()
        if (key := message_key(self._consumer, msg)) is not None:
            self._adapter.deliveries.arrived(key, msg.metadata.num_delivered)
        self._buffer.put(msg)

    async def _request(self, batch: int, expires_s: float) -> None:
        body = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
        self._reply = f"{self._inbox}.{next(self._requests)}"
        self._request_left = batch
        self._request_until = asyncio.get_running_loop().time() + expires_s
        self._request_over.clear()
        try:
            await self._nc.publish(self._next, body, reply=self._reply)
        except nats.errors.ConnectionClosedError as exc:
            self._end_request()
            raise self._adapter.unavailable("fetch: the connection is closed", exc) from exc
        except (nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
            self._end_request()  # the connection is down: fetch returns [] and the engine asks again
        except nats.errors.Error as exc:
            self._end_request()
            raise self._adapter.unavailable("fetch", exc) from exc

    async def fetch(self, max_messages: int, timeout_s: float) -> list[IncomingEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._fetching = True
        try:
            while not self._buffer.ready and not self._closed:
                if self._broken:
                    raise self._adapter.unavailable(self._broken)
                now = loop.time()
                left = deadline - now
                if left <= 0:
                    break
                open_request = self._request_open()
                if not open_request and now >= self._next_request_at and self._nc.is_connected:
                    await self._request(max_messages, min(max(left, MIN_PULL_EXPIRES_S), PULL_EXPIRES_MAX_S))
                    continue
                if self._nc.is_closed:
                    raise self._adapter.unavailable("fetch: the connection is closed")
                if open_request:  # woken by its messages or by the status that ends it
                    wait = min(left, self._request_until + PULL_END_GRACE_S - now)
                elif now < self._next_request_at:
                    wait = min(left, self._next_request_at - now)
                else:
                    wait = left  # disconnected: nothing to ask until the connection is back
                await self._buffer.wait(wait)
        finally:
            self._fetching = False
        if self._closed:
            return []
        events = self._buffer.hand_out(max_messages, self._readable)
        if self._repeats:
            repeats, self._repeats = self._repeats, []
            for msg in repeats:
                with contextlib.suppress(Exception):
                    await msg.ack()
        return events

    async def wait_ready(self, max_messages: int) -> None:
        # Only the open pull request can bring more; once it ended, waiting longer brings nothing.
        while len(self._buffer.ready) < max_messages and not self._closed and self._request_open():
            await self._buffer.wait(self._request_until + PULL_END_GRACE_S - asyncio.get_running_loop().time())

    def _readable(self, handle: str, msg: Msg) -> IncomingEvent | None:
        key = message_key(self._consumer, msg)
        if key is None:  # not a JetStream message (no ack subject): nothing to hand out or ack
            log.warning("dropping a message without JetStream metadata on %s", self._consumer)
            return None
        attempt = self._adapter.deliveries.hand_out(key, msg.metadata.num_delivered)
        if attempt is Repeat.OUT:
            return None  # a copy of one handed out here and not settled: its holder's ack or nack settles it
        if attempt is Repeat.ACKED:
            self._repeats.append(msg)
            return None
        try:
            return incoming(handle, msg, attempt)
        except Exception:  # unreadable headers or metadata: nothing to hand out
            log.warning("dropping an unreadable message on %s", self._consumer)
            self._adapter.deliveries.returned_unseen(key)
            return None

    async def ack(self, handles: list[str]) -> None:
        await self._settle(handles, None)

    async def release(self, handles: list[str]) -> None:
        """A nak, as JetStream has no uncounted return; the adapter remembers it was one (`Deliveries`)."""
        deliveries = self._adapter.deliveries
        for handle in handles:
            msg = self._buffer.held.get(handle)
            if msg is not None and (key := message_key(self._consumer, msg)) is not None:
                deliveries.returned_unseen(key)
        await self.nack(handles)

    def _note_arrived_unseen(self, messages: Iterable[Msg]) -> None:
        for msg in messages:
            key = message_key(self._consumer, msg)
            if key is not None:
                self._adapter.deliveries.arrived_unseen(key)

    async def nack(self, handles: list[str], delay_s: float = 0.0) -> None:
        if not self._fetching:
            # Nobody is fetching (the stream is closing, or waits for credit): let our open pull request end
            # first, so the redelivery goes to the group rather than back into this subscription's request.
            await self._request_ended()
        await self._settle(handles, delay_s)

    async def _settle(self, handles: list[str], delay_s: float | None) -> None:
        failure: BaseException | None = None
        for handle in handles:
            msg = self._buffer.settle(handle)
            if msg is None:
                continue
            key = message_key(self._consumer, msg)
            try:
                if delay_s is None:
                    if key is not None:
                        self._adapter.deliveries.acked(key)
                    await msg.ack()
                else:
                    if key is not None:
                        self._adapter.deliveries.returned(key)
                    await msg.nak(delay=delay_s if delay_s > 0 else None)
            except nats.errors.MsgAlreadyAckdError:
                continue
            except nats.errors.Error as exc:  # the message comes back after ack_wait
                failure = exc
        if failure is not None:
            what = "ack" if delay_s is None else "nack"
            raise self._adapter.unavailable(f"{what} on {self._consumer!r}", failure) from failure

    async def _give_back(self) -> None:
        # No new pull request from here on; the open one ends within PULL_EXPIRES_MAX_S. Waiting for it keeps what it
        # brings counted as this processor's; the inbox itself stays subscribed a while longer (`RetiredInboxes`).
        await self._request_ended()
        self._retired = True
        self._note_arrived_unseen(self._buffer.ready)  # fetched into the processor, never handed out
        for msg in self._buffer.held.values():
            if (key := message_key(self._consumer, msg)) is not None:
                self._adapter.deliveries.returned(key)
        leftovers = self._buffer.drain()
        for msg in leftovers:
            with contextlib.suppress(Exception):
                await msg.nak()
        if leftovers and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=int(CLOSE_DEADLINE_S))
        sub, self._sub = self._sub, None
        if sub is not None:
            self._adapter.retired.add(sub)
