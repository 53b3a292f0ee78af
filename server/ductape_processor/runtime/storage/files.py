"""What a file must be to be saved: its key, content type and metadata checked, its type sniffed when not given,
and its bytes checked as they stream in (`Intake`: size limit, declared size, declared checksum)."""

from __future__ import annotations

import hashlib
import mimetypes
import re
import unicodedata
from collections.abc import AsyncIterator, Mapping
from typing import Final

from ductape_processor.adapters.storage.base import Checked, FileNameInvalid
from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason

MAX_KEY_BYTES: Final = 1024
"""The longest key, in UTF-8 bytes: S3's and GCS's limit, under Azure's."""
MAX_METADATA_ENTRIES: Final = 64
"""Metadata entries a file may carry."""
MAX_METADATA_BYTES: Final = 2048
"""UTF-8 bytes of all metadata keys and values together: S3 allows 2 KiB of user metadata."""
SNIFF_BYTES: Final = 8192
"""Bytes of a file's start that its content type is sniffed from."""
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
_METADATA_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")  # Azure wants C# identifiers; no '-', lower case for S3
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*\Z")  # HTTP header values on every provider: printable ASCII
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(;[ -~]*)?\Z")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")


def checked_key(key: str, field: str = "file_name") -> str:
    """`key` when it is a key every provider stores at the same name and no provider can read as a path that
    leaves the storage; else FILE_NAME_INVALID naming `field`."""
    if not key:
        raise FileNameInvalid("is required", field)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise FileNameInvalid(f"is longer than {MAX_KEY_BYTES} bytes (UTF-8)", field)
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in key):
        raise FileNameInvalid("may not hold control characters (NUL, CR, LF, tab …)", field)
    if "\\" in key:
        raise FileNameInvalid("may not hold '\\' (segments are separated by '/')", field)
    if key.startswith("/"):
        raise FileNameInvalid("is relative to the storage: it may not start with '/'", field)
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise FileNameInvalid("may not have an empty, '.' or '..' segment", field)
    return key


def checked_prefix(prefix: str) -> str:
    """A List prefix: a key's start, so the key's rules apply except that it may be empty or end with '/'."""
    if prefix:
        checked_key(prefix.removesuffix("/") or ".", "prefix")
    return prefix


def checked_content_type(content_type: str, field: str = "content_type") -> str:
    """A media type (`type/subtype`, parameters allowed) or "" for none."""
    if content_type and not _CONTENT_TYPE.match(content_type):
        raise InvalidArgument.field(field, "must be a media type such as 'image/png' (printable ASCII)")
    return content_type


def checked_metadata(metadata: Mapping[str, str], field: str = "metadata") -> dict[str, str]:
    """Metadata every provider keeps as given, or INVALID_ARGUMENT listing each bad entry."""
    problems: list[FieldViolation] = []
    if len(metadata) > MAX_METADATA_ENTRIES:
        problems.append(FieldViolation(field, f"has more than {MAX_METADATA_ENTRIES} entries"))
    total = 0
    for key, value in metadata.items():
        total += len(key.encode()) + len(value.encode())
        if not _METADATA_KEY.match(key) or key.startswith("ductape_"):
            problems.append(
                FieldViolation(
                    f"{field}.{key}",
                    "keys are lower-case letters, digits and '_', starting with a letter, at most 64 characters, "
                    "not starting with 'ductape_'",
                )
            )
        elif not _METADATA_VALUE.match(value):
            problems.append(FieldViolation(f"{field}.{key}", "values are printable ASCII"))
    if total > MAX_METADATA_BYTES:
        problems.append(FieldViolation(field, f"holds more than {MAX_METADATA_BYTES} bytes"))
    if problems:
        raise InvalidArgument(f"{problems[0].field}: {problems[0].description}", violations=problems)
    return dict(metadata)


def checked_sha256(value: str, field: str = "sha256") -> str:
    """A declared checksum, lower case, or "" for none."""
    if value and not _SHA256.match(value):
        raise InvalidArgument.field(field, "must be 64 hex digits (a SHA-256)")
    return value.lower()


def content_type_of(given: str, key: str, first: bytes) -> str:
    """The type given; else sniffed from the file's first bytes; else guessed from its name; else bytes."""
    if given:
        return given
    # Imported by the first save that sniffs, not with the server: its tables of signatures are ~0.4 MB.
    import filetype  # type: ignore[import-untyped]

    sniffed = filetype.guess_mime(first[:SNIFF_BYTES]) if first else None
    return str(sniffed or mimetypes.guess_type(key)[0] or DEFAULT_CONTENT_TYPE)


class Intake(Checked):
    """The chunks of one save: `first` (already read, to sniff the type), then `rest`. Iterating raises
    FILE_TOO_LARGE as soon as the bytes pass `limit`, and when the stream ends, UPLOAD_INCOMPLETE if `declared_size`
    (0: none) was not met and CHECKSUM_MISMATCH if `declared_sha256` ("" : none) differs, so the adapter writing
    them keeps nothing."""

    def __init__(
        self,
        first: bytes,
        rest: AsyncIterator[bytes] | None,
        *,
        limit: int,
        declared_size: int = 0,
        declared_sha256: str = "",
        size_field: str = "size",
    ) -> None:
        self._first = first
        self._rest = rest
        self._limit = limit
        self._declared_size = declared_size
        self._declared_sha256 = declared_sha256
        self._size_field = size_field
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._size

    def _take(self, chunk: bytes) -> bytes:
        self._size += len(chunk)
        if self._size > self._limit:
            raise too_large(self._size, self._limit, "data")
        if self._declared_size and self._size > self._declared_size:
            raise _incomplete(f"more bytes came than the {self._declared_size} declared", self._size_field)
        self._hash.update(chunk)
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._take(self._first)
            self._first = b""
        if self._rest is not None:
            async for chunk in self._rest:
                if chunk:
                    yield self._take(chunk)
        if self._declared_size and self._size != self._declared_size:
            raise _incomplete(
                f"the stream ended after {self._size} of the {self._declared_size} bytes declared", self._size_field
            )
        if self._declared_sha256 and self._declared_sha256 != self._hash.hexdigest():
            raise InvalidArgument(
                f"sha256: the bytes received hash to {self._hash.hexdigest()}, not the {self._declared_sha256} "
                "declared; nothing was kept",
                reason=Reason.CHECKSUM_MISMATCH,
                violations=[FieldViolation("sha256", "does not match the bytes received")],
            )


def too_large(size: int, limit: int, field: str) -> InvalidArgument:
    """FILE_TOO_LARGE: `size` bytes where at most `limit` are allowed."""
    return InvalidArgument(
        f"{field}: the file is over the limit of {limit} bytes ({size} or more)",
        reason=Reason.FILE_TOO_LARGE,
        metadata={"limit": str(limit)},
        violations=[FieldViolation(field, f"is more than {limit} bytes")],
    )


def _incomplete(description: str, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {description}; nothing was kept",
        reason=Reason.UPLOAD_INCOMPLETE,
        violations=[FieldViolation(field, description)],
    )
