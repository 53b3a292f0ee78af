"""A small pool of connections for drivers without one that fits (aiosqlite has none; asyncmy's cannot bound the wait
for a connection): at most `size` connections, opened on demand, reused while healthy, waited for until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from ductape_processor.adapters.databases.base import PoolExhausted

C = TypeVar("C")
S = TypeVar("S", bound="Lent")


class Lent(Protocol):
    """What a connection is lent as: it says whether it saw the connection break."""

    broken: bool


class SlotPool(Generic[C]):
    """Up to `size` connections; `acquire` waits for a free slot, then reuses an idle connection or opens one."""

    def __init__(
        self,
        size: int,
        open_connection: Callable[[], Awaitable[C]],
        close_connection: Callable[[C], Awaitable[None]],
        healthy: Callable[[C], bool] = lambda _: True,
    ) -> None:
        self._slots = asyncio.Semaphore(size)
        self._idle: list[C] = []
        self._open = open_connection
        self._close = close_connection
        self._healthy = healthy
        self._closed = False

    async def acquire(self, timeout_s: float | None, busy: str) -> C:
        """A connection; PoolExhausted(`busy`) when no slot frees up within `timeout_s` (None: no limit)."""
        if self._closed:
            raise PoolExhausted(f"{busy}: the pool is closed")
        try:
            async with asyncio.timeout(None if timeout_s is None else max(timeout_s, 0.0)):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolExhausted(busy) from None
        try:
            while self._idle:
                conn = self._idle.pop()
                if self._healthy(conn):
                    return conn
                await self._close(conn)  # died while idle (server restarted, connection killed): open another
            return await self._open()
        except BaseException:
            self._slots.release()
            raise

    async def release(self, conn: C, *, broken: bool = False) -> None:
        """Give a connection back; a broken or unhealthy one (or any, once the pool is closed) is closed instead of
        kept."""
        try:
            if broken or self._closed or not self._healthy(conn):
                await self._close(conn)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def lend(self, timeout_s: float | None, busy: str, wrap: Callable[[C], S]) -> AsyncIterator[S]:
        """A connection for the block, as `wrap` makes it (an adapter's session); given back at the end, closed if
        the session saw it break."""
        conn = await self.acquire(timeout_s, busy)
        lent = wrap(conn)
        try:
            yield lent
        finally:
            await self.release(conn, broken=lent.broken)

    async def close(self) -> None:
        """Close the idle connections; connections lent out are closed when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await self._close(conn)
