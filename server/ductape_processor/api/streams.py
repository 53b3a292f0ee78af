"""The glue of the Subscribe-style streams (BrokerService.Subscribe, WebhookService.Receive): their acks and nacks
as the runtime takes them, and ending a call from outside its handler (also a download nobody reads)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from ductape_processor.api.calls import Context
from ductape_processor.api.status import error_trailers
from ductape_processor.api.values import seconds
from ductape_processor.errors import InvalidArgument, ProcessorError
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.brokers.stream import Abort, Ack, Nack, StreamRequest
from ductape_processor.telemetry.context import current_call


async def acks_and_nacks(requests: AsyncIterator[Any]) -> AsyncIterator[StreamRequest]:
    """A stream's acks and nacks after its init (each request's `kind` oneof: `ack`, `nack`; `init` only first)."""
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "ack":
            yield Ack(request.ack.ack_ids[:])  # a list made in C (`list()` iterates the field: ~120 more an id)
        elif kind == "nack":
            delay = seconds(request.nack.delay) if request.nack.HasField("delay") else 0.0
            yield Nack(list(request.nack.ack_ids), delay, request.nack.dead_letter)
        elif kind == "init":
            raise InvalidArgument.field("init", "a stream takes init only once, as its first request")
        else:
            raise InvalidArgument.field("kind", "a request must carry init, ack or nack")


DEFAULT_MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
"""The largest Subscribe (or Receive) response when the server gives none: gRPC's own default limit on a message,
which the server's `max_message_bytes` keeps by default (a client's receive limit is the same unless it raised it)."""
Response = TypeVar("Response", bound=Message | bytes)


def batch_responses(
    messages: list[IncomingEvent],
    encode: Callable[[list[IncomingEvent]], Response],
    limit: int,
    too_large: list[IncomingEvent],
) -> Iterator[Response]:
    """A batch as responses of at most `limit` bytes each (the server's send limit), in its order: `encode(messages)`
    (nearly always), or, when the batch encodes to more (large payloads, many of them), its halves, split again until
    each fits. A message that alone is larger is left out of the responses and added to `too_large`, for the stream
    to send elsewhere (`SubscribeStream.undeliverable`): gRPC would refuse to send it and end the call, and the next
    stream of the group would get it again."""
    response = encode(messages)
    size = len(response) if isinstance(response, bytes) else response.ByteSize()
    if size <= limit:
        yield response
    elif len(messages) == 1:
        too_large.append(messages[0])
    else:
        half = len(messages) // 2
        yield from batch_responses(messages[:half], encode, limit, too_large)
        yield from batch_responses(messages[half:], encode, limit, too_large)


def aborter(context: Context) -> Abort:
    """Ends the call of `context` with an error, from outside its handler (a handler stuck in a write)."""

    async def abort(error: ProcessorError) -> None:
        call = current_call.get()
        code, message, trailers = error_trailers(error, call.request_id if call is not None else "")
        with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
            await context.abort(code, message, trailing_metadata=trailers)

    return abort


class WriteWatch:
    """Watches a server stream's writes for a client that stopped reading: a write still pending after `limit_s`
    runs `stalled` (which ends the call and lets go of what the handler holds: gRPC keeps a handler in such a write,
    with its open files, for as long as the client keeps the connection). Looks four times per `limit_s`; `stop`
    when the stream is over."""

    def __init__(self, limit_s: float, stalled: Callable[[], Awaitable[None]]) -> None:
        self._limit_s = limit_s
        self._stalled = stalled
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the pending write began; None between writes
        self._task = asyncio.ensure_future(self._watch())

    def writing(self) -> None:
        """A response is handed to gRPC."""
        self._since = self._loop.time()

    def written(self) -> None:
        """gRPC took it."""
        self._since = None

    def stop(self) -> None:
        self._task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._limit_s / 4)
            since = self._since
            if since is not None and self._loop.time() - since >= self._limit_s:
                await self._stalled()
                return
