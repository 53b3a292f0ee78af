"""Storage from Python: save, upload and download streamed, read, list, delete and sign URLs.

    saved = await processor.storage.save(product="shop", env="dev", event="files",
                                         file_name="invoices/1.pdf", data=pdf_bytes)
    # Ductape's shape is accepted too:
    await processor.storage.save(product="shop", env="dev", event="files",
                                 input={"buffer": base64_text, "fileName": "a.txt", "mimeType": "text/plain"})
    file = await processor.storage.read(product="shop", env="dev", event="files", file_name="a.txt")
    async for info in processor.storage.files(product="shop", env="dev", event="files", prefix="invoices/"):
        ...

Large files go through `upload` (bytes, a path, or any iterable or async iterable of chunks) and `download`
(an async iterator of chunks, with an optional byte range), so neither side holds a whole file in memory. A
file's own metadata is `file_metadata=`; `metadata=` is, as on every call of the client, gRPC metadata.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

from ductape.processor.calls import CallMetadata, ResourceClient, every_item
from ductape.processor.v1 import storage_pb2, storage_pb2_grpc
from ductape.processor.values import record_from
from google.protobuf import duration_pb2

UPLOAD_CHUNK_BYTES = 1024 * 1024
"""The size of the chunks `upload` sends a file in."""

Source = bytes | str | os.PathLike[str] | Iterable[bytes] | AsyncIterable[bytes]
"""What `upload` sends: bytes, a file's path, or chunks (an iterable or async iterable of bytes)."""


class StorageRef(TypedDict):
    """A storage of a product in one environment; `event` is the storage's tag, as in Ductape's docs."""

    product: str
    env: str
    event: str


class FileRef(StorageRef):
    """A file of a storage, by its key."""

    file_name: str


class FileRange(FileRef, total=False):
    """A byte range of a file (0: from the start, to the end) and the size of the chunks it comes in (0: the
    server's)."""

    offset: int
    length: int
    chunk_size: int


class FilePrefix(StorageRef, total=False):
    """The files of a storage whose key starts with `prefix`, fetched `page_size` at a time (0: the server's)."""

    prefix: str
    page_size: int


class FileQuery(FilePrefix, total=False):
    """One page of those files ("": the first)."""

    page_token: str


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A stored file's description."""

    file_name: str
    size: int
    sha256: str
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, info: storage_pb2.FileInfo) -> StoredFile:
        """From the API's FileInfo."""
        updated = info.update_time.ToDatetime(UTC) if info.HasField("update_time") else None
        return record_from(cls, info, metadata=dict(info.metadata), updated_at=updated)


@dataclass(frozen=True, slots=True)
class FileContent:
    """A file read whole: Ductape's `{buffer, fileName, mimeType}` (`buffer` as base64 text; `data` the bytes)."""

    data: bytes
    file: StoredFile

    @property
    def buffer(self) -> str:
        """The bytes as base64 text, as Ductape's `readFile` gives them."""
        return base64.b64encode(self.data).decode()

    @property
    def file_name(self) -> str:
        """The file's key (Ductape's `fileName`)."""
        return self.file.file_name

    @property
    def mime_type(self) -> str:
        """The file's media type (Ductape's `mimeType`)."""
        return self.file.content_type


@dataclass(frozen=True, slots=True)
class FilePage:
    """One page of `list`: the files and the token of the next page ("" on the last)."""

    files: list[StoredFile]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A URL that reads (GET) or writes (PUT) one file until `expires_at`, and headers its request must send."""

    url: str
    method: str
    expires_at: datetime
    headers: dict[str, str]


def _ductape_input(given: Mapping[str, Any]) -> tuple[bytes, str, str]:
    """(data, file name, content type) from Ductape's `{buffer (base64), fileName, mimeType}`."""
    buffer = given.get("buffer")
    if isinstance(buffer, bytes | bytearray):
        data = bytes(buffer)
    elif isinstance(buffer, str):
        data = base64.b64decode(buffer, validate=True)
    else:
        raise ValueError("input.buffer must be base64 text or bytes")
    return data, str(given.get("fileName") or ""), str(given.get("mimeType") or "")


async def _chunks(source: Source, chunk_size: int) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), chunk_size):
            yield source[start : start + chunk_size]
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:  # noqa: ASYNC230 - each read runs in a thread below
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk


class StorageClient(ResourceClient):
    """A product's storages; `event` names the storage (its tag), as in Ductape's docs."""

    _stub: storage_pb2_grpc.StorageServiceAsyncStub

    async def save(
        self,
        *,
        file_name: str = "",
        data: bytes | None = None,
        content_type: str = "",
        file_metadata: Mapping[str, str] | None = None,
        sha256: str = "",
        input: Mapping[str, Any] | None = None,
        metadata: CallMetadata | None = None,
        **storage: Unpack[StorageRef],
    ) -> StoredFile:
        """Save a small file in one call: `data` and `file_name`, or Ductape's `input={buffer, fileName,
        mimeType}`. The content type is sniffed by the server when not given."""
        if input is not None:
            if data is not None:
                raise ValueError("give data or input, not both")
            data, name, mime = _ductape_input(input)
            file_name, content_type = file_name or name, content_type or mime
        request = storage_pb2.SaveRequest(
            **storage,
            file_name=file_name,
            content_type=content_type,
            data=data or b"",
            metadata=dict(file_metadata or {}),
            sha256=sha256,
        )
        response = await self._call(self._stub.Save, request, metadata=metadata)
        return StoredFile.from_proto(response.file)

    async def upload(
        self,
        source: Source,
        *,
        content_type: str = "",
        file_metadata: Mapping[str, str] | None = None,
        sha256: str = "",
        size: int = 0,
        chunk_size: int = UPLOAD_CHUNK_BYTES,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **file: Unpack[FileRef],
    ) -> StoredFile:
        """Save a file of any size as a stream. For bytes the size and SHA-256 are declared for the server to
        check; for other sources pass `size` and `sha256` when known. Nothing is kept if the stream fails."""
        if isinstance(source, bytes):
            size = size or len(source)
            sha256 = sha256 or hashlib.sha256(source).hexdigest()
        header = storage_pb2.UploadHeader(
            **file,
            content_type=content_type,
            metadata=dict(file_metadata or {}),
            sha256=sha256,
            size=size,
        )

        async def requests() -> AsyncIterator[storage_pb2.UploadRequest]:
            yield storage_pb2.UploadRequest(header=header)
            async for chunk in _chunks(source, chunk_size):
                if chunk:
                    yield storage_pb2.UploadRequest(chunk=chunk)

        # Bytes can be sent again: the call is repeated once if grpc.aio loses the server's status (`status_lost`).
        stream = requests if isinstance(source, bytes) else requests()
        response = await self._call(self._stub.Upload, stream, timeout, metadata, streamed=True)
        return StoredFile.from_proto(response.file)

    async def download(
        self,
        *,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **file: Unpack[FileRange],
    ) -> AsyncIterator[bytes]:
        """The file's bytes (from `offset`, `length` of them, 0: to the end) as they arrive."""
        request = storage_pb2.DownloadRequest(**file)
        async for response in self._call.stream(self._stub.Download, request, timeout, metadata):
            if response.WhichOneof("kind") == "chunk":
                yield response.chunk

    async def download_to(self, path: str | os.PathLike[str], **request: Any) -> int:
        """Download a file (the arguments of `download`) into `path`; returns the bytes written."""
        written = 0
        with Path(path).open("wb") as handle:  # noqa: ASYNC230 - each write runs in a thread below
            async for chunk in self.download(**request):
                await asyncio.to_thread(handle.write, chunk)
                written += len(chunk)
        return written

    async def read(self, *, metadata: CallMetadata | None = None, **file: Unpack[FileRef]) -> FileContent:
        """A small file whole (Ductape's `readFile`); larger than a message: use `download`."""
        response = await self._call(self._stub.Read, storage_pb2.ReadRequest(**file), metadata=metadata, safe=True)
        return FileContent(response.data, StoredFile.from_proto(response.file))

    async def delete(self, *, metadata: CallMetadata | None = None, **file: Unpack[FileRef]) -> bool:
        """Delete a file; False when there was none."""
        response = await self._call(self._stub.Delete, storage_pb2.DeleteRequest(**file), metadata=metadata)
        return bool(response.deleted)

    async def list(self, *, metadata: CallMetadata | None = None, **query: Unpack[FileQuery]) -> FilePage:
        """One page of files whose key starts with `prefix`, in key order."""
        response = await self._call(self._stub.List, storage_pb2.ListRequest(**query), metadata=metadata, safe=True)
        return FilePage([StoredFile.from_proto(info) for info in response.files], response.next_page_token)

    def files(self, *, metadata: CallMetadata | None = None, **query: Unpack[FilePrefix]) -> AsyncIterator[StoredFile]:
        """Every file whose key starts with `prefix` (Ductape's `files`), fetching pages as needed."""

        async def page(token: str) -> FilePage:
            return await self.list(**query, page_token=token, metadata=metadata)

        return every_item(page, lambda listed: listed.files)

    async def signed_url(
        self,
        *,
        method: str = "GET",
        expires_in: float = 0,
        content_type: str = "",
        metadata: CallMetadata | None = None,
        **file: Unpack[FileRef],
    ) -> SignedUrl:
        """A URL that reads (`GET`) or writes (`PUT`) the file for `expires_in` seconds (0: 15 minutes)."""
        methods = {"GET": storage_pb2.SIGNED_URL_METHOD_GET, "PUT": storage_pb2.SIGNED_URL_METHOD_PUT}
        if method.upper() not in methods:
            raise ValueError('method must be "GET" or "PUT"')
        whole = int(expires_in)
        request = storage_pb2.SignedUrlRequest(
            **file,
            method=methods[method.upper()],
            expires_in=duration_pb2.Duration(seconds=whole, nanos=round((expires_in - whole) * 1e9)),
            content_type=content_type,
        )
        response = await self._call(self._stub.SignedUrl, request, metadata=metadata, safe=True)
        return record_from(
            SignedUrl,
            response,
            method=storage_pb2.SignedUrlMethod.Name(response.method).removeprefix("SIGNED_URL_METHOD_"),
            expires_at=response.expire_time.ToDatetime(UTC),
            headers=dict(response.headers),
        )
