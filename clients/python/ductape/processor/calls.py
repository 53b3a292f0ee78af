"""How every resource client calls the processor: one `Caller` adds the API key, the caller's per-call metadata and
the default deadline, and turns a failed call into a typed error; `ResourceClient` is the base of each facade
(`processor.action`, `processor.database`, ...), holding its service's stub and that caller."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, TypeVar

import grpc
from ductape.processor.errors import ProcessorError, from_rpc_error

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


STATUS_LOST = (
    "the server ended the call before reading the whole request stream, and grpc.aio lost the status it gave "
    "(grpc/grpc#36066); nothing was kept: repeat the call to see the server's reason"
)


def status_lost(exc: grpc.aio.AioRpcError) -> bool:
    """True when grpc.aio reports INTERNAL "Internal error from Core" for a request message it could not write
    because the server had already ended the call: the status the server ended it with (an error: a call that reads
    a stream answers only at its end) is lost (grpc/grpc#36066)."""
    return (
        exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == "Internal error from Core"
        and '"execute_batch"' in (exc.debug_error_string() or "")
    )


RETRY_FIRST_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 1.0


def retry_delay(attempt: int) -> float:
    """The pause before retry `attempt` (1, 2, ...): 50 ms doubling up to 1 s, with full jitter."""
    return random.uniform(0, min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (attempt - 1)))  # noqa: S311 - jitter


class Caller:
    """Adds the API key, the caller's per-call metadata and the default timeout to each call; raises typed errors.

    A call whose request or response is a stream of chunks (an upload, a download) gets no default timeout: a large
    file may take longer than any default, so only the caller's own `timeout` bounds it.

    A call that is safe to repeat is retried when it fails with UNAVAILABLE (the server was restarting, a
    connection dropped, a store blip, an idempotent action whose outcome is not known yet), up to `retries` more
    times, with jittered backoff, within the call's one timeout: reads (get, list, verify, status, plan, validate,
    apply of a manifest, a signed URL) and every call that carries an `idempotency_key`. Other calls are never
    repeated: UNAVAILABLE does not say whether the server acted.
    """

    def __init__(self, metadata: Sequence[tuple[str, str]], timeout: float | None, retries: int = 3) -> None:
        self._metadata = tuple(metadata)
        self._timeout = timeout
        self._retries = retries

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
        safe: bool = False,
    ) -> Response:
        """One call with one response: `request` is a message, or with `streamed` an iterator of them (an upload),
        or a function that makes that iterator anew, which lets the call be repeated once when grpc.aio lost the
        server's status (see `status_lost`). `safe`: the call may be repeated (a read); a request with an
        `idempotency_key` always may."""
        if streamed:
            return await self._streamed(method, request, timeout, self.metadata(metadata))
        repeatable = self._retries > 0 and (safe or bool(getattr(request, "idempotency_key", "")))
        loop = asyncio.get_running_loop()
        budget = timeout or self._timeout
        deadline = loop.time() + budget if budget else None
        sent = self.metadata(metadata)
        attempt = 0
        unavailable: grpc.aio.AioRpcError | None = None
        while True:
            left = deadline - loop.time() if deadline is not None else None
            try:
                return await method(request, metadata=sent, timeout=left)
            except grpc.aio.AioRpcError as exc:
                if unavailable is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise from_rpc_error(unavailable) from None  # the timeout ran out retrying: say why it failed
                unavailable = exc
                attempt += 1
                pause = retry_delay(attempt)
                if (
                    not repeatable
                    or exc.code() != grpc.StatusCode.UNAVAILABLE
                    or attempt > self._retries
                    or (deadline is not None and loop.time() + pause >= deadline)
                ):
                    raise from_rpc_error(exc) from None
            await asyncio.sleep(pause)

    async def _streamed(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout: float | None, sent: Any
    ) -> Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        replays = 1 if callable(request) else 0
        while True:
            left = deadline - loop.time() if deadline is not None else None
            try:
                return await method(request() if callable(request) else request, metadata=sent, timeout=left)
            except grpc.aio.AioRpcError as exc:
                if not status_lost(exc):
                    raise from_rpc_error(exc) from None
                if replays == 0:
                    raise ProcessorError(grpc.StatusCode.UNKNOWN, STATUS_LOST) from None
                replays -= 1  # the server ended the call before the end of the stream: it kept nothing

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
