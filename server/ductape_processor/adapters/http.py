"""HTTP to third-party APIs: one pooled aiohttp session per app environment, bounded and locked to one origin.

A request can only go to the origin (scheme, host, port) of its app environment's `base_url`: the executor builds
the URL from the base URL and an encoded path, this adapter checks the origin again, follows redirects only within
that origin, and refuses response bodies larger than the configured bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from yarl import URL

from ductape_processor.errors import ProcessorError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


class UpstreamUnreachable(ProcessorError):
    """The upstream could not be reached or broke the connection. `sent` tells whether it may have seen the request."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_UNREACHABLE"

    def __init__(self, message: str, *, sent: bool, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.sent = sent


class UpstreamTimeout(ProcessorError):
    """The upstream did not answer within the timeout (or the caller's deadline)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "UPSTREAM_TIMEOUT"


class ResponseTooLarge(ProcessorError):
    """The upstream's response body is larger than the processor accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RESPONSE_TOO_LARGE"


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


class HttpClientPool:
    """Pooled sessions, one per app environment, closed together on shutdown."""

    def __init__(self, *, max_response_bytes: int, connections_per_upstream: int = 100) -> None:
        self._max_response_bytes = max_response_bytes
        self._connections = connections_per_upstream
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, key: str) -> aiohttp.ClientSession:
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._connections, ttl_dns_cache=300, enable_cleanup_closed=True, keepalive_timeout=30
            )
            session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),
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
                if declared is not None:
                    body = await response.content.read()
                    return HttpResponse(
                        status=response.status,
                        headers=list(response.headers.items()),
                        body=body,
                        content_type=response.content_type,
                    )
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
                return HttpResponse(
                    status=response.status,
                    headers=list(response.headers.items()),
                    body=b"".join(chunks),
                    content_type=response.content_type,
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
