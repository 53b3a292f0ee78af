"""A TCP proxy on loopback that a test controls, between the processor and a real broker: it passes bytes, drops the
broker's replies, stops forwarding anything, or cuts every connection. The machine's shared servers are never stopped
or paused; a test breaks its own link to them instead."""

from __future__ import annotations

import asyncio
import contextlib


class FaultyLink:
    """A TCP proxy to one broker: `mode` is "pass", "drop-replies" (client bytes reach the broker, replies are
    dropped) or "blackhole" (nothing is forwarded; new connections are accepted and never answered)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.mode = "pass"
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "blackhole":
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for task in (
            asyncio.ensure_future(self._pump(reader, up_writer, replies=False)),
            asyncio.ensure_future(self._pump(up_reader, writer, replies=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                if self.mode == "pass" or (self.mode == "drop-replies" and not replies):
                    writer.write(chunk)
                    await writer.drain()
        writer.close()

    def cut(self) -> None:
        """Close every connection through the link (both sides)."""
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
