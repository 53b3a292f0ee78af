"""The PubAcks a NATS adapter waits for: each JetStream publish is one HPUB with a reply subject of its own under one
inbox subscription per connection, and its PubAck resolves a future of the broker's id for it (see `nats` on
publishing).

This is what nats-py's `js.publish_async` does, without what it costs for every message and the adapter does not
need: a semaphore acquired through `asyncio.wait_for`, a random read for each reply token, the PubAck parsed with
the standard json module into a dataclass through `dataclasses.fields`. A publish here takes a counter as its token
and reads the PubAck's stream and sequence with orjson: about a fifth of a message's processor CPU less on NATS.

The HPUB itself is written here too (`write`), from the header block `nats_headers.prepared_headers` encoded, and
not through `Client.publish`: that one checks every header name with a regular expression and passes every value
through `str.strip` and `str.translate` (which raises and catches a KeyError in C for each distinct character of
each value), 20 µs of a 270 µs single publish, to guard against values our own encoding already makes safe. `write`
keeps the rest of what `Client.publish` does; it uses the client's command queue and flusher, which are not public
API (`tests/test_broker_nats.py` pins them against nats-py's own publish).
"""

from __future__ import annotations

import asyncio
import functools
import itertools

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from ductape_processor.runtime.policies.deadline import Timeouts

_STATUS = api.Header.STATUS.value
_NO_RESPONDERS = "503"


async def write(nc: NATS, subject: str, reply: str, head: bytes, data: bytes) -> None:
    """What `nc.publish(subject, data, reply, headers)` does, with the headers given as their encoded block (`NATS/1.0`
    line, `name: value` lines, empty line): the same checks and errors, the same HPUB, queued and flushed alike."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    size = len(data)
    if not nc.is_connected and (nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size):
        raise nats.errors.OutboundBufferLimitError  # reconnecting, with no room left to buffer it
    if size > nc.max_payload:
        raise nats.errors.MaxPayloadError
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += size
    head_size = len(head)
    await nc._send_command(
        b"".join((f"HPUB {subject} {reply} {head_size} {head_size + size}\r\n".encode(), head, data, b"\r\n"))
    )
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


class PubAcks:
    """The futures of the PubAcks not in yet, by reply token, which a reconnect gives up (a PUB written before the
    drop never gets one); and the connection whose reply subscription is set up."""

    __slots__ = ("_awaiting", "_lock", "_nc", "_prefix", "_timeouts", "_tokens")

    def __init__(self) -> None:
        self._awaiting: dict[str, asyncio.Future[str]] = {}
        self._nc: NATS | None = None
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._lock = asyncio.Lock()
        self._timeouts = Timeouts()

    async def _subscribe(self, nc: NATS) -> None:
        """The first publish of a connection subscribes the replies' inbox, alone (a second one would race it)."""
        async with self._lock:
            if self._nc is not nc:
                prefix = f"{nc.new_inbox()}."
                await nc.subscribe(f"{prefix}*", cb=self._on_reply)
                self._prefix, self._nc = prefix, nc

    async def send(self, nc: NATS, topic: str, data: bytes, head: bytes) -> asyncio.Future[str]:
        """Write one message (`head`: its encoded header block) and return the future of its broker id
        (`<stream>:<sequence>`, from its PubAck), which forgets its token once done (a batch's way)."""
        if self._nc is not nc:
            await self._subscribe(nc)
        token = str(next(self._tokens))
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._awaiting[token] = future
        future.add_done_callback(functools.partial(self._forget, token))
        try:
            await write(nc, topic, self._prefix + token, head, data)
        except BaseException:
            future.cancel()
            raise
        return future

    async def confirmed(self, nc: NATS, topic: str, data: bytes, head: bytes, timeout: float) -> str:
        """Write one message and wait for its broker id, at most `timeout` seconds (then TimeoutError). A single
        publish's way: its token forgotten here rather than by a done callback (a handle the loop runs), its wait
        limited by `Timeouts` rather than `asyncio.timeout`."""
        if self._nc is not nc:
            await self._subscribe(nc)
        token = str(next(self._tokens))
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._awaiting[token] = future
        try:
            await write(nc, topic, self._prefix + token, head, data)
            return await self._timeouts.within(timeout, future)
        finally:
            self._awaiting.pop(token, None)

    def _forget(self, token: str, _: asyncio.Future[str]) -> None:
        self._awaiting.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._awaiting.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return  # given up, or a reply from before a reconnect
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = orjson.loads(msg.data)
            if "error" in reply:
                nats.js.errors.APIError.from_error(reply["error"])  # raises the error's own type
            else:
                future.set_result(f"{reply['stream']}:{reply['seq']}")
        except nats.js.errors.APIError as refused:
            future.set_exception(refused)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            future.set_exception(nats.errors.Error(f"unreadable PubAck: {exc}"))

    def give_up(self) -> None:
        """The connection came back: fail the PubAcks still awaited as lost, so they are sent again at once instead
        of after their attempt's timeout (JetStream drops a copy that was stored after all, by its id)."""
        for waiting in list(self._awaiting.values()):
            if not waiting.done():
                waiting.set_exception(nats.errors.TimeoutError())


def lost() -> asyncio.Future[str]:
    """A PubAck future that failed as a lost one does (the write itself could not be made: send it again)."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    future.set_exception(nats.errors.TimeoutError())
    return future
