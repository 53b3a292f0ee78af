"""HTTP to third-party APIs: one pooled aiohttp session per app environment, bounded and locked to one origin.

A request can only go to the origin (scheme, host, port) of its app environment's `base_url`: the executor builds
the URL from the base URL and an encoded path, this adapter checks the origin again, follows redirects only within
that origin, and refuses response bodies larger than the configured bound.

Nothing ambiguous goes onto a pooled connection, and no connection that may be out of step is reused: every header
name must be an RFC 9110 token outside the framing and hop-by-hop list and every value free of control characters
(`encoding.header_name_problem` and `header_value_problem`, checked by the executor with the caller's field names and
here again before sending); a connection is closed instead of pooled after any answer whose end it cannot be sure of
(see `_must_close`), and an idle pooled connection on which the upstream sent anything unasked is dropped, never read
by the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import grpc
from aiohttp.abc import AbstractResolver
from yarl import URL

from ductape_processor.adapters.http.encoding import header_field, header_name_problem, header_value_problem
from ductape_processor.errors import InvalidArgument, ProcessorError, Unavailable
from ductape_processor.reasons import Reason

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024

CLOSE_AFTER_STATUSES: Final = frozenset({400, 408, 411, 413, 414, 417, 431, 501, 505})
"""Answers meaning the upstream may not have read the request the way it was framed: its connection is not reused."""


class UpstreamUnreachable(Unavailable, reason=Reason.UPSTREAM_UNREACHABLE):
    """The upstream could not be reached or broke the connection. `sent` tells whether it may have seen the request."""

    def __init__(self, message: str, *, sent: bool, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.sent = sent


class UpstreamTimeout(ProcessorError, code=grpc.StatusCode.DEADLINE_EXCEEDED, reason=Reason.UPSTREAM_TIMEOUT):
    """The upstream did not answer within the timeout (or the caller's deadline)."""


class ResponseTooLarge(
    ProcessorError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason=Reason.UPSTREAM_RESPONSE_TOO_LARGE
):
    """The upstream's response body is larger than the processor accepts."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request ready to send."""

    method: str
    url: URL
    headers: Mapping[str, str]
    query: list[tuple[str, str]]
    data: bytes | aiohttp.FormData | None = None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What the upstream answered."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    content_type: str

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive)."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


def _text(raw: bytes) -> str:
    # RFC 9110 allows obs-text (bytes 0x80-0xFF) in field values without naming a charset: UTF-8 when the bytes
    # are UTF-8, else ISO-8859-1 (every byte is a character), so any answer can be handed on as text.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _must_close(method: str, response: aiohttp.ClientResponse) -> bool:
    """True when the connection may be out of step after this answer, so it must not carry another request.

    That is an answer the upstream sends when it may not have read the request as framed (CLOSE_AFTER_STATUSES),
    or a body delimited by the connection's end (no Content-Length, not chunked). aiohttp already closes after
    answers it cannot parse, bodies not read to their end (errors, timeouts, cancelled calls) and `Connection:
    close`; saying so here too costs nothing and does not depend on that.
    """
    if response.status in CLOSE_AFTER_STATUSES:
        return True
    if method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return False
    chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
    return response.content_length is None and not chunked


class _GuardedResponse(aiohttp.ClientResponse):
    """A response that marks its connection not to be reused when `_must_close` says so."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        # Taken before `start`: aiohttp pools the connection as soon as the body has ended, which for a small body
        # is inside `start`. A pooled connection marked here is dropped by `_GuardedConnector` instead of reused.
        protocol = connection.protocol
        started = await super().start(connection)
        if protocol is not None and _must_close(self.method, self):
            protocol.force_close()
        return started


class _GuardedConnector(aiohttp.TCPConnector):
    """A connector that never hands out an idle connection on which the upstream sent something unasked.

    aiohttp parses bytes that arrive on an idle pooled connection and queues them, and the next request on that
    connection reads them as its own answer: one caller's response (or a smuggled one) would reach another caller.
    Such a connection reports `should_close` (queued data, a tail, EOF or an error); it is closed here instead.
    """

    async def _get(self, key: Any, traces: Any) -> Any:
        idle = self._conns.get(key)
        if idle:
            for entry in [entry for entry in idle if entry[0].should_close]:
                idle.remove(entry)
                entry[0].close()
            if not idle:
                del self._conns[key]
        return await super()._get(key, traces)


class HttpClientPool:
    """Pooled sessions, one per app environment, closed together on shutdown."""

    def __init__(
        self,
        *,
        max_response_bytes: int,
        connections_per_upstream: int = 100,
        resolver: Callable[[], AbstractResolver] | None = None,
    ) -> None:
        """`resolver`: makes each session's name resolver (webhook deliveries refuse private addresses with one)."""
        self._max_response_bytes = max_response_bytes
        self._connections = connections_per_upstream
        self._resolver = resolver
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, key: str) -> aiohttp.ClientSession:
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = _GuardedConnector(
                limit=self._connections,
                ttl_dns_cache=300,
                enable_cleanup_closed=True,
                keepalive_timeout=30,
                resolver=self._resolver() if self._resolver is not None else None,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                response_class=_GuardedResponse,
                timeout=aiohttp.ClientTimeout(total=None),  # `send` bounds each exchange with one asyncio timeout
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "ductape-processor"},
            )
            self._sessions[key] = session
        return session

    async def send(self, key: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Send `request` on the session of `key`; follow same-origin redirects; bound the whole exchange."""
        if timeout_s <= 0:
            raise UpstreamTimeout("no time left before the caller's deadline")
        for name, value in request.headers.items():
            problem = header_name_problem(name) or header_value_problem(value)
            if problem is not None:
                raise InvalidArgument.field(header_field("headers", name), problem)
        origin = request.url.origin()
        method, url, data, query = request.method, request.url, request.data, request.query
        session = self._session(key)
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    response = await self._exchange(session, method, url, request.headers, query, data)
                    location = response.header("Location") if response.status in REDIRECT_STATUSES else None
                    if location is None:
                        return response
                    target = url.join(URL(location))
                    if target.origin() != origin:
                        return response  # never follow to another host: the caller sees the redirect itself
                    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                        method, data = "GET", None
                    url, query = target, []
                return response
        except TimeoutError:
            raise UpstreamTimeout(
                f"{origin} did not answer within {timeout_s:.3f}s", metadata={"upstream": str(origin)}
            ) from None

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        query: list[tuple[str, str]],
        data: Any,
    ) -> HttpResponse:
        where = {"upstream": str(url.origin())}
        try:
            async with session.request(
                method, url, headers=headers, params=query or None, data=data, allow_redirects=False
            ) as response:
                declared = response.content_length
                if declared is not None and declared > self._max_response_bytes:
                    raise ResponseTooLarge(
                        f"the upstream's response ({declared} bytes) is larger than {self._max_response_bytes} bytes",
                        metadata=where,
                    )
                # Counted as read even when a length was declared: the content arrives decompressed, so a small
                # gzip body (honest Content-Length) can inflate far past the limit.
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self._max_response_bytes:
                        raise ResponseTooLarge(
                            f"the upstream's response is larger than {self._max_response_bytes} bytes",
                            metadata=where,
                        )
                    chunks.append(chunk)
                body = b"".join(chunks)
                return HttpResponse(
                    status=response.status,
                    headers=[(_text(name), _text(value)) for name, value in response.raw_headers],
                    body=body,
                    content_type=_text(response.content_type.encode("utf-8", "surrogateescape")),
                )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(
                f"cannot connect to {url.origin()}: {exc.os_error}", sent=False, metadata=where
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnreachable(f"connecting to {url.origin()} timed out", sent=False, metadata=where) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamUnreachable(
                f"{url.origin()} broke the connection: {type(exc).__name__}", sent=True, metadata=where
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise UpstreamUnreachable(
                f"{url.origin()} sent an invalid response: {exc.message}", sent=True, metadata=where
            ) from None

    async def close(self) -> None:
        """Close every session."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.close()
