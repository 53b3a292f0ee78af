"""StorageRuntime: save, stream, read, list and delete a product's files, whatever provider each environment uses.

It resolves (product, env, storage tag) through the registry to the storage's settings in that environment, opens
(lazily, once per settings) the provider's adapter found in `adapters.storage.registry.STORAGE_PROVIDERS`, checks
keys, metadata, sizes and checksums (files.py), and retries what is safe to repeat (attempts.py: a file's
description, a listing, a delete, signing, a small file read whole, and the steps of a save whose bytes are in hand)
within the call's deadline. A save's stream is never read twice: the caller's bytes are taken once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from ductape_processor.adapters.storage.base import FileInfo as FileInfo
from ductape_processor.adapters.storage.base import (
    NewFile,
    RangeNotSatisfiable,
    SignedUrl,
    StorageAdapter,
)
from ductape_processor.adapters.storage.base import UrlMethod as UrlMethod
from ductape_processor.adapters.storage.registry import STORAGE_PROVIDERS, Placement, Signer
from ductape_processor.errors import FailedPrecondition, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies import Deadline
from ductape_processor.runtime.policies.environments import EnvironmentAdapters, EnvironmentRef
from ductape_processor.runtime.policies.paging import decode_page_token, effective_page_size, page
from ductape_processor.runtime.policies.periodic import cancel_and_wait
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.storage import StorageEnv
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.storage.attempts import Attempts
from ductape_processor.runtime.storage.files import (
    Intake,
    checked_content_type,
    checked_key,
    checked_metadata,
    checked_prefix,
    checked_sha256,
    content_type_of,
    too_large,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES: Final = 1024 * 1024
"""The chunk size of a Download that asks for none."""
CHUNK_HEADROOM: Final = 1024
"""Bytes of a gRPC message left for what wraps a chunk."""
DEFAULT_URL_EXPIRY_S: Final = 15 * 60
"""How long a signed URL lasts when its request says nothing."""
MAX_URL_EXPIRY_S: Final = 7 * 24 * 3600
"""The longest a signed URL may last: S3's limit for presigned URLs."""
READ_AHEAD: Final = 1
"""Chunks of a download read ahead of the one being sent."""


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage as a call names it: product, environment (slug or name) and the storage's tag."""

    product: str
    env: str
    tag: str


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A file to save, as its caller describes it."""

    key: str
    content_type: str = ""
    metadata: dict[str, str] | None = None
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class Opened:
    """A storage environment in use: its name in errors, its limit, its adapter."""

    name: str
    max_file_bytes: int
    adapter: StorageAdapter

    def attempts(self, deadline: Deadline) -> Attempts:
        """The attempts of one call to this storage's provider, within the caller's deadline."""
        return Attempts(self.name, self.adapter.provider, deadline)


class StorageRuntime:
    """Every storage call, with one adapter per storage environment (and settings)."""

    def __init__(
        self,
        services: CallServices,
        *,
        storage_root: Path,
        max_file_bytes: int,
        max_message_bytes: int,
        signer: Callable[[StorageRef], Signer] | None = None,
    ) -> None:
        self._registry = services.registry
        self._root = storage_root
        self._max_file_bytes = max_file_bytes
        self._max_message_bytes = max_message_bytes
        self._signer = signer
        self._adapters: EnvironmentAdapters[StorageAdapter] = EnvironmentAdapters("storage", services.secrets)

    # -- resolution ---------------------------------------------------------------------------------------------

    async def open(self, ref: StorageRef) -> Opened:
        """The storage a call names, with its (lazily opened, shared) adapter."""
        resolved = await self._registry.resolve(ref.product, ref.env)
        storage = named(ref.product, resolved.manifest.storage, "storage", ref.tag, Reason.STORAGE_NOT_FOUND)
        environment = EnvironmentRef(resolved.product, resolved.version, resolved.env.slug, storage.tag)
        adapter = self._adapters.get(
            environment, storage.envs[environment.env], lambda settings: self._build(environment, settings)
        )
        return Opened(environment.name, storage.max_file_bytes or self._max_file_bytes, adapter)

    def _build(self, environment: EnvironmentRef, settings: StorageEnv) -> StorageAdapter:
        """The adapter of one storage environment, from its settings (secrets resolved); it connects on first use."""
        provider = STORAGE_PROVIDERS.get(settings.provider)
        ref = StorageRef(environment.product, environment.env, environment.tag)
        placement = Placement(
            environment.name,
            self._root,
            f"{environment.product}/{environment.tag}/{environment.env}",
            self._signer(ref) if self._signer is not None else None,
        )
        try:
            if provider is None:
                raise ImportError(name=settings.provider)
            return provider.open(settings, placement)
        except ImportError as exc:
            raise FailedPrecondition(
                f"storage {environment.tag!r}: the {settings.provider} provider is not available on this "
                f"processor (missing {exc.name})",
                reason=Reason.STORAGE_PROVIDER_UNAVAILABLE,
                metadata={"storage": environment.tag, "provider": settings.provider},
            ) from None

    # -- writing ------------------------------------------------------------------------------------------------

    async def save(self, ref: StorageRef, spec: FileSpec, data: bytes, deadline: Deadline | None = None) -> FileInfo:
        """Save a file given whole."""
        return await self.upload(ref, spec, _once(data), declared_size=0, size_field="data", deadline=deadline)

    async def upload(
        self,
        ref: StorageRef,
        spec: FileSpec,
        chunks: AsyncIterator[bytes],
        *,
        declared_size: int,
        size_field: str = "size",
        deadline: Deadline | None = None,
    ) -> FileInfo:
        """Save a file from a stream of chunks: it exists once the stream ended with every check passed. The
        provider's steps whose bytes are in hand are retried (`Attempts.step`), never the stream."""
        key = checked_key(spec.key)
        content_type = checked_content_type(spec.content_type)
        metadata = checked_metadata(spec.metadata or {})
        sha256 = checked_sha256(spec.sha256)
        if declared_size < 0:
            raise InvalidArgument.field(size_field, "must not be negative")
        opened = await self.open(ref)
        if declared_size > opened.max_file_bytes:
            raise too_large(declared_size, opened.max_file_bytes, size_field)
        first = b""
        async for chunk in chunks:
            if chunk:
                first = chunk
                break
        intake = Intake(
            first,
            chunks,
            limit=opened.max_file_bytes,
            declared_size=declared_size,
            declared_sha256=sha256,
            size_field=size_field,
        )
        new = NewFile(key, content_type_of(content_type, key, first), metadata, sha256)
        return await opened.adapter.put(new, intake, opened.attempts(deadline or Deadline(None)).step)

    # -- reading ------------------------------------------------------------------------------------------------

    async def head(self, ref: StorageRef, key: str, deadline: Deadline) -> tuple[Opened, FileInfo]:
        """A file's description."""
        checked_key(key)
        opened = await self.open(ref)
        return opened, await opened.attempts(deadline).metadata("head", lambda: opened.adapter.head(key))

    async def download(
        self, ref: StorageRef, key: str, offset: int, length: int, chunk_size: int, deadline: Deadline
    ) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """A file's description and its bytes from `offset` (`length` of them; 0: to the end), in chunks."""
        if offset < 0:
            raise InvalidArgument.field("offset", "must not be negative")
        if length < 0:
            raise InvalidArgument.field("length", "must not be negative")
        largest = self._max_message_bytes - CHUNK_HEADROOM
        if chunk_size < 0 or chunk_size > largest:
            raise InvalidArgument.field("chunk_size", f"must be between 0 (1 MiB) and {largest}")
        opened, info = await self.head(ref, key, deadline)
        if offset > info.size:
            raise RangeNotSatisfiable(
                f"offset {offset} is past the end of {key!r} ({info.size} bytes)",
                metadata={"storage": opened.name, "file_name": key, "size": str(info.size)},
            )
        stop = info.size if not length else min(info.size, offset + length)
        size = min(chunk_size or DEFAULT_CHUNK_BYTES, largest)
        chunks = _read_ahead(opened.adapter.read(key, offset, stop, size)) if stop > offset else _once(b"")
        return info, chunks

    async def read(self, ref: StorageRef, key: str, deadline: Deadline) -> tuple[FileInfo, bytes]:
        """A small file, whole: one that fits a gRPC message, else FILE_TOO_LARGE (Download streams any size)."""
        opened, info = await self.head(ref, key, deadline)
        limit = self._max_message_bytes - CHUNK_HEADROOM - 4096
        if info.size > limit:
            raise too_large(info.size, limit, "file_name")
        if not info.size:
            return info, b""  # no range to ask for (a provider may refuse an empty one)

        async def whole() -> bytes:
            return b"".join([chunk async for chunk in opened.adapter.read(key, 0, info.size, DEFAULT_CHUNK_BYTES)])

        # Nothing is sent before the whole file is in, so a read cut off part way is safe to start again.
        return info, await opened.attempts(deadline).step("download", whole)

    # -- the rest -----------------------------------------------------------------------------------------------

    async def delete(self, ref: StorageRef, key: str, deadline: Deadline) -> bool:
        """Delete a file; False when there was none."""
        checked_key(key)
        opened = await self.open(ref)
        return await opened.attempts(deadline).metadata("delete", lambda: opened.adapter.delete(key))

    async def list_files(
        self, ref: StorageRef, prefix: str, page_size: int, page_token: str, deadline: Deadline
    ) -> tuple[list[FileInfo], str]:
        """One page of files whose key starts with `prefix`, in key order, and the next page's token."""
        checked_prefix(prefix)
        size = effective_page_size(page_size)
        listing = ["storage", ref.product, ref.env, ref.tag, prefix]
        after = decode_page_token(listing, page_token, _key_position) if page_token else ""
        opened = await self.open(ref)
        fetched = await opened.attempts(deadline).metadata(
            "list", lambda: opened.adapter.list_files(prefix, after, size + 1)
        )
        return page(fetched, size, listing, lambda info: [info.key])

    async def signed_url(
        self,
        ref: StorageRef,
        key: str,
        method: UrlMethod,
        expires_s: float,
        content_type: str,
        deadline: Deadline,
    ) -> tuple[SignedUrl, datetime]:
        """A URL that reads or writes one file until the moment returned with it."""
        checked_key(key)
        checked_content_type(content_type)
        if expires_s < 0 or expires_s > MAX_URL_EXPIRY_S:
            raise InvalidArgument.field("expires_in", f"must be between 0 (15 minutes) and {MAX_URL_EXPIRY_S} s")
        seconds = int(expires_s) or DEFAULT_URL_EXPIRY_S
        opened = await self.open(ref)
        expires = datetime.now(UTC) + timedelta(seconds=seconds)
        url = await opened.attempts(deadline).metadata(
            "signing", lambda: opened.adapter.signed_url(key, method, seconds, content_type)
        )
        return url, expires

    async def close(self) -> None:
        """Close every adapter."""
        await self._adapters.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read_ahead(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks`, with the next one being read from the provider while the caller sends the current one (a download
    otherwise waits for the disk or the network, then for gRPC, in turn). At most READ_AHEAD chunks wait."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(READ_AHEAD)

    async def fill() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(None)
        except Exception as exc:  # handed to the reader, which raises it where the chunk would have been
            await queue.put(exc)

    filling = asyncio.ensure_future(fill())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await cancel_and_wait(filling)
        await chunks.aclose()  # type: ignore[attr-defined]


def _key_position(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError
    return key
