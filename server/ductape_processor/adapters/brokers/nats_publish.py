"""The PubAcks a NATS adapter waits for: each JetStream publish is one PUB with a reply subject of its own under one
inbox subscription per connection, and its PubAck resolves a future of the broker's id for it (see `nats` on
publishing).

This is what nats-py's `js.publish_async` does, without what it costs for every message and the adapter does not
need: a semaphore acquired through `asyncio.wait_for`, a random read for each reply token, the PubAck parsed with
the standard json module into a dataclass through `dataclasses.fields`. A publish here takes a counter as its token
and reads the PubAck's stream and sequence with orjson: about a fifth of a message's processor CPU less on NATS.
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

_STATUS = api.Header.STATUS.value
_NO_RESPONDERS = "503"


class PubAcks:
    """The futures of the PubAcks not in yet, by reply token, which a reconnect gives up (a PUB written before the
    drop never gets one); and the connection whose reply subscription is set up."""

    __slots__ = ("_awaiting", "_lock", "_nc", "_prefix", "_tokens")

    def __init__(self) -> None:
        self._awaiting: dict[str, asyncio.Future[str]] = {}
        self._nc: NATS | None = None
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._lock = asyncio.Lock()

    async def send(self, nc: NATS, topic: str, data: bytes, headers: dict[str, str]) -> asyncio.Future[str]:
        """Write one message and return the future of its broker id (`<stream>:<sequence>`, from its PubAck). The
        first publish of a connection subscribes the replies' inbox, alone (a second one would race it)."""
        if self._nc is not nc:
            async with self._lock:
                if self._nc is not nc:
                    prefix = f"{nc.new_inbox()}."
                    await nc.subscribe(f"{prefix}*", cb=self._on_reply)
                    self._prefix, self._nc = prefix, nc
        token = str(next(self._tokens))
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._awaiting[token] = future
        future.add_done_callback(functools.partial(self._forget, token))
        try:
            await nc.publish(topic, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

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
