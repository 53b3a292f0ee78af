"""HTTP/1.1 to one origin: keep-alive connections on asyncio transports, parsed by llhttp, pooled and bounded.

Why not a general HTTP client: an action's call spends most of its own CPU in the client (aiohttp cost about four
times the bare exchange here: bench/README.md), and the processor needs a small part of one, HTTP/1.1 to a fixed
origin, with its guards built in rather than bolted on. The parsing is llhttp's (through httptools, as uvicorn
uses it), strict: a response with two Content-Lengths, or Content-Length beside chunked, is refused.

One exchange at a time per connection, no pipelining. A connection is never reused when its next answer might not
be its own: after an answer whose end it cannot be sure of (delimited by the connection's end, a HEAD, a status
meaning the upstream may have misread the request: CLOSE_AFTER_STATUSES, `Connection: close`), after an answer that
came before the request was all written, after bytes the upstream sent beyond the answer or while the connection was
idle, after a cancelled or failed exchange. What the upstream sends is bounded: the head (status line and headers,
interim answers included) and the body, counted after decompression; a compressed body must end its stream.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import zlib
from collections.abc import Awaitable, Callable
from typing import Final, cast

import httptools

CLOSE_AFTER_STATUSES: Final = frozenset({400, 408, 411, 413, 414, 417, 431, 501, 505})
"""Answers meaning the upstream may not have read the request the way it was framed: its connection is not reused."""
MAX_HEAD_BYTES: Final = 65_536
"""Bytes of an answer's status line and headers, together."""
KEEPALIVE_S: Final = 30.0
"""An idle connection is closed after this long."""
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods sent again, once, on a new connection when a reused one closed before answering anything (the upstream
closed it while idle, as the request went out): the usual keep-alive race."""

Resolve = Callable[[str, int], Awaitable[list[str]]]
"""Addresses to connect to for a host and port (the webhooks' resolver keeps only public ones)."""


class ConnectFailed(Exception):
    """No connection could be made (the request was not sent)."""


class ExchangeFailed(Exception):
    """The connection broke, or the upstream's answer could not be parsed (the upstream may have seen the request).

    `unanswered`: the connection closed before a byte of an answer came back.
    """

    def __init__(self, message: str, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered


class BodyTooLarge(Exception):
    """The answer's body is larger than the bound; `declared` is its Content-Length when that already said so."""

    def __init__(self, declared: int | None) -> None:
        super().__init__(declared)
        self.declared = declared


class RawResponse:
    """An answer as received: status, header fields as bytes (in order), the body (decompressed)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _decompressor(encoding: bytes) -> zlib._Decompress | None:
    coding = encoding.strip().lower()
    if coding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == b"deflate":
        return zlib.decompressobj(zlib.MAX_WBITS)
    return None  # identity, or a coding the processor does not ask for: the body is handed on as it came


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the exchange in progress on it (the llhttp callbacks fill it in)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self._loop = loop
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        self.lost = False
        self.used = False  # carried an exchange before: a failure with no answer at all may be the keep-alive race
        self.idle_since = 0.0
        self._waiter: asyncio.Future[RawResponse] | None = None
        self._head_only = False
        self._received = 0
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._size = 0
        self._inflate: zlib._Decompress | None = None
        self._compressed = False
        self._length_known = False
        self._done = False

    # -- asyncio ------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._status and not self._length_known and not self._head_only:
            try:  # a body delimited by the end of the connection: this is its end
                self._inflated_end()
            except (BodyTooLarge, ExchangeFailed) as error:
                waiter.set_exception(error)
                return
            self._complete()
        else:
            waiter.set_exception(ExchangeFailed("the upstream closed the connection", unanswered=not self._received))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._done:
            self.close()  # bytes nobody asked for: whatever they are, the next request must not read them
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ExchangeFailed("the upstream switched protocols, which the processor never asks for"))
        except httptools.HttpParserError as exc:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                cause = exc.__cause__ or exc.__context__
                error = cause if isinstance(cause, BodyTooLarge | ExchangeFailed) else None
                self._fail(error or ExchangeFailed(f"the answer cannot be parsed ({exc})"))
            else:
                self.close()  # more after the answer: the answer stands, the connection goes
            return
        if not self._status and self._received > MAX_HEAD_BYTES:  # the head is still not complete
            self._fail(ExchangeFailed(f"the answer's head is larger than {MAX_HEAD_BYTES} bytes"))

    # -- llhttp callbacks -----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            raise ExchangeFailed("the upstream sent more than one answer")
        self._headers = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise ExchangeFailed(f"the answer's head is larger than {MAX_HEAD_BYTES} bytes")
        if not self._status:  # after the head, a chunked body's trailer fields: counted, not taken as headers
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            raise ExchangeFailed("the upstream switched protocols, which the processor never asks for")
        if 100 <= status < 200:
            return  # an interim answer (103 Early Hints): the final one follows
        self._status = status
        length: int | None = None
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)  # llhttp has checked it: digits, and only one
            elif lowered == b"transfer-encoding":
                self._length_known = True
            elif lowered == b"content-encoding":
                self._inflate = _decompressor(value)
        if length is not None:
            self._length_known = True
            if length > self._max_body and not self._head_only:
                raise BodyTooLarge(length)
        if self._head_only or status in (204, 304):
            self._length_known = True
        if self._head_only:
            self.reusable = False  # llhttp would read a HEAD answer's Content-Length worth of body: not reused
            self._complete()

    def on_body(self, chunk: bytes) -> None:
        if self._head_only:
            return
        if self._inflate is not None:
            self._compressed = True
            try:
                chunk = self._inflate.decompress(chunk, self._max_body - self._size + 1)
            except zlib.error as exc:
                raise ExchangeFailed(f"the answer's compressed body is corrupt ({exc})") from None
            if self._inflate.unconsumed_tail:
                raise BodyTooLarge(None)
        self._size += len(chunk)
        if self._size > self._max_body:
            raise BodyTooLarge(None)
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if not self._status:
            return  # the end of an interim answer
        if self._head_only:
            return
        if self._inflate is not None:
            self._inflated_end()
        if not self._parser.should_keep_alive() or self._status in CLOSE_AFTER_STATUSES:
            self.reusable = False
        self._complete()

    def _inflated_end(self) -> None:
        """The end of a compressed body: what the decompressor still holds, and a check that the stream ended (a
        truncated stream decompresses without error up to where it was cut)."""
        if self._inflate is None or not self._compressed:
            return  # identity, or no body at all (`Content-Encoding: gzip` on an empty answer)
        try:
            rest = self._inflate.flush()
        except zlib.error as exc:
            raise ExchangeFailed(f"the answer's compressed body is corrupt ({exc})") from None
        if not self._inflate.eof:
            raise ExchangeFailed("the answer's compressed body is truncated (its stream does not end)")
        self._size += len(rest)
        if self._size > self._max_body:
            raise BodyTooLarge(None)
        self._body.append(rest)

    # -- the exchange -----------------------------------------------------------------------------------------

    def start(self, request: bytes, *, head_only: bool) -> asyncio.Future[RawResponse]:
        """Write `request` (head and body, already framed) and return the future of its answer."""
        assert self.transport is not None
        self._waiter = waiter = self._loop.create_future()
        self._head_only = head_only
        self._received = self._status = self._size = 0
        self._body = []
        self._inflate = None
        self._length_known = self._done = self._compressed = False
        self.transport.write(request)
        return waiter

    def expire(self) -> None:
        """The exchange's time is up: its answer fails with TimeoutError (and `finish` closes the connection)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def finish(self) -> None:
        """The exchange is over (answered, failed or abandoned): a connection in an unknown state is closed."""
        waiter, self._waiter = self._waiter, None
        if waiter is None or not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            self.reusable = False
        elif self.transport is not None and self.transport.get_write_buffer_size():
            self.reusable = False  # answered before the request was all sent: where the upstream reads next is unsure
        self.used = True
        if not self.reusable:
            self.close()

    def _complete(self) -> None:
        self._done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(RawResponse(self._status, self._headers, b"".join(self._body)))

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        """Close now (abort: nothing more is sent or read on it)."""
        self.reusable = False
        if self.transport is not None and not self.lost:
            self.transport.abort()


class OriginPool:
    """The connections to one origin (scheme, host, port): at most `limit` open, idle ones reused last-in first-out.
    Built in the running loop, the loop its connections belong to."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        limit: int,
        max_body: int,
        resolve: Resolve | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._tls = tls if scheme == "https" else None
        self._limit = limit
        self._max_body = max_body
        self._resolve = resolve
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        # Built in the loop its connections live in (by HttpClientPool.send). Kept: `asyncio.get_running_loop()`
        # checks the process id, a getpid system call each time, and a call asked for it five times.
        self._loop = asyncio.get_running_loop()

    async def exchange(self, method: str, request: bytes, deadline: float) -> RawResponse:
        """Send `request` (framed) on a pooled or new connection and read the answer, by `deadline` (loop time).

        Raises ConnectFailed, ExchangeFailed, BodyTooLarge or TimeoutError; a connection whose exchange failed, timed
        out or was cancelled is closed.
        """
        # An idle connection is taken without the coroutine `_acquire` is (most calls find one), and the first
        # answer awaited here rather than in `_answer` (one coroutine fewer a call).
        idle = self._idle_connection()
        connection = idle if idle is not None else await self._acquire(deadline)
        reused = connection.used
        timer = self._loop.call_at(deadline, connection.expire)
        try:
            return await connection.start(request, head_only=method == "HEAD")
        except ExchangeFailed as exc:
            if not (reused and exc.unanswered and method in IDEMPOTENT_METHODS):
                raise
        finally:
            timer.cancel()
            connection.finish()
            self._release(connection)
        # The keep-alive race: the upstream closed the idle connection as the request went out. Once more, afresh.
        connection = await self._acquire(deadline, fresh=True)
        try:
            return await self._answer(connection, method, request, deadline)
        finally:
            self._release(connection)

    async def _answer(self, connection: _Connection, method: str, request: bytes, deadline: float) -> RawResponse:
        # A timer on the answer rather than `asyncio.timeout` around it: the same bound for a third of the CPU.
        timer = self._loop.call_at(deadline, connection.expire)
        try:
            return await connection.start(request, head_only=method == "HEAD")
        finally:
            timer.cancel()
            connection.finish()

    async def _acquire(self, deadline: float, *, fresh: bool = False) -> _Connection:
        idle = None if fresh else self._idle_connection()
        if idle is not None:
            return idle
        async with asyncio.timeout_at(deadline):
            return await self._open_or_wait(fresh=fresh)

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still fit to reuse (those that are not are closed on the way)."""
        now = self._loop.time()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
            self._open -= 1
        return None

    async def _open_or_wait(self, *, fresh: bool) -> _Connection:
        while True:
            idle = None if fresh else self._idle_connection()
            if idle is not None:
                return idle
            if self._open < self._limit:
                break
            waiter = self._loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken and cancelled at once: pass the turn on
                raise
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed:
            connection.idle_since = self._loop.time()
            self._idle.append(connection)
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(KEEPALIVE_S, self._sweep)
        else:
            connection.close()
            self._open -= 1
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close the connections idle for KEEPALIVE_S, and those the upstream closed meanwhile."""
        self._sweeper = None
        now = self._loop.time()
        kept = collections.deque(c for c in self._idle if c.reusable and now - c.idle_since < KEEPALIVE_S)
        for connection in self._idle:
            if connection not in kept:
                connection.close()
                self._open -= 1
        self._idle = kept
        if kept:
            self._sweeper = self._loop.call_later(KEEPALIVE_S, self._sweep)
        self._wake()

    async def _connect(self) -> _Connection:
        loop = self._loop
        try:
            addresses = [self._host] if self._resolve is None else await self._resolve(self._host, self._port)
        except OSError as exc:  # no name, or only private addresses where those are refused
            raise ConnectFailed(str(exc)) from None
        failure: OSError | None = None
        for address in addresses:
            try:
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._max_body),
                    address,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
            except OSError as exc:
                failure = exc
                continue
            return connection
        raise ConnectFailed(str(failure) if failure is not None else "no address to connect to")

    def close(self) -> None:
        """Close every idle connection; those in use close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()
