"""StorageService: proto in, StorageRuntime call, proto out (streams converted chunk by chunk)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ductape.processor.v1 import storage_pb2, storage_pb2_grpc

from ductape_processor.api.calls import Context, deadline, first_message, require_target
from ductape_processor.api.streams import WriteWatch, aborter
from ductape_processor.api.values import seconds, timestamp
from ductape_processor.errors import DeadlineExceeded, InvalidArgument, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.storage.operations import FileInfo, FileSpec, StorageRef, StorageRuntime, UrlMethod

DEFAULT_IDLE_S = 60.0  # the server's stream_idle_s when none is given

_METHODS = {
    storage_pb2.SIGNED_URL_METHOD_UNSPECIFIED: UrlMethod.GET,
    storage_pb2.SIGNED_URL_METHOD_GET: UrlMethod.GET,
    storage_pb2.SIGNED_URL_METHOD_PUT: UrlMethod.PUT,
}
_METHOD_VALUES = {UrlMethod.GET: storage_pb2.SIGNED_URL_METHOD_GET, UrlMethod.PUT: storage_pb2.SIGNED_URL_METHOD_PUT}


def _ref(request: Any, prefix: str = "") -> StorageRef:
    require_target(request, prefix)
    return StorageRef(request.product, request.env, request.event)


def _info(info: FileInfo) -> storage_pb2.FileInfo:
    message = storage_pb2.FileInfo(
        file_name=info.key,
        size=info.size,
        sha256=info.sha256,
        content_type=info.content_type,
        metadata=dict(info.metadata),
    )
    if info.updated is not None:
        message.update_time.CopyFrom(timestamp(info.updated))
    return message


async def _chunks(requests: AsyncIterator[storage_pb2.UploadRequest], idle_s: float) -> AsyncIterator[bytes]:
    """The chunks of an upload after its header; a client that sends nothing for `idle_s` fails it (UPLOAD_IDLE):
    an upload left open without sending would hold its temporary file (and a descriptor) for as long as it liked."""
    iterator = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                request = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload sent nothing for {idle_s:g} s (the server's stream_idle_s); nothing was kept",
                reason=Reason.UPLOAD_IDLE,
            ) from None
        kind = request.WhichOneof("kind")
        if kind != "chunk":
            if kind == "header":
                raise InvalidArgument.field("header", "an upload takes its header once, as its first message")
            raise InvalidArgument.field("kind", "a message after the header must carry a chunk")
        yield request.chunk


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Serves StorageService."""

    def __init__(self, runtime: StorageRuntime, idle_s: float = DEFAULT_IDLE_S) -> None:
        self._runtime = runtime
        self._idle_s = idle_s  # the server's stream_idle_s

    async def Save(self, request: storage_pb2.SaveRequest, context: Context) -> storage_pb2.SaveResponse:
        spec = FileSpec(request.file_name, request.content_type, dict(request.metadata), request.sha256)
        info = await self._runtime.save(_ref(request), spec, request.data, deadline(context))
        return storage_pb2.SaveResponse(file=_info(info))

    async def Upload(
        self, request_iterator: AsyncIterator[storage_pb2.UploadRequest], context: Context
    ) -> storage_pb2.UploadResponse:
        header = (await first_message(request_iterator, "header")).header
        spec = FileSpec(header.file_name, header.content_type, dict(header.metadata), header.sha256)
        info = await self._runtime.upload(
            _ref(header, "header."),
            spec,
            _chunks(request_iterator, self._idle_s),
            declared_size=header.size,
            deadline=deadline(context),
        )
        return storage_pb2.UploadResponse(file=_info(info))

    async def Download(
        self, request: storage_pb2.DownloadRequest, context: Context
    ) -> AsyncIterator[storage_pb2.DownloadResponse]:
        info, chunks = await self._runtime.download(
            _ref(request), request.file_name, request.offset, request.length, request.chunk_size, deadline(context)
        )
        idle_s, abort = self._idle_s, aborter(context)

        async def stalled() -> None:
            # The client stopped reading: the handler is held in a write, with the file open. Close the file (the
            # handler, left in the write, is only finalised when gRPC lets go of it), and end the call.
            with contextlib.suppress(RuntimeError):  # not suspended (cannot be: a write was pending)
                await chunks.aclose()  # type: ignore[attr-defined]
            await abort(
                Unavailable(
                    f"the download was not read for {idle_s:g} s (the server's stream_idle_s); download the rest "
                    "again from the offset reached",
                    reason=Reason.DOWNLOAD_NOT_READ,
                )
            )

        watch = WriteWatch(idle_s, stalled)
        try:
            watch.writing()
            yield storage_pb2.DownloadResponse(file=_info(info))
            watch.written()
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    watch.writing()
                    yield storage_pb2.DownloadResponse(chunk=chunk)
                    watch.written()
        finally:
            watch.stop()

    async def Read(self, request: storage_pb2.ReadRequest, context: Context) -> storage_pb2.ReadResponse:
        info, data = await self._runtime.read(_ref(request), request.file_name, deadline(context))
        return storage_pb2.ReadResponse(data=data, file=_info(info))

    async def Delete(self, request: storage_pb2.DeleteRequest, context: Context) -> storage_pb2.DeleteResponse:
        deleted = await self._runtime.delete(_ref(request), request.file_name, deadline(context))
        return storage_pb2.DeleteResponse(deleted=deleted)

    async def List(self, request: storage_pb2.ListRequest, context: Context) -> storage_pb2.ListResponse:
        files, token = await self._runtime.list_files(
            _ref(request), request.prefix, request.page_size, request.page_token, deadline(context)
        )
        return storage_pb2.ListResponse(files=[_info(info) for info in files], next_page_token=token)

    async def SignedUrl(self, request: storage_pb2.SignedUrlRequest, context: Context) -> storage_pb2.SignedUrlResponse:
        method = _METHODS.get(request.method)
        if method is None:
            raise InvalidArgument.field("method", "must be GET or PUT")
        expires_s = seconds(request.expires_in)
        url, expires = await self._runtime.signed_url(
            _ref(request), request.file_name, method, expires_s, request.content_type, deadline(context)
        )
        return storage_pb2.SignedUrlResponse(
            url=url.url, method=_METHOD_VALUES[method], expire_time=timestamp(expires), headers=dict(url.headers)
        )
