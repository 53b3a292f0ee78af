"""HTTP to third-party APIs: pooled HTTP/1.1 connections per app environment, bounded and locked to one origin.

A request can only go to the origin (scheme, host, port) of its app environment's `base_url`: the executor builds
the URL from the base URL and an encoded path, this adapter checks the origin again, follows redirects only within
that origin, and refuses response bodies larger than the configured bound.

Nothing ambiguous goes onto a pooled connection, and no connection that may be out of step is reused: every header
name must be an RFC 9110 token outside the framing and hop-by-hop list and every value free of control characters
(`encoding.header_name_problem` and `header_value_problem`, checked by the executor with the caller's field names and
here again before sending); the connections themselves (`connection.py`) are closed instead of pooled after any
answer whose end they cannot be sure of, and after anything the upstream sent unasked.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

import grpc
from yarl import URL

from ductape_processor.adapters.http.connection import (
    BodyTooLarge,
    ConnectFailed,
    ExchangeFailed,
    OriginPool,
    Resolve,
)
from ductape_processor.adapters.http.encoding import (
    header_field,
    header_name_problem,
    header_value_problem,
    request_line_problem,
)
from ductape_processor.errors import InvalidArgument, ProcessorError, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.records import record

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT: Final = "ductape-processor"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_DEFAULT_HEADERS: Final = (("user-agent", "User-Agent", USER_AGENT), ("accept", "Accept", "*/*"))
_ACCEPT_ENCODING: Final = "gzip, deflate"
"""What the processor asks compressed answers in: what it can decompress (and bound) itself."""
_DEFAULT_LINES: Final = "\r\n".join(
    [*(f"{name}: {value}" for _, name, value in _DEFAULT_HEADERS), f"Accept-Encoding: {_ACCEPT_ENCODING}"]
)
"""The header lines a request without headers of its own gets (those of `_DEFAULT_HEADERS` and Accept-Encoding)."""
_QUERY_SAFE: Final = "-._~!$'()*,;:@/?"
"""Left as they are in a query name or value: unreserved and sub-delimiters but `&`, `=` and `+` (RFC 3986)."""


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


@record
class HttpRequest:
    """A request ready to send."""

    method: str
    url: URL
    headers: Mapping[str, str]
    query: list[tuple[str, str]]
    data: bytes | None = None


@record
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


class HttpClientPool:
    """Pooled connections per app environment (and origin), closed together on shutdown."""

    def __init__(
        self,
        *,
        max_response_bytes: int,
        connections_per_upstream: int = 100,
        resolve: Resolve | None = None,
    ) -> None:
        """`resolve`: the addresses to connect to for a host (webhook deliveries keep only public ones with it)."""
        self._max_response_bytes = max_response_bytes
        self._connections = connections_per_upstream
        self._resolve = resolve
        self._pools: dict[tuple[str, str, str, int], OriginPool] = {}
        self._tls: ssl.SSLContext | None = None
        # The loop the pools were made in (their connections belong to it), kept: `asyncio.get_running_loop()`
        # checks the process id, a getpid system call each time. A new loop (tests run several) is asked again.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _pool(self, key: str, scheme: str, host: str, port: int) -> OriginPool:
        pool = self._pools.get((key, scheme, host, port))
        if pool is None:
            if scheme == "https" and self._tls is None:
                self._tls = ssl.create_default_context()
            pool = OriginPool(
                scheme,
                host,
                port,
                limit=self._connections,
                max_body=self._max_response_bytes,
                resolve=self._resolve,
                tls=self._tls,
            )
            self._pools[(key, scheme, host, port)] = pool
        return pool

    async def send(self, key: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Send `request` on the connections of `key`; follow same-origin redirects; bound the whole exchange."""
        if timeout_s <= 0:
            raise UpstreamTimeout("no time left before the caller's deadline")
        line_problem = request_line_problem(request.method, request.url)
        if line_problem is not None:
            raise InvalidArgument.field(*line_problem)
        for name, value in request.headers.items():
            problem = header_name_problem(name) or header_value_problem(value)
            if problem is not None:
                raise InvalidArgument.field(header_field("headers", name), problem)
        method, url, data, query = request.method, request.url, request.data, request.query
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s  # one bound over every exchange and redirect
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = await self._exchange(key, method, url, request.headers, query, data, deadline)
                location = response.header("Location") if response.status in REDIRECT_STATUSES else None
                if location is None:
                    return response
                try:
                    target = url.join(URL(location))
                except ValueError:  # not a URL (`http://[::1`, a port out of range): the caller sees the redirect
                    return response
                if target.origin() != request.url.origin():
                    return response  # never follow to another host: the caller sees the redirect itself
                if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                    method, data = "GET", None
                url, query = target, []
            return response
        except TimeoutError:
            origin = request.url.origin()
            raise UpstreamTimeout(
                f"{origin} did not answer within {timeout_s:.3f}s", metadata={"upstream": str(origin)}
            ) from None

    async def _exchange(
        self,
        key: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        query: list[tuple[str, str]],
        data: bytes | None,
        deadline: float,
    ) -> HttpResponse:
        scheme, host = url.scheme, url.raw_host or ""
        port = url.port or _DEFAULT_PORTS.get(scheme, 80)
        if scheme not in _DEFAULT_PORTS or not host:
            raise UpstreamUnreachable(f"cannot send to {url.origin()}: not an http(s) URL", sent=False)
        try:
            answer = await self._pool(key, scheme, host, port).exchange(
                method, _framed(method, url, host, port, headers, query, data), deadline
            )
        except ConnectFailed as exc:
            where = {"upstream": str(url.origin())}
            raise UpstreamUnreachable(f"cannot connect to {url.origin()}: {exc}", sent=False, metadata=where) from None
        except ExchangeFailed as exc:
            where = {"upstream": str(url.origin())}
            raise UpstreamUnreachable(f"{url.origin()}: {exc}", sent=True, metadata=where) from None
        except BodyTooLarge as exc:
            where = {"upstream": str(url.origin())}
            size = f" ({exc.declared} bytes)" if exc.declared is not None else ""
            raise ResponseTooLarge(
                f"the upstream's response{size} is larger than {self._max_response_bytes} bytes", metadata=where
            ) from None
        # Names are tokens (llhttp refuses others): ASCII, which latin-1 decodes as UTF-8 would, without the fallback.
        # Values are most often UTF-8 all of them: decoded in one go, and one by one (`_text`) only when one is not.
        try:
            fields = [(name.decode("latin-1"), value.decode("utf-8")) for name, value in answer.headers]
        except UnicodeDecodeError:
            fields = [(name.decode("latin-1"), _text(value)) for name, value in answer.headers]
        return HttpResponse(answer.status, fields, answer.body, _content_type(fields))

    async def close(self) -> None:
        """Close every connection."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def _framed(
    method: str,
    url: URL,
    host: str,
    port: int,
    headers: Mapping[str, str],
    query: list[tuple[str, str]],
    data: bytes | None,
) -> bytes:
    """The request's bytes: request line, headers (the processor's framing ones, then the request's), body."""
    target = url.raw_path or "/"
    extra = "&".join(f"{quote(k, safe=_QUERY_SAFE)}={quote(v, safe=_QUERY_SAFE)}" for k, v in query) if query else ""
    raw_query = url.raw_query_string
    if raw_query or extra:
        target += "?" + "&".join(part for part in (raw_query, extra) if part)
    authority = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS.get(url.scheme):
        authority += f":{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    if headers:
        given = {name.lower() for name in headers}
        lines += [f"{name}: {value}" for lowered, name, value in _DEFAULT_HEADERS if lowered not in given]
        if "accept-encoding" not in given:
            lines.append(f"Accept-Encoding: {_ACCEPT_ENCODING}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
    else:
        lines.append(_DEFAULT_LINES)  # no headers of the request's own: the processor's, spelled once
    if data is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(data or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + data if data else head


def _content_type(fields: list[tuple[str, str]]) -> str:
    """The answer's media type, lower-cased, without parameters (`application/octet-stream` when it names none)."""
    for name, value in fields:
        if name.lower() == "content-type":
            media = value.split(";", 1)[0].strip().lower()
            return media if "/" in media else "text/plain"
    return "application/octet-stream"
