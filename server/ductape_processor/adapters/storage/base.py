"""The interface every storage provider implements, and the errors they raise.

An adapter is one client (pool) for one storage environment: a folder, a bucket or a container. It writes a file
from a stream of chunks so that the file exists only once the stream ended well (a temporary file renamed, a
multipart upload completed, a block list committed) and leaves nothing behind otherwise: the runtime checks sizes
and checksums *inside* that stream, raising from it, so an adapter only has to discard whatever it wrote when
iterating the chunks raises. Key validation, content types, limits, retries and paging are the runtime's
(runtime/storage/), written once for every provider: an adapter makes one attempt of each call, with its client's
own retries off, and hands the steps of a save that are safe to repeat to the runtime's `Repeat`.

Adding a provider is one module that subclasses `StorageAdapter`, plus one entry in `registry.STORAGE_PROVIDERS`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Protocol, TypeVar

import grpc

from ductape_processor.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ProcessorError,
    Unavailable,
)
from ductape_processor.reasons import Reason

T = TypeVar("T")
CONNECT_TIMEOUT_S: Final = 5.0
"""How long a provider's client waits for a connection to open before the attempt fails."""
READ_TIMEOUT_S: Final = 60.0
"""How long a provider's client waits for the next bytes of an answer (not for the whole answer: a large download
takes what it takes). The runtime cuts a metadata call's attempt much sooner, and any attempt at the caller's
deadline."""

SHA256_METADATA: Final = "ductape_sha256"
"""The metadata key under which cloud providers keep a file's SHA-256 (callers' keys may not start `ductape_`)."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A stored file as the processor describes it."""

    key: str
    size: int
    sha256: str = ""
    content_type: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    updated: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewFile:
    """What is known of a file before its bytes are written: its key, type, metadata, and the checksum its caller
    declared (empty when none: then only the runtime knows the checksum, once the bytes are in)."""

    key: str
    content_type: str
    metadata: Mapping[str, str]
    sha256: str = ""


class Checked(abc.ABC):
    """The chunks of one save, checked as they pass (size limit, declared size and checksum). Iterating raises
    when a check fails, at the latest when the stream ends; `sha256` and `size` are final once it has ended."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @property
    @abc.abstractmethod
    def sha256(self) -> str:
        """The hex SHA-256 of the bytes read so far."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The bytes read so far."""


class Repeat(Protocol):
    """How an adapter runs a step of a save that is safe to repeat, because the adapter holds its bytes (a whole
    small file, one part, a commit of parts): again while it raises `StorageUnavailable`, within the runtime's retry
    budget and the caller's deadline. A step must map its client's errors itself (`StorageUnavailable` for those
    worth another attempt); the caller's stream is never read inside one."""

    def __call__(self, what: str, step: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


class UrlMethod(enum.Enum):
    """What a signed URL lets its holder do."""

    GET = "GET"
    PUT = "PUT"


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A URL that reads or writes one file, and the headers its request must send."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


class StorageAdapter(abc.ABC):
    """One storage environment: a folder, a bucket, a container."""

    provider: str = ""

    @abc.abstractmethod
    async def put(self, new: NewFile, chunks: Checked, repeat: Repeat) -> FileInfo:
        """Write the file from `chunks`; it replaces any file with that key only once every chunk was read. When
        iterating `chunks` raises (a check failed, the caller went away) nothing is kept and the error propagates.
        Requests that send bytes already read (and only those) go through `repeat`."""

    @abc.abstractmethod
    async def head(self, key: str) -> FileInfo:
        """The file's description; `FileNotFound` when there is none."""

    @abc.abstractmethod
    def read(self, key: str, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        """Bytes `start` to `stop` (exclusive) of the file, in chunks of at most `chunk_size`; the runtime has
        checked the range against the file's size."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete the file; False when there was none."""

    @abc.abstractmethod
    async def list_files(self, prefix: str, after: str, limit: int) -> list[FileInfo]:
        """At most `limit` files whose key starts with `prefix` and sorts after `after`, in key order (by UTF-8
        bytes). Providers fill what their listing gives: always the key and the size."""

    @abc.abstractmethod
    async def signed_url(self, key: str, method: UrlMethod, expires_s: int, content_type: str) -> SignedUrl:
        """A URL that reads or writes the file for `expires_s` seconds."""

    async def close(self) -> None:  # noqa: B027 - most providers have something to release, fs has nothing
        """Release the client; the adapter is not used again."""


class StorageUnavailable(Unavailable, reason=Reason.STORAGE_UNAVAILABLE):
    """The provider cannot be reached or failed; a retry may succeed. The message never quotes a credential."""


class StorageAccessDenied(FailedPrecondition, reason=Reason.STORAGE_ACCESS_DENIED):
    """The provider refused the processor's credentials for this storage."""


class FileNotFound(NotFound, reason=Reason.FILE_NOT_FOUND):
    """The storage has no file with this key."""

    def __init__(self, storage: str, key: str) -> None:
        super().__init__(f"storage {storage!r} has no file {key!r}", metadata={"storage": storage, "file_name": key})


class FileNameInvalid(InvalidArgument, reason=Reason.FILE_NAME_INVALID):
    """A key that is not allowed (`..`, control characters, too long) or that would leave the storage."""

    def __init__(self, description: str, field: str = "file_name") -> None:
        super().__init__(f"{field}: {description}", violations=[FieldViolation(field, description)])


class RangeNotSatisfiable(ProcessorError, code=grpc.StatusCode.OUT_OF_RANGE, reason=Reason.RANGE_NOT_SATISFIABLE):
    """A download's offset is past the end of the file."""


def unavailable(storage: str, provider: str, what: str, exc: BaseException, code: str = "") -> StorageUnavailable:
    """The error callers see when a provider fails: what was being done, the error's type and the provider's error
    code, never the error's text (a driver's message may quote an endpoint with credentials or a signed request)."""
    why = f"{type(exc).__name__} ({code})" if code else type(exc).__name__
    return StorageUnavailable(
        f"storage {storage!r} ({provider}): {what} failed: {why}",
        metadata={"storage": storage, "provider": provider},
    )
