"""The PubAcks a NATS adapter waits for: messages written with `js.publish_async`, each answered by a future of its
PubAck (see `nats` on publishing)."""

from __future__ import annotations

import asyncio

import nats.errors
from nats.js import JetStreamContext, api


class PubAcks:
    """The futures of the PubAcks not in yet, which a reconnect gives up (a PUB written before the drop never gets
    one), and the one JetStream context whose publish_async reply subscription is set up."""

    __slots__ = ("_awaiting", "_lock", "_replies_for")

    def __init__(self) -> None:
        self._awaiting: set[asyncio.Future[api.PubAck]] = set()
        self._replies_for: JetStreamContext | None = None
        self._lock = asyncio.Lock()

    async def send(
        self, js: JetStreamContext, topic: str, data: bytes, headers: dict[str, str]
    ) -> asyncio.Future[api.PubAck]:
        """Write one message and return the future of its PubAck. The first publish of a connection sets up the
        reply subscription, alone: nats-py sets it up on a first call without a lock, and two first calls
        interleaved there would lose each other's futures."""
        if self._replies_for is not js:
            async with self._lock:
                if self._replies_for is not js:
                    future = await js.publish_async(topic, data, headers=headers)
                    self._replies_for = js
                    return self._awaited(future)
        return self._awaited(await js.publish_async(topic, data, headers=headers))

    def _awaited(self, future: asyncio.Future[api.PubAck]) -> asyncio.Future[api.PubAck]:
        self._awaiting.add(future)
        future.add_done_callback(self._awaiting.discard)
        return future

    def give_up(self) -> None:
        """The connection came back: fail the PubAcks still awaited as lost, so they are sent again at once instead
        of after their attempt's timeout (JetStream drops a copy that was stored after all, by its id)."""
        for waiting in list(self._awaiting):
            if not waiting.done():
                waiting.set_exception(nats.errors.TimeoutError())


def lost() -> asyncio.Future[api.PubAck]:
    """A PubAck future that failed as a lost one does (the write itself could not be made: send it again)."""
    future: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
    future.set_exception(nats.errors.TimeoutError())
    return future
