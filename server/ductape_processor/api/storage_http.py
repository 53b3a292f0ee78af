"""The storage HTTP listener: serves the signed URLs of `fs` storages (GET reads a file, PUT writes one).

Off unless `PROCESSOR_STORAGE_HTTP_ADDRESS` is set, and on loopback unless the processor is told it may be exposed.
Like a servicer it only converts: HTTP in, a verified link (runtime/storage/links.py) and a StorageRuntime call,
HTTP out. Bodies stream both ways a chunk at a time; an error answers the same reason as the gRPC API would, as JSON.
A connection that sends no whole head within IDLE_S (or stays idle that long between requests) is closed, a PUT
whose body stops for IDLE_S is answered 408 and saves nothing, and a GET whose reader takes no bytes for IDLE_S is
cut: none holds a connection, a file or an upload for as long as the other side likes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import grpc
from aiohttp import web

from ductape_processor.errors import ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies import Deadline
from ductape_processor.runtime.storage.links import PATH_PREFIX, Link, StorageLinks
from ductape_processor.runtime.storage.operations import FileSpec, StorageRef, StorageRuntime

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
IDLE_S = 30.0
"""Seconds a head may take, and a body (either way) may wait for its next bytes."""
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _error(exc: ProcessorError) -> web.Response:
    status = 413 if exc.reason == Reason.FILE_TOO_LARGE else _STATUS.get(exc.code, 500)
    message = exc.message if status != 500 else "internal error"
    return web.Response(
        status=status,
        content_type="application/json",
        text=json.dumps({"reason": str(exc.reason), "message": message}),
    )


class _Stalled(Exception):
    """A PUT's body sent nothing for IDLE_S."""


class StorageHttpListener:
    """One aiohttp server bound to `address` (host:port; port 0 picks one)."""

    def __init__(self, runtime: StorageRuntime, links: StorageLinks, address: str) -> None:
        self._runtime = runtime
        self._links = links
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        app = web.Application()
        app.router.add_route("GET", PATH_PREFIX + "/{product}/{env}/{tag}/{key:.+}", self._get)
        app.router.add_route("PUT", PATH_PREFIX + "/{product}/{env}/{tag}/{key:.+}", self._put)
        # aiohttp's keep-alive timeout also closes a connection whose head is not whole by then (default 3630 s).
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_S)

    async def start(self) -> int:
        """Bind and serve; returns the port and tells the links their base URL."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = int(self._runner.addresses[0][1])
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._links.base_url = f"http://{host}:{port}"
        log.info("storage HTTP listener serving", extra={"address": f"{host}:{port}"})
        return port

    async def stop(self) -> None:
        """Stop serving; requests in flight are cut."""
        await self._runner.cleanup()

    def _link(self, request: web.Request) -> Link:
        info = request.match_info
        ref = StorageRef(info["product"], info["env"], info["tag"])
        return self._links.verify(ref, info["key"], request.method, request.query)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        try:
            link = self._link(request)
            info, chunks = await self._runtime.download(link.ref, link.key, 0, 0, CHUNK_BYTES, Deadline(None))
        except ProcessorError as exc:
            return _error(exc)
        response = web.StreamResponse(headers={"Content-Type": info.content_type or "application/octet-stream"})
        response.content_length = info.size
        if info.sha256:
            response.headers["X-Checksum-Sha256"] = info.sha256
        await response.prepare(request)
        try:
            async for chunk in chunks:
                async with asyncio.timeout(IDLE_S):
                    await response.write(chunk)
        except TimeoutError:
            log.info("storage download cut: its reader took no bytes", extra={"file": link.key, "idle_s": IDLE_S})
            assert request.transport is not None
            request.transport.close()  # the answer's head is sent: cutting it short is all that is left to say
            return response
        finally:
            await cast(AsyncGenerator[bytes, None], chunks).aclose()  # the file closes now, not when collected
        await response.write_eof()
        return response

    async def _put(self, request: web.Request) -> web.Response:
        try:
            link = self._link(request)
            given = request.headers.get("Content-Type", "")
            if link.content_type and given.split(";")[0].strip() != link.content_type.split(";")[0].strip():
                return web.Response(status=403, text="the URL is signed for another Content-Type")

            async def body() -> AsyncIterator[bytes]:
                chunks = request.content.iter_chunked(CHUNK_BYTES)
                while True:
                    try:
                        async with asyncio.timeout(IDLE_S):
                            chunk = await anext(chunks, b"")
                    except TimeoutError:
                        raise _Stalled from None
                    if not chunk:
                        return
                    yield chunk

            spec = FileSpec(link.key, link.content_type or given)
            info = await self._runtime.upload(link.ref, spec, body(), declared_size=request.content_length or 0)
        except ProcessorError as exc:
            return _error(exc)
        except _Stalled:
            stalled = web.Response(
                status=408,
                content_type="application/json",
                text=json.dumps(
                    {"reason": str(Reason.DEADLINE_EXCEEDED), "message": f"the body sent nothing for {IDLE_S:g} s"}
                ),
            )
            stalled.force_close()
            return stalled
        return web.Response(
            status=200,
            content_type="application/json",
            text=json.dumps({"file_name": info.key, "size": info.size, "sha256": info.sha256}),
        )
