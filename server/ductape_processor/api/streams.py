"""The glue of the Subscribe-style streams (BrokerService.Subscribe, WebhookService.Receive): their acks and nacks
as the runtime takes them, and ending a call from outside its handler."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ductape_processor.api.calls import Context
from ductape_processor.api.status import error_trailers
from ductape_processor.api.values import seconds
from ductape_processor.errors import InvalidArgument, ProcessorError
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


def aborter(context: Context) -> Abort:
    """Ends the call of `context` with an error, from outside its handler (a handler stuck in a write)."""

    async def abort(error: ProcessorError) -> None:
        call = current_call.get()
        code, message, trailers = error_trailers(error, call.request_id if call is not None else "")
        with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
            await context.abort(code, message, trailing_metadata=trailers)

    return abort
