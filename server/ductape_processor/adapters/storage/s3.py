"""An S3 bucket (AWS, or any S3-compatible store at an endpoint) through aiobotocore.

A file that fits in one part is sent with one PutObject once all its bytes are in (and checked), carrying its SHA-256
in its metadata. A larger file is a multipart upload: parts of PART_BYTES go up as they fill, at most
PARTS_IN_FLIGHT at a time, and the upload is completed only after the last chunk passed the runtime's checks; on
any failure, cancellation included, it is aborted, so S3 keeps nothing. Its metadata is written when it starts,
so it carries the SHA-256 only when the caller declared one. Memory per upload: the parts in flight and the one
filling.

botocore's own retries are off (one attempt per request): the runtime retries, within the caller's deadline, the
reads and the requests of a save whose bytes are in hand (the PutObject, each part, the start and the completion).
With botocore's retries as well, each of the runtime's attempts was up to three of botocore's, with pauses of up to
2 s and more between them: a bucket that refused connections was answered only at the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ductape_processor.adapters.storage import base
from ductape_processor.adapters.storage.parts import PartedUpload
from ductape_processor.errors import ProcessorError
from ductape_processor.runtime.registry.storage import S3StorageEnv

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

PART_BYTES: Final = 8 * 1024 * 1024
"""The size of a multipart upload's parts (S3's least is 5 MiB but for the last); a file up to this size is one
PutObject."""
PARTS_IN_FLIGHT: Final = 2
"""Parts of one upload sent at once."""
_DENIED: Final = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_MISSING: Final = {"NoSuchKey", "NotFound", "404"}
T = TypeVar("T")


class S3Storage(base.StorageAdapter):
    """One bucket; the client is opened on first use and kept."""

    provider = "s3"

    def __init__(self, settings: S3StorageEnv, name: str) -> None:
        self._settings = settings
        self._name = name
        self._bucket = settings.bucket
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    async def _s3(self) -> S3Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    settings = self._settings
                    config = AioConfig(
                        s3={"addressing_style": "path" if settings.path_style else "auto"},
                        signature_version="s3v4",
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=base.CONNECT_TIMEOUT_S,
                        read_timeout=base.READ_TIMEOUT_S,
                        max_pool_connections=64,
                        # Checksums only where S3 requires them: the runtime checks SHA-256 itself, and the default
                        # (a CRC on every part, sent as an aws-chunked trailer) costs CPU and copies.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    )
                    client = get_session().create_client(
                        "s3",
                        region_name=settings.region,
                        endpoint_url=settings.endpoint,
                        aws_access_key_id=settings.access_key_id,
                        aws_secret_access_key=settings.secret_access_key,
                        aws_session_token=settings.session_token,
                        config=config,
                    )
                    self._client = await self._stack.enter_async_context(client)
        return self._client

    def _failure(self, what: str, exc: BaseException, key: str | None = None) -> ProcessorError:
        """A driver's failure as the error callers see, without its text (it may quote a signed request)."""
        if isinstance(exc, NoCredentialsError):
            return base.StorageAccessDenied(
                f"storage {self._name!r} (s3): no credentials (set access_key_id and secret_access_key)",
                metadata={"storage": self._name, "provider": "s3"},
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if key is not None and code in _MISSING:
                return base.FileNotFound(self._name, key)
            if code in _DENIED:
                return base.StorageAccessDenied(
                    f"storage {self._name!r} (s3): {what} refused: {code}",
                    metadata={"storage": self._name, "provider": "s3"},
                )
            return base.unavailable(self._name, "s3", what, exc, code)
        return base.unavailable(self._name, "s3", what, exc)

    # -- writing ------------------------------------------------------------------------------------------------

    async def put(self, new: base.NewFile, chunks: base.Checked, repeat: base.Repeat) -> base.FileInfo:
        s3 = await self._s3()
        metadata = dict(new.metadata)
        if new.sha256:
            metadata[base.SHA256_METADATA] = new.sha256
        upload_id = ""

        async def sent(request: Callable[[], Awaitable[T]]) -> T:
            """One request whose bytes are in hand, repeated by the runtime while S3 is unavailable."""

            async def attempt() -> T:
                try:
                    return await request()
                except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
                    raise self._failure("save", exc) from None

            return await repeat("save", attempt)

        async def start() -> None:
            nonlocal upload_id
            # A start repeated after S3 began it but its answer was lost leaves an unfinished upload that only the
            # bucket's lifecycle rule for those removes (botocore's retries did the same); a refused connection, the
            # usual failure, began nothing.
            started = await sent(
                lambda: s3.create_multipart_upload(
                    Bucket=self._bucket, Key=new.key, ContentType=new.content_type, Metadata=metadata
                )
            )
            upload_id = started["UploadId"]

        async def send(number: int, body: bytes) -> CompletedPartTypeDef:
            # A part sent again under its number replaces the first: the upload holds it once.
            answer = await sent(
                lambda: s3.upload_part(
                    Bucket=self._bucket, Key=new.key, UploadId=upload_id, PartNumber=number, Body=body
                )
            )
            return {"ETag": answer["ETag"], "PartNumber": number}

        upload = PartedUpload(PART_BYTES, PARTS_IN_FLIGHT, start, send)
        try:
            try:
                whole = await upload.run(chunks)
                if whole is not None:
                    metadata[base.SHA256_METADATA] = chunks.sha256
                    body = whole
                    await sent(
                        lambda: s3.put_object(
                            Bucket=self._bucket, Key=new.key, Body=body, ContentType=new.content_type, Metadata=metadata
                        )
                    )
                else:
                    parts = upload.results
                    await sent(
                        lambda: s3.complete_multipart_upload(
                            Bucket=self._bucket, Key=new.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                        )
                    )
            except BaseException:
                if upload_id:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(
                            s3.abort_multipart_upload(Bucket=self._bucket, Key=new.key, UploadId=upload_id)
                        )
                raise
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._failure("save", exc) from None
        return base.FileInfo(new.key, chunks.size, chunks.sha256, new.content_type, dict(new.metadata))

    # -- reading ------------------------------------------------------------------------------------------------

    async def head(self, key: str) -> base.FileInfo:
        s3 = await self._s3()
        try:
            answer = await s3.head_object(Bucket=self._bucket, Key=key)
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._failure("head", exc, key) from None
        metadata = dict(answer.get("Metadata") or {})
        sha256 = metadata.pop(base.SHA256_METADATA, "")
        return base.FileInfo(
            key,
            int(answer.get("ContentLength", 0)),
            sha256,
            str(answer.get("ContentType") or ""),
            metadata,
            answer.get("LastModified"),
        )

    async def read(self, key: str, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        s3 = await self._s3()
        try:
            answer = await s3.get_object(Bucket=self._bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
            async with answer["Body"] as body:
                async for chunk in body.iter_chunks(chunk_size):
                    yield chunk
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._failure("download", exc, key) from None

    # -- the rest -----------------------------------------------------------------------------------------------

    async def delete(self, key: str) -> bool:
        try:
            await self.head(key)
        except base.FileNotFound:
            return False
        s3 = await self._s3()
        try:
            await s3.delete_object(Bucket=self._bucket, Key=key)
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._failure("delete", exc, key) from None
        return True

    async def list_files(self, prefix: str, after: str, limit: int) -> list[base.FileInfo]:
        s3 = await self._s3()
        try:
            answer = await s3.list_objects_v2(Bucket=self._bucket, Prefix=prefix, StartAfter=after, MaxKeys=limit)
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._failure("list", exc) from None
        return [
            base.FileInfo(item["Key"], int(item.get("Size", 0)), updated=item.get("LastModified"))
            for item in answer.get("Contents", [])
        ]

    async def signed_url(self, key: str, method: base.UrlMethod, expires_s: int, content_type: str) -> base.SignedUrl:
        s3 = await self._s3()
        params: dict[str, str] = {"Bucket": self._bucket, "Key": key}
        headers: dict[str, str] = {}
        if method is base.UrlMethod.PUT and content_type:
            params["ContentType"] = content_type
            headers["Content-Type"] = content_type
        operation = "put_object" if method is base.UrlMethod.PUT else "get_object"
        try:
            url = await s3.generate_presigned_url(operation, Params=params, ExpiresIn=expires_s)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("signing", exc, key) from None
        return base.SignedUrl(url, headers)

    async def close(self) -> None:
        await self._stack.aclose()
