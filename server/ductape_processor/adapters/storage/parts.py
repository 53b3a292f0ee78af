"""Cutting a save's chunks into parts sent a few at a time: S3's multipart uploads and Azure's staged blocks.

`PartedUpload.run` reads the runtime's checked chunks; once a part's worth has come it starts the provider's upload
(`start`) and sends the part (`send`) while the next fills, at most `in_flight` at a time (the caller's stream waits
meanwhile: memory per upload is the part filling and the parts in flight). A file that ends before filling one part
is returned whole, nothing sent, for the provider's single-request upload. On any failure, cancellation included,
the parts in flight are cancelled and the error propagates: the caller aborts (S3) or leaves the blocks uncommitted
(Azure).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PartedUpload(Generic[T]):
    """One upload in parts of `part_bytes`; `results` are what `send` returned, in part order, once `run` ended."""

    def __init__(
        self,
        part_bytes: int,
        in_flight: int,
        start: Callable[[], Awaitable[None]],
        send: Callable[[int, bytes], Awaitable[T]],
    ) -> None:
        self._part_bytes = part_bytes
        self._slots = asyncio.Semaphore(in_flight)
        self._start = start
        self._send = send
        self._tasks: list[asyncio.Task[T]] = []
        self.results: list[T] = []

    async def _sent(self, number: int, body: bytes) -> T:
        try:
            return await self._send(number, body)
        finally:
            self._slots.release()

    async def _part(self, body: bytes) -> None:
        if not self._tasks:
            await self._start()
        await self._slots.acquire()
        self._tasks.append(asyncio.ensure_future(self._sent(len(self._tasks) + 1, body)))

    async def run(self, chunks: AsyncIterable[bytes]) -> bytes | None:
        """Send `chunks` in parts; the whole file instead when it fits in one part (then nothing was sent), else
        None once every part is sent."""
        pending: list[bytes] = []
        filled = 0
        try:
            async for chunk in chunks:
                pending.append(chunk)
                filled += len(chunk)
                if filled >= self._part_bytes:
                    # One allocation per part, of the part's size; what exceeds it starts the next part.
                    body = b"".join(pending)
                    await self._part(body[: self._part_bytes] if len(body) > self._part_bytes else body)
                    rest = body[self._part_bytes :]
                    pending, filled = ([rest] if rest else []), len(rest)
                    del body, rest
            if not self._tasks:
                return b"".join(pending)
            if pending:
                await self._part(b"".join(pending))
            self.results = list(await asyncio.gather(*self._tasks))
            return None
        except BaseException:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            raise
