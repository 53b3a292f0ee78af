"""What every servicer reads from a call beside its message's own fields: the context's type, the caller's
deadline, a client stream's opening message, the names a request must give."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.policies import Deadline

Context = grpc.aio.ServicerContext[Any, Any]
MessageT = TypeVar("MessageT", bound=Message)


def deadline(context: Context) -> Deadline:
    """The caller's deadline (none when the call has none)."""
    return Deadline(context.time_remaining())


async def first_message(requests: AsyncIterator[MessageT], kind: str) -> MessageT:
    """A client stream's first message, which must carry `kind` (the member of its `kind` oneof that opens the
    stream); INVALID_ARGUMENT on `kind` otherwise."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgument.field(kind, "the stream ended before its first message") from None
    if first.WhichOneof("kind") != kind:
        raise InvalidArgument.field(kind, f"the first message must carry {kind}")
    return first


def require_target(request: Any, prefix: str = "") -> None:
    """INVALID_ARGUMENT unless the request (or its `prefix` part) names product, env and event."""
    for name in ("product", "env", "event"):
        if not getattr(request, name):
            raise InvalidArgument.field(prefix + name, "is required")
