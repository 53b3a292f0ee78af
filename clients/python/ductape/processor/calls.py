"""How every resource client calls the processor: one `Caller` adds the API key, the caller's per-call metadata and
the default deadline, and turns a failed call into a typed error; `ResourceClient` is the base of each facade
(`processor.action`, `processor.database`, ...), holding its service's stub and that caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from ductape.processor.errors import from_rpc_error

Response = TypeVar("Response")

CallMetadata = Mapping[str, str] | Sequence[tuple[str, str]]
"""Metadata for one call: a mapping or (key, value) pairs; keys are case-insensitive (sent in lower case)."""


class Caller:
    """Adds the API key, the caller's per-call metadata and the default timeout to each call; raises typed errors.

    A call whose request or response is a stream of chunks (an upload, a download) gets no default timeout: a large
    file may take longer than any default, so only the caller's own `timeout` bounds it.
    """

    def __init__(self, metadata: Sequence[tuple[str, str]], timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._timeout = timeout

    def metadata(self, extra: CallMetadata | None) -> tuple[tuple[str, str], ...]:
        """The client's metadata with `extra` added; an `extra` key replaces the client's value for that key."""
        if not extra:
            return self._metadata
        pairs = extra.items() if isinstance(extra, Mapping) else extra
        added = tuple((key.lower(), value) for key, value in pairs)
        replaced = {key for key, _ in added}
        return tuple(item for item in self._metadata if item[0] not in replaced) + added

    async def __call__(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        *,
        streamed: bool = False,
    ) -> Response:
        """One call with one response: `request` is a message, or with `streamed` an iterator of them (an upload)."""
        default = None if streamed else self._timeout
        try:
            return await method(request, metadata=self.metadata(metadata), timeout=timeout or default)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def stream(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
    ) -> AsyncIterator[Any]:
        """A server-streaming call's responses as they arrive; the call is cancelled when the caller stops early."""
        call = method(request, metadata=self.metadata(metadata), timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()


class ResourceClient:
    """The base of each resource client: its service's stub, and the caller every method calls it through."""

    _stub: object
    """The service's stub; each subclass names its type."""

    def __init__(self, stub: object, call: Caller) -> None:
        self._stub = stub
        self._call = call
