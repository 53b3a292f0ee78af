"""An Azure Blob Storage container through azure-storage-blob's aio client.

A file that fits in one block is one upload once its bytes are in and checked. A larger one is staged block by
block as they fill (two at a time) and exists only when the block list is committed, after the last chunk passed
the runtime's checks; staged blocks that are never committed are not a blob (Azure discards them after a week). The
commit carries the content type and the metadata, the SHA-256 included, so every blob the processor wrote has it.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import aiohttp
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobBlock, BlobSasPermissions, ContentSettings, generate_blob_sas
from azure.storage.blob.aio import ContainerClient

from ductape_processor.adapters.storage import base
from ductape_processor.adapters.storage.parts import PartedUpload
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.registry.storage import AzureStorageEnv

BLOCK_BYTES: Final = 8 * 1024 * 1024
"""The size of the blocks a large file is staged in; a file up to this size is one upload."""
BLOCKS_IN_FLIGHT: Final = 2
"""Blocks of one upload staged at once."""
GET_BYTES: Final = 4 * 1024 * 1024
"""The size of each ranged GET of a download, the first one included (the SDK's own first GET is 32 MiB, held whole
in memory while the stream drains it)."""
_FAILURES = (AzureError, aiohttp.ClientError, OSError)
T = TypeVar("T")


class AzureStorage(base.StorageAdapter):
    """One container; the client is built on first use and kept."""

    provider = "azure"

    def __init__(self, settings: AzureStorageEnv, name: str) -> None:
        self._settings = settings
        self._name = name
        self._client: ContainerClient | None = None

    def _container(self) -> ContainerClient:
        if self._client is None:
            settings = self._settings
            # No SDK retries (its first pause is 15 s): the runtime retries what is safe to repeat, within the deadline.
            options: dict[str, Any] = {
                "retry_total": 0,
                "connection_timeout": base.CONNECT_TIMEOUT_S,
                "read_timeout": base.READ_TIMEOUT_S,
                "max_single_get_size": GET_BYTES,
                "max_chunk_get_size": GET_BYTES,
            }
            if settings.connection_string is not None:
                self._client = ContainerClient.from_connection_string(
                    settings.connection_string, settings.container, **options
                )
            else:
                account = settings.account or ""
                url = settings.endpoint or f"https://{account}.blob.core.windows.net"
                credential = (
                    {"account_name": account, "account_key": settings.account_key} if settings.account_key else None
                )
                self._client = ContainerClient(url, settings.container, credential=credential, **options)
        return self._client

    def _failure(self, what: str, exc: BaseException, key: str | None = None) -> ProcessorError:
        code = str(getattr(exc, "error_code", "") or "")
        if key is not None and isinstance(exc, ResourceNotFoundError) and code in ("", "BlobNotFound"):
            return base.FileNotFound(self._name, key)
        if isinstance(exc, ClientAuthenticationError) or code in ("AuthenticationFailed", "AuthorizationFailure"):
            return base.StorageAccessDenied(
                f"storage {self._name!r} (azure): {what} refused: {code or type(exc).__name__}",
                metadata={"storage": self._name, "provider": "azure"},
            )
        return base.unavailable(self._name, "azure", what, exc, code)

    # -- writing ------------------------------------------------------------------------------------------------

    async def put(self, new: base.NewFile, chunks: base.Checked, repeat: base.Repeat) -> base.FileInfo:
        blob = self._container().get_blob_client(new.key)

        async def saving(request: Awaitable[T]) -> T:
            try:
                return await request
            except _FAILURES as exc:
                raise self._failure("save", exc) from None

        async def start() -> None:
            pass  # a blob's blocks need no session: staging the first one is the start

        async def send(number: int, body: bytes) -> str:
            # A block staged again under its id replaces the first; the commit names each id once.
            block_id = base64.b64encode(f"{number:08d}".encode()).decode()
            await repeat("save", lambda: saving(blob.stage_block(block_id, body, length=len(body))))
            return block_id

        upload = PartedUpload(BLOCK_BYTES, BLOCKS_IN_FLIGHT, start, send)
        try:
            whole = await upload.run(chunks)
            metadata = {**new.metadata, base.SHA256_METADATA: chunks.sha256}
            settings = ContentSettings(content_type=new.content_type)
            if whole is not None:
                await repeat(
                    "save",
                    lambda: saving(
                        blob.upload_blob(whole, overwrite=True, content_settings=settings, metadata=metadata)
                    ),
                )
            else:
                blocks = [BlobBlock(block_id) for block_id in upload.results]
                await repeat(
                    "save", lambda: saving(blob.commit_block_list(blocks, content_settings=settings, metadata=metadata))
                )
        except _FAILURES as exc:
            raise self._failure("save", exc) from None
        return base.FileInfo(new.key, chunks.size, chunks.sha256, new.content_type, dict(new.metadata))

    # -- reading ------------------------------------------------------------------------------------------------

    async def head(self, key: str) -> base.FileInfo:
        try:
            properties = await self._container().get_blob_client(key).get_blob_properties()
        except _FAILURES as exc:
            raise self._failure("head", exc, key) from None
        metadata = dict(properties.metadata or {})
        sha256 = metadata.pop(base.SHA256_METADATA, "")
        content_type = properties.content_settings.content_type or ""
        return base.FileInfo(key, int(properties.size), sha256, content_type, metadata, properties.last_modified)

    async def read(self, key: str, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            downloader = await self._container().get_blob_client(key).download_blob(offset=start, length=stop - start)
            async for chunk in downloader.chunks():
                # The SDK's chunks are its own size (4 MiB): cut them to the size asked.
                for begin in range(0, len(chunk), chunk_size):
                    yield chunk[begin : begin + chunk_size]
        except _FAILURES as exc:
            raise self._failure("download", exc, key) from None

    # -- the rest -----------------------------------------------------------------------------------------------

    async def delete(self, key: str) -> bool:
        try:
            await self._container().get_blob_client(key).delete_blob()
        except ResourceNotFoundError as exc:
            if str(getattr(exc, "error_code", "") or "") in ("", "BlobNotFound"):
                return False
            raise self._failure("delete", exc, key) from None
        except _FAILURES as exc:
            raise self._failure("delete", exc, key) from None
        return True

    async def list_files(self, prefix: str, after: str, limit: int) -> list[base.FileInfo]:
        found: list[base.FileInfo] = []
        # Azure lists in key order but cannot start after a key: blobs up to `after` are skipped as they come.
        try:
            async for item in self._container().list_blobs(name_starts_with=prefix or None, include=["metadata"]):
                if item.name.encode() <= after.encode():
                    continue
                metadata = dict(item.metadata or {})
                sha256 = metadata.pop(base.SHA256_METADATA, "")
                content_type = item.content_settings.content_type or ""
                found.append(
                    base.FileInfo(item.name, int(item.size), sha256, content_type, metadata, item.last_modified)
                )
                if len(found) >= limit:
                    break
        except (HttpResponseError, *_FAILURES) as exc:
            raise self._failure("list", exc) from None
        return found

    async def signed_url(self, key: str, method: base.UrlMethod, expires_s: int, content_type: str) -> base.SignedUrl:
        container = self._container()
        credential = container.credential
        account_key = getattr(credential, "account_key", None)
        if not account_key:
            raise base.StorageAccessDenied(
                f"storage {self._name!r} (azure): signed URLs need the account key (account_key or a connection "
                "string holding it)",
                metadata={"storage": self._name, "provider": "azure"},
            )
        permission = (
            BlobSasPermissions(create=True, write=True)
            if method is base.UrlMethod.PUT
            else BlobSasPermissions(read=True)
        )
        token = generate_blob_sas(
            container.account_name or "",
            container.container_name,
            key,
            account_key=account_key,
            permission=permission,
            expiry=datetime.now(UTC) + timedelta(seconds=expires_s),
            start=datetime.now(UTC) - timedelta(minutes=5),  # a little clock skew between here and Azure
        )
        headers = {"x-ms-blob-type": "BlockBlob"} if method is base.UrlMethod.PUT else {}
        if method is base.UrlMethod.PUT and content_type:
            headers["Content-Type"] = content_type
        return base.SignedUrl(f"{container.get_blob_client(key).url}?{token}", headers)

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
