"""A Google Cloud Storage bucket through gcloud-aio-storage (the JSON API, on aiohttp).

gcloud-aio-storage uploads from a file of known length, not from a stream: the chunks are spooled to a temporary
file (on disk, in the storage folder's `.spool/`, written a chunk at a time in a worker thread) and the object is
written once the last chunk passed the runtime's checks, with its SHA-256 in its metadata. A failed or cancelled save
deletes the spool file and sends nothing, so the bucket keeps nothing. Memory per upload: a chunk; disk: the file.
Signed URLs are V4, signed locally with the service account key given as `credentials`.

The client's own retries are off (`_Storage`, `_Token`): the runtime retries, within the caller's deadline. The
client's timeouts are for the connection and for each read of an answer, never for a whole transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import aiohttp
from gcloud.aio.auth import Token
from gcloud.aio.storage import Blob, Bucket, Storage
from gcloud.aio.storage.blob import HOST as BLOB_HOST
from gcloud.aio.storage.storage import SCOPES
from tenacity import stop_after_attempt

from ductape_processor.adapters.storage import base
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.registry.storage import GcsStorageEnv

_FAILURES = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
# gcloud-aio's `timeout` is an int of seconds for the whole request (a download cut at it, however well it flows); it
# passes an aiohttp.ClientTimeout through as it is, so each call gets this one.
_TIMEOUT: Final = cast(
    int, aiohttp.ClientTimeout(total=None, sock_connect=base.CONNECT_TIMEOUT_S, sock_read=base.READ_TIMEOUT_S)
)


class _Token(Token):
    """gcloud-aio's token, fetched in one attempt: its own fetch is tried five times with pauses of up to a minute."""

    async def acquire_access_token(self, timeout: int = 10) -> None:  # type: ignore[override]
        await Token.acquire_access_token.retry_with(stop=stop_after_attempt(1))(self, timeout=timeout)


class _Storage(Storage):
    """gcloud-aio's client with its own retries off: a resumable upload's PUT was tried five times, with pauses of
    1 to 8 s, and the token fetch five times."""

    def __init__(self, credentials: str | None, api_root: str | None) -> None:
        super().__init__(service_file=io.StringIO(credentials) if credentials else None, api_root=api_root)
        self.token = _Token(
            service_file=io.StringIO(credentials) if credentials else None,
            scopes=SCOPES,
            session=self.session.session,  # type: ignore[arg-type]
        )

    async def _do_upload(
        self,
        session_uri: str,
        stream: Any,
        headers: dict[str, str],
        *,
        retries: int = 5,
        session: Any = None,
        timeout: int = 30,
    ) -> dict[str, Any]:
        return await super()._do_upload(session_uri, stream, headers, retries=1, session=session, timeout=timeout)


def _when(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


class GcsStorage(base.StorageAdapter):
    """One bucket; the client and its HTTP session are opened on first use and kept."""

    provider = "gcs"

    def __init__(self, settings: GcsStorageEnv, name: str, spool: Path) -> None:
        self._settings = settings
        self._name = name
        self._spool = spool
        self._bucket = settings.bucket
        self._client: Storage | None = None

    def _storage(self) -> Storage:
        if self._client is None:
            self._client = _Storage(self._settings.credentials, self._settings.endpoint)
        return self._client

    def _failure(self, what: str, exc: BaseException, key: str | None = None) -> ProcessorError:
        status = getattr(exc, "status", 0)
        if key is not None and status == 404:
            return base.FileNotFound(self._name, key)
        if status in (401, 403):
            return base.StorageAccessDenied(
                f"storage {self._name!r} (gcs): {what} refused: HTTP {status}",
                metadata={"storage": self._name, "provider": "gcs"},
            )
        return base.unavailable(self._name, "gcs", what, exc, f"HTTP {status}" if status else "")

    # -- writing ------------------------------------------------------------------------------------------------

    async def put(self, new: base.NewFile, chunks: base.Checked, repeat: base.Repeat) -> base.FileInfo:
        storage = self._storage()
        path = self._spool / secrets.token_hex(16)
        handle: BinaryIO = await asyncio.to_thread(_spool_file, path)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(handle.write, chunk)
            metadata = {"metadata": {**new.metadata, base.SHA256_METADATA: chunks.sha256}}

            async def send() -> None:
                # The spooled file is sent whole each attempt: a second attempt writes the same object again.
                await asyncio.to_thread(handle.seek, 0)
                try:
                    await storage.upload(
                        self._bucket,
                        new.key,
                        handle,
                        content_type=new.content_type,
                        metadata=metadata,
                        force_resumable_upload=chunks.size > 8 * 1024 * 1024,
                        timeout=_TIMEOUT,
                    )
                except _FAILURES as exc:
                    raise self._failure("save", exc) from None

            await repeat("save", send)
        finally:
            await asyncio.shield(asyncio.to_thread(_discard, handle, path))
        return base.FileInfo(new.key, chunks.size, chunks.sha256, new.content_type, dict(new.metadata))

    # -- reading ------------------------------------------------------------------------------------------------

    def _info(self, item: dict[str, Any]) -> base.FileInfo:
        metadata = {str(k): str(v) for k, v in (item.get("metadata") or {}).items()}
        sha256 = metadata.pop(base.SHA256_METADATA, "")
        return base.FileInfo(
            str(item.get("name", "")),
            int(item.get("size", 0)),
            sha256,
            str(item.get("contentType") or ""),
            metadata,
            _when(item.get("updated")),
        )

    async def head(self, key: str) -> base.FileInfo:
        try:
            item = await self._storage().download_metadata(self._bucket, key, timeout=_TIMEOUT)
        except _FAILURES as exc:
            raise self._failure("head", exc, key) from None
        return self._info(item)

    async def read(self, key: str, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            stream = await self._storage().download_stream(
                self._bucket, key, headers={"Range": f"bytes={start}-{stop - 1}"}, timeout=_TIMEOUT
            )
            sent = 0
            while sent < stop - start:
                chunk = await stream.read(min(chunk_size, stop - start - sent))
                if not chunk:
                    return
                sent += len(chunk)
                yield chunk
        except _FAILURES as exc:
            raise self._failure("download", exc, key) from None

    # -- the rest -----------------------------------------------------------------------------------------------

    async def delete(self, key: str) -> bool:
        try:
            await self._storage().delete(self._bucket, key, timeout=_TIMEOUT)
        except _FAILURES as exc:
            if getattr(exc, "status", 0) == 404:
                return False
            raise self._failure("delete", exc, key) from None
        return True

    async def list_files(self, prefix: str, after: str, limit: int) -> list[base.FileInfo]:
        found: list[base.FileInfo] = []
        params: dict[str, str] = {"maxResults": str(min(limit + 1, 1000))}
        if prefix:
            params["prefix"] = prefix
        if after:
            params["startOffset"] = after  # inclusive, and not every emulator honours it: filtered below too
        try:
            while len(found) < limit:
                page = await self._storage().list_objects(self._bucket, params=params, timeout=_TIMEOUT)
                for item in page.get("items", []):
                    name = str(item.get("name", ""))
                    if name.encode() > after.encode() and len(found) < limit:
                        found.append(self._info(item))
                token = page.get("nextPageToken")
                if not token:
                    break
                params["pageToken"] = str(token)
        except _FAILURES as exc:
            raise self._failure("list", exc) from None
        return found

    async def signed_url(self, key: str, method: base.UrlMethod, expires_s: int, content_type: str) -> base.SignedUrl:
        storage = self._storage()
        if not self._settings.credentials or not storage.token.service_data.get("private_key"):
            raise base.StorageAccessDenied(
                f"storage {self._name!r} (gcs): signed URLs need a service account key in `credentials`",
                metadata={"storage": self._name, "provider": "gcs"},
            )
        headers = {"Content-Type": content_type} if method is base.UrlMethod.PUT and content_type else {}
        blob = Blob(Bucket(storage, self._bucket), key, {"size": 0})
        try:
            # V4, signed here with the service account's key (no call to Google); the signature covers the headers.
            url = await blob.get_signed_url(expires_s, headers=dict(headers), http_method=method.value)
        except (ValueError, TypeError) as exc:
            raise self._failure("signing", exc, key) from None
        if self._settings.endpoint:
            # An emulator: the same path and query, on its address (the signature names the real host).
            url = self._settings.endpoint + url.removeprefix(f"https://{BLOB_HOST}")
        return base.SignedUrl(url, headers)

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()


def _spool_file(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    return os.fdopen(fd, "w+b")


def _discard(handle: BinaryIO, path: Path) -> None:
    handle.close()
    with contextlib.suppress(OSError):
        path.unlink()
