"""Files in a folder on the local disk: the embedded default.

Layout under the storage's root: `<key>` holds a file's bytes; `.ductape/meta/<key>.json` its content type,
metadata and SHA-256; `.ductape/tmp/` the files being written. A file is written to a temporary file, flushed to
disk, then renamed over its key, so a reader sees the old file or the new one, never a part. No path ever leaves
the root: every parent folder is resolved (symlinks followed) and must lie inside the root, and the last component
is opened with O_NOFOLLOW. Disk I/O runs in worker threads, one chunk at a time, so the event loop never waits on
the disk and memory holds at most a chunk per transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mimetypes
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

from ductape_processor.adapters.storage.base import (
    Checked,
    FileInfo,
    FileNameInvalid,
    FileNotFound,
    NewFile,
    Repeat,
    SignedUrl,
    StorageAdapter,
    UrlMethod,
)
from ductape_processor.errors import FailedPrecondition
from ductape_processor.reasons import Reason

RESERVED: Final = ".ductape"
"""The root's own folder (metadata, temporary files): no key may start with it."""


class FsStorage(StorageAdapter):
    """A storage in one folder; `signer` (when the processor's storage HTTP listener runs) makes its signed URLs."""

    provider = "fs"

    def __init__(self, root: Path, name: str, signer: Callable[[str, UrlMethod, int, str], SignedUrl] | None) -> None:
        self._root = root
        self._name = name
        self._signer = signer
        self._real: str | None = None

    # -- paths ------------------------------------------------------------------------------------------------

    def _real_root(self) -> str:
        if self._real is None:
            for folder in (self._root, self._root / RESERVED / "meta", self._root / RESERVED / "tmp"):
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._real = os.path.realpath(self._root)
        return self._real

    def _inside(self, folder: str) -> bool:
        root = self._real_root()
        real = os.path.realpath(folder)
        return real == root or real.startswith(root + os.sep)

    def _paths(self, key: str, create: bool = False) -> tuple[str, str]:
        """The file's path and its metadata's path, their folders checked to be inside the root (and made when
        `create`)."""
        if key == RESERVED or key.startswith(RESERVED + "/"):
            raise FileNameInvalid(f"keys starting with {RESERVED!r} are the storage's own")
        root = self._real_root()
        data = os.path.join(root, key)
        meta = os.path.join(root, RESERVED, "meta", key + ".json")
        for path in (data, meta):
            parent = os.path.dirname(path)
            if create:
                self._make_folders(parent)
            if not self._inside(parent):
                raise _outside()
        return data, meta

    def _make_folders(self, folder: str) -> None:
        """Make `folder` one level at a time, each level checked to be inside the root before the next is made
        (`os.makedirs` would make folders wherever a symlinked level points)."""
        current = self._real_root()
        for part in os.path.relpath(folder, current).split(os.sep):
            if part == ".":
                continue
            current = os.path.join(current, part)
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                pass
            except NotADirectoryError:
                raise _not_a_folder() from None
            if not self._inside(current):
                raise _outside()
            if not os.path.isdir(current):
                raise _not_a_folder()

    # -- writing ----------------------------------------------------------------------------------------------

    async def put(self, new: NewFile, chunks: Checked, repeat: Repeat) -> FileInfo:
        # `repeat` goes unused: a disk that failed a write is not a provider that may answer a second attempt.
        data_path, meta_path = await asyncio.to_thread(self._paths, new.key, True)
        tmp = os.path.join(self._real_root(), RESERVED, "tmp", secrets.token_hex(16))
        handle: BinaryIO = await asyncio.to_thread(_create, tmp)
        writing: asyncio.Future[int] | None = None
        try:
            try:
                # Each chunk is written while the next one comes in: one write in flight, one chunk waiting.
                async for chunk in chunks:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(handle.write, chunk))
                if writing is not None:
                    await writing
                await asyncio.to_thread(_flush, handle)
            finally:
                if writing is not None and not writing.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(writing)  # the thread writes on: let it end before the file closes
                await asyncio.to_thread(handle.close)
            info = FileInfo(
                new.key,
                chunks.size,
                chunks.sha256,
                new.content_type,
                dict(new.metadata),
                datetime.now(UTC),
            )
            await asyncio.to_thread(self._commit, tmp, data_path, meta_path, info)
        except BaseException:
            # Cancelled (the caller went away), a failed check or a failed write: the key keeps what it had.
            with contextlib.suppress(OSError):
                await asyncio.shield(asyncio.to_thread(os.unlink, tmp))
            raise
        return info

    def _commit(self, tmp: str, data_path: str, meta_path: str, info: FileInfo) -> None:
        record = {"content_type": info.content_type, "metadata": dict(info.metadata), "sha256": info.sha256}
        meta_tmp = tmp + ".json"
        with open(meta_tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        try:
            if os.path.isdir(data_path) and not os.path.islink(data_path):
                raise _not_a_folder()
            os.replace(meta_tmp, meta_path)
            os.replace(tmp, data_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(meta_tmp)
            raise

    # -- reading ----------------------------------------------------------------------------------------------

    def _open(self, key: str) -> tuple[int, FileInfo]:
        data_path, meta_path = self._paths(key)
        try:
            fd = os.open(data_path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the key itself is a symlink: never followed
                raise _outside() from None
            raise FileNotFound(self._name, key) from None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            raise FileNotFound(self._name, key)
        return fd, self._describe(key, meta_path, status.st_size, status.st_mtime)

    def _describe(self, key: str, meta_path: str, size: int, mtime: float) -> FileInfo:
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            with open(meta_path, encoding="utf-8") as handle:
                loaded = json.load(handle)
            if isinstance(loaded, dict):
                record = loaded
        content_type = record.get("content_type") or mimetypes.guess_type(key)[0] or "application/octet-stream"
        metadata = record.get("metadata")
        return FileInfo(
            key,
            size,
            str(record.get("sha256") or ""),
            str(content_type),
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
            datetime.fromtimestamp(mtime, UTC),
        )

    async def head(self, key: str) -> FileInfo:
        fd, info = await asyncio.to_thread(self._open, key)
        os.close(fd)
        return info

    async def read(self, key: str, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        fd, _ = await asyncio.to_thread(self._open, key)
        try:
            position = start
            while position < stop:
                chunk = await asyncio.to_thread(os.pread, fd, min(chunk_size, stop - position), position)
                if not chunk:
                    return  # the file shrank meanwhile
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    # -- the rest ---------------------------------------------------------------------------------------------

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._delete, key)

    def _delete(self, key: str) -> bool:
        data_path, meta_path = self._paths(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta_path)
        try:
            if os.path.isdir(data_path) and not os.path.islink(data_path):
                return False
            os.unlink(data_path)
        except FileNotFoundError:
            return False
        root = self._real_root()
        for base in (os.path.dirname(data_path), os.path.dirname(meta_path)):
            while base != root and base.startswith(root + os.sep) and base != os.path.join(root, RESERVED, "meta"):
                try:
                    os.rmdir(base)  # only empty folders go
                except OSError:
                    break
                base = os.path.dirname(base)
        return True

    async def list_files(self, prefix: str, after: str, limit: int) -> list[FileInfo]:
        return await asyncio.to_thread(self._list, prefix, after, limit)

    def _list(self, prefix: str, after: str, limit: int) -> list[FileInfo]:
        root = self._real_root()
        # Only the folders that can hold keys with this prefix are walked.
        start = os.path.join(root, os.path.dirname(prefix)) if "/" in prefix else root
        if not self._inside(start) or not os.path.isdir(start):
            return []
        found: list[tuple[str, os.stat_result]] = []
        for folder, folders, files in os.walk(start):
            if folder == root:
                folders[:] = [name for name in folders if name != RESERVED]
            relative = os.path.relpath(folder, root)
            for name in files:
                key = name if relative == "." else f"{relative}/{name}"
                if not key.startswith(prefix) or key.encode() <= after.encode():
                    continue
                with contextlib.suppress(OSError):
                    status = os.lstat(os.path.join(folder, name))
                    if stat.S_ISREG(status.st_mode):  # symlinks are not files of the storage
                        found.append((key, status))
        found.sort(key=lambda item: item[0].encode())
        return [
            self._describe(key, os.path.join(root, RESERVED, "meta", key + ".json"), status.st_size, status.st_mtime)
            for key, status in found[:limit]
        ]

    async def signed_url(self, key: str, method: UrlMethod, expires_s: int, content_type: str) -> SignedUrl:
        if self._signer is None:
            raise FailedPrecondition(
                f"storage {self._name!r} (fs): signed URLs need the storage HTTP listener "
                "(PROCESSOR_STORAGE_HTTP_ADDRESS), which is off",
                reason=Reason.SIGNED_URLS_DISABLED,
                metadata={"storage": self._name},
            )
        await asyncio.to_thread(self._paths, key)
        return self._signer(key, method, expires_s, content_type)


def _create(path: str) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    return os.fdopen(fd, "wb")


def _flush(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _outside() -> FileNameInvalid:
    return FileNameInvalid("resolves outside the storage (through a symbolic link)")


def _not_a_folder() -> FileNameInvalid:
    return FileNameInvalid("a part of the key is a file, or the key is a folder")
