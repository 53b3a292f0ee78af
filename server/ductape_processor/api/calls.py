"""What every servicer reads from a call beside its message's own fields: the context's type, the caller's
deadline, a client stream's opening message, the names a request must give, the options of a call that runs a
resource."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, TypedDict, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from ductape_processor.api.values import pinned_version, required, session_pair
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


class ProductEnv(TypedDict):
    """The product and environment a request names, to pass on with `**`."""

    product: str
    env: str


def product_env(request: Any, prefix: str = "") -> ProductEnv:
    """The request's (or its `prefix` part's) `product` and `env`; INVALID_ARGUMENT on the first one missing."""
    return ProductEnv(
        product=required(request.product, prefix + "product", "the product's tag"),
        env=required(request.env, prefix + "env", "the environment's slug or name"),
    )


class CallOptionFields(TypedDict):
    """A request's `CallOptions` (`runtime/options.py`), to pass on with `**` into the call's record."""

    session: tuple[str, str] | None
    retries: int | None
    version: int | None
    idempotency_key: str


@functools.cache
def _has_retries(descriptor: Descriptor) -> bool:
    # Once per message type: `fields_by_name` builds a mapping on every read.
    return "retries" in descriptor.fields_by_name


def call_options(request: Any) -> CallOptionFields:
    """The options of a request that runs a resource: its `session`, `retries` (when the request has the field and
    sets it), `version` and `idempotency_key`; INVALID_ARGUMENT for a session without tag or token, or a negative
    version."""
    has_retries = _has_retries(request.DESCRIPTOR) and request.HasField("retries")
    return CallOptionFields(
        session=session_pair(request),
        retries=request.retries if has_retries else None,
        version=pinned_version(request.version),
        idempotency_key=request.idempotency_key,
    )
