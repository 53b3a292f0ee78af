"""How every resource client calls the processor: one `Caller` adds the API key, the caller's per-call metadata and
the default deadline, and turns a failed call into a typed error; `ResourceClient` is the base of each facade
(`processor.action`, `processor.database`, ...), holding its service's stub and that caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, TypeVar

import grpc
from ductape.processor.errors import from_rpc_error

Response = TypeVar("Response")
Item = TypeVar("Item")


class Page(Protocol):
    """A page of a list call (AIP-158): the token of the next page, "" on the last."""

    @property
    def next_page_token(self) -> str: ...


PageT = TypeVar("PageT", bound=Page)

CallMetadata = Mapping[str, str] | Sequence[tuple[str, str]]
"""Metadata for one call: a mapping or (key, value) pairs; keys are case-insensitive (sent in lower case)."""


class RunOptions(TypedDict, total=False):
    """How one execution runs: the keywords `action.run` and `database.execute` share, sent as the request fields
    of the same names. `cache` is a cache's tag (a fresh stored result is served, else this one is stored);
    `retries` overrides the policy's retry count (0: none); `version` is the product version to run (0: the one
    pinned for the environment); `idempotency_key` makes a repeated call return the first result."""

    cache: str
    retries: int | None
    version: int
    idempotency_key: str


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


async def every_item(
    fetch: Callable[[str], Awaitable[PageT]], items: Callable[[PageT], Iterable[Item]]
) -> AsyncIterator[Item]:
    """Every item of a paged list, in order: `fetch(page_token)` gets a page ("" the first), `items` its items."""
    token = ""
    while True:
        page = await fetch(token)
        for item in items(page):
            yield item
        token = page.next_page_token
        if not token:
            return
