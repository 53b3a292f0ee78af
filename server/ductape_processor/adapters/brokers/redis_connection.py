"""A Redis connection that many callers share, pipelining their commands (the Redis adapter's only way to Redis).

Redis answers the commands of one connection in the order it read them, so a caller needs neither a connection of
its own nor to wait for the previous caller's reply: each `execute` writes its commands at once (packed by hiredis,
in C; or `send`, already encoded: the XADDs of a publish) behind whatever is already on the wire, and the
connection's protocol hands the replies back in order as they arrive.
A `PublishBatch` of 100 messages is one write and one read of 100 replies; 32 concurrent single publishes share one
socket, most of their writes and reads coalesced by the kernel.

Why not redis-py's own client: per command it checked a connection out of its pool (a lock, a poll of the socket
under a zero timeout, bookkeeping), wrapped the write in `asyncio.wait_for` (a task), packed the command in Python
and ran the reply through a response callback. Measured in one process on this machine's loaded CPUs: an XADD of a
processor message cost 45 µs of CPU that way and 10 µs here; a pipelined batch 21 µs a message against about 6.
redis-py still opens each connection (URL, TLS, AUTH, SELECT, CLIENT SETNAME, RESP version: `Connection.connect`);
from then on this module writes the connection's transport and reads it with a protocol of its own.

Failures: a reply that does not come within the caller's timeout, a lost connection or a protocol error closes the
connection and fails every caller waiting on it with redis-py's `ConnectionError`/`TimeoutError` (the adapter
retries those); the next `execute` opens a new one. Error replies are not raised: each comes back in its place as
a `ResponseError` instance. A caller cancelled while waiting leaves its replies to be read and dropped, which keeps
the connection usable; `close()` is for a caller that must make sure a command no longer runs (a blocking read).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ductape_processor.adapters.brokers.connection import LazyConnection

WRITE_BUFFER_HIGH: Final = 1 << 20
"""Bytes waiting in the socket's send buffer above which a caller waits for it to drain (a slow Redis)."""
_MORE: Final = object()  # hiredis' "not a whole reply yet"

Arg = bytes | str | int | float
Command = tuple[Arg, ...]


class _Pending:
    __slots__ = ("count", "deadline", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Any]], deadline: float) -> None:
        self.count = count
        self.future = future
        self.deadline = deadline
        self.replies: list[Any] = []


class _Wire(asyncio.Protocol):
    """One open connection: its transport, what was sent and awaits a reply, and the parser its replies go through.

    It takes the transport over from the protocol redis-py opened it with (`set_protocol`), so that replies are
    parsed and handed back as they arrive (`data_received`), with no task to wake and no stream buffer in between
    (a round trip cost about 76,000 instructions through redis-py's StreamReader, a reader task and an
    `asyncio.timeout` per call). Reply timeouts are one timer per connection (`_watch`), not one per call.
    """

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.loop = asyncio.get_running_loop()
        # Set by redis-py's connect(); from here on this protocol reads and the transport is written directly.
        writer: asyncio.StreamWriter = connection._writer  # type: ignore[assignment]
        self.transport = writer.transport
        self.parser = hiredis.Reader(notEnoughData=_MORE, replyError=ResponseError)
        self.waiting: deque[_Pending] = deque()
        self.failure: BaseException | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._drained: list[asyncio.Future[None]] = []  # callers waiting for the send buffer to drain
        self._paused = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        # Anything redis-py's stream read past the handshake (nothing, unless the server sent something unasked).
        left: bytearray = getattr(connection._reader, "_buffer", bytearray())
        if left:
            self.parser.feed(bytes(left))
        self.transport.set_protocol(self)

    @property
    def open(self) -> bool:
        return self.failure is None

    def send(self, packed: bytes, count: int, timeout_s: float) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        deadline = self.loop.time() + timeout_s
        self.waiting.append(_Pending(count, future, deadline))
        self.transport.write(packed)  # written now, in the same step as queued: replies come in this order
        if self._watch is None:
            self._watch = self.loop.call_at(deadline, self._check)
        return future

    def _check(self) -> None:
        """The reply timer: fail the connection when a command's reply is late, else look again at the next
        deadline (a reply comes after those of the commands before it, so the earliest deadline is what counts)."""
        self._watch = None
        if self.waiting and self.failure is None:
            deadline = min(pending.deadline for pending in self.waiting)
            if deadline <= self.loop.time():
                self.fail(RedisTimeoutError("Redis did not answer in time"))
            else:
                self._watch = self.loop.call_at(deadline, self._check)

    async def drain(self) -> None:
        """Until the transport's send buffer is below its low-water mark again (a slow Redis)."""
        if self._paused and self.failure is None:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._drained.append(waiter)
            await waiter

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser, waiting = self.parser, self.waiting
        gets = parser.gets
        try:
            parser.feed(data)
            while (reply := gets()) is not _MORE:
                if not waiting:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                pending = waiting[0]
                replies, count = pending.replies, pending.count
                replies.append(reply)
                # The rest of this caller's replies that are here already (a batch's 100 XADD replies), in one loop.
                while len(replies) < count and (reply := gets()) is not _MORE:
                    replies.append(reply)
                if len(replies) == count:
                    waiting.popleft()
                    if not pending.future.done():  # a cancelled caller's replies are dropped
                        pending.future.set_result(replies)
        except RedisConnectionError as exc:
            self.fail(exc)
        except Exception as exc:  # the protocol failed: the callers retry on a new connection
            self.fail(RedisConnectionError(f"reading from Redis failed: {type(exc).__name__}: {exc}"))

    def eof_received(self) -> bool:
        return False  # the transport closes itself, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            RedisConnectionError("Redis closed the connection" if exc is None else f"the connection failed: {exc}")
        )
        self.connection._close()  # type: ignore[no-untyped-call]  # redis-py forgets its streams: it does no I/O
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drained()

    def _wake_drained(self) -> None:
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            if not waiter.done():
                if self.failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(self.failure)

    # -- the end -------------------------------------------------------------------------------------------------

    def fail(self, failure: BaseException) -> None:
        """Close the connection and fail everything waiting on it."""
        if self.failure is None:
            self.failure = failure
            self.transport.close()
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(self.failure)
        self._wake_drained()

    async def close(self) -> None:
        """Close the connection, and return once the transport is closed (at most a second later)."""
        self.fail(RedisConnectionError("the connection was closed"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 1.0)


class PipelinedConnection:
    """One Redis connection, opened on first use (and again after a failure), shared by concurrent callers."""

    def __init__(self, pool: ConnectionPool, reply_timeout_s: float) -> None:
        self._pool = pool
        self._reply_timeout_s = reply_timeout_s
        self._wire = LazyConnection(self._connect, lambda wire: wire.open)

    async def _connect(self) -> _Wire:
        connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await connection.connect()  # type: ignore[no-untyped-call]  # redis-py: TLS, AUTH, RESP version, CLIENT SETNAME, SELECT
        return _Wire(connection)

    async def execute(self, commands: Sequence[Command], timeout_s: float | None = None) -> list[Any]:
        """Send `commands` together and return their replies in order (an error reply as a `ResponseError`).

        Raises redis-py's ConnectionError when the connection fails, TimeoutError when the replies do not come
        within `timeout_s` (default: the connection's reply timeout), and closes the connection in both cases.
        """
        # hiredis' stub declares a tuple of one argument; it takes any number.
        packed = b"".join([hiredis.pack_command(command) for command in commands])  # type: ignore[arg-type]
        return await self.send(packed, len(commands), timeout_s)

    async def send(self, packed: bytes, count: int, timeout_s: float | None = None) -> list[Any]:
        """As `execute`, for `count` commands already encoded for the wire (RESP) one after the other in `packed`."""
        wire = self._wire.current
        if wire is None or wire.failure is not None:
            wire = await self._wire.get()
            if wire.failure is not None:
                raise wire.failure
        future = wire.send(packed, count, self._reply_timeout_s if timeout_s is None else timeout_s)
        if wire.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await wire.drain()
        # A caller cancelled here cancels `future`: its replies are read and dropped, the connection stays usable.
        return await future

    async def one(self, *command: Arg, timeout_s: float | None = None) -> Any:
        """One command's reply; an error reply is raised as `ResponseError`."""
        [reply] = await self.execute([command], timeout_s)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def abandon(self) -> None:
        """Close the connection now, failing what waits on it: Redis stops a command still blocked on it."""
        wire = self._wire.current
        if wire is not None:
            wire.fail(RedisConnectionError("the connection was abandoned"))

    async def close(self) -> None:
        """Close the connection: a command still running is abandoned (the server stops a blocked one)."""
        wire = self._wire.take()
        if wire is not None:
            await wire.close()
