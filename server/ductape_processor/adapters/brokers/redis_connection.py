"""A Redis connection that many callers share, pipelining their commands (the Redis adapter's only way to Redis).

Redis answers the commands of one connection in the order it read them, so a caller needs neither a connection of
its own nor to wait for the previous caller's reply: each `execute` writes its commands at once (packed by hiredis,
in C; or `send`, already encoded: the XADDs of a publish) behind whatever is already on the wire, and one reader
task per connection hands the replies back in order.
A `PublishBatch` of 100 messages is one write and one read of 100 replies; 32 concurrent single publishes share one
socket, most of their writes and reads coalesced by the kernel.

Why not redis-py's own client: per command it checked a connection out of its pool (a lock, a poll of the socket
under a zero timeout, bookkeeping), wrapped the write in `asyncio.wait_for` (a task), packed the command in Python
and ran the reply through a response callback. Measured in one process on this machine's loaded CPUs: an XADD of a
processor message cost 45 µs of CPU that way and 10 µs here; a pipelined batch 21 µs a message against about 6.
redis-py still opens each connection (URL, TLS, AUTH, SELECT, CLIENT SETNAME, RESP version: `Connection.connect`);
from then on this module reads and writes the connection's streams itself.

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

READ_SIZE: Final = 65536
"""Bytes asked of the socket per read: a batch of replies usually arrives in one."""
WRITE_BUFFER_HIGH: Final = 1 << 20
"""Bytes waiting in the socket's send buffer above which a caller waits for it to drain (a slow Redis)."""
_MORE: Final = object()  # hiredis' "not a whole reply yet"

Arg = bytes | str | int | float
Command = tuple[Arg, ...]


class _Pending:
    __slots__ = ("count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.future = future
        self.replies: list[Any] = []


class _Wire:
    """One open connection: its streams, what was sent and awaits a reply, and the task reading the replies."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        # Set by redis-py's connect(); this module does all I/O on them from here on.
        self.stream: asyncio.StreamReader = connection._reader  # type: ignore[assignment]
        self.writer: asyncio.StreamWriter = connection._writer  # type: ignore[assignment]
        self.parser = hiredis.Reader(notEnoughData=_MORE, replyError=ResponseError)
        self.waiting: deque[_Pending] = deque()
        self.failure: BaseException | None = None
        self.reader = asyncio.ensure_future(self._read())

    @property
    def open(self) -> bool:
        return self.failure is None

    def send(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Pending(count, future))
        self.writer.write(packed)  # written now, in the same step as queued: replies come in this order
        return future

    async def _read(self) -> None:
        gets, waiting = self.parser.gets, self.waiting
        try:
            while True:
                reply = gets()
                if reply is _MORE:
                    data = await self.stream.read(READ_SIZE)
                    if not data:
                        raise RedisConnectionError("Redis closed the connection")
                    self.parser.feed(data)
                    continue
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
        except Exception as exc:  # the socket or the protocol failed: the callers retry on a new connection
            self.fail(RedisConnectionError(f"reading from Redis failed: {type(exc).__name__}: {exc}"))
        finally:
            self.fail(RedisConnectionError("the connection was closed"))
            with contextlib.suppress(Exception):
                await self.connection.disconnect(nowait=True)

    def fail(self, failure: BaseException) -> None:
        """Close the connection (its reader then ends) and fail everything waiting on it."""
        if self.failure is None:
            self.failure = failure
            self.writer.close()
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(self.failure)

    async def close(self) -> None:
        self.fail(RedisConnectionError("the connection was closed"))
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


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
        wire = await self._wire.get()
        if wire.failure is not None:
            raise wire.failure
        future = wire.send(packed, count)
        try:
            async with asyncio.timeout(self._reply_timeout_s if timeout_s is None else timeout_s):
                if wire.writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    await wire.writer.drain()
                return await future
        except TimeoutError:
            wire.fail(RedisTimeoutError("Redis did not answer in time"))
            raise RedisTimeoutError("Redis did not answer in time") from None
        finally:
            future.cancel()  # done already, or its caller stopped waiting: its replies are read and dropped

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
