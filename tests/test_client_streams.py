"""The Python client's streamed calls (uploads) when grpc.aio loses the server's status.

When a server ends a client-streaming call before reading its whole request stream (a rejected upload), grpc.aio
now and then reports INTERNAL "Internal error from Core" for the request message it could no longer write, in
place of the server's status (grpc/grpc#36066; seen here in about 1 of 100 rejected 4 MB uploads with both CPUs
busy). The client repeats an upload of bytes once (the server kept nothing) and otherwise says what happened.
The status cannot be made lost on purpose through a real server, so these tests give the client a stub that
loses it the way grpc.aio does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from ductape.processor import InternalError, NotFoundError, ProcessorError
from ductape.processor.calls import STATUS_LOST, Caller, status_lost
from ductape.processor.storage import StorageClient
from ductape.processor.v1 import storage_pb2

WHERE = {"product": "shop", "env": "dev", "event": "files", "file_name": "a.bin"}


def lost() -> grpc.aio.AioRpcError:
    """What grpc.aio raises when it could not write a request message to a call the server had ended."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Internal error from Core",
        debug_error_string='Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)',
    )


def not_found() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="product 'shop' not found"
    )


class Upload:
    """A stub's Upload that reads each call's whole request stream, then raises the next of `outcomes` (an
    exception) or answers."""

    def __init__(self, *outcomes: grpc.aio.AioRpcError | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[list[Any]] = []
        self.timeouts: list[float | None] = []

    async def __call__(self, requests: AsyncIterator[Any], *, metadata: Any, timeout: float | None) -> Any:
        self.calls.append([request async for request in requests])
        self.timeouts.append(timeout)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return storage_pb2.UploadResponse(file=storage_pb2.FileInfo(file_name="a.bin", size=5))


def client(upload: Upload) -> StorageClient:
    stub = type("Stub", (), {"Upload": upload})()
    return StorageClient(stub, Caller((), timeout=None))


def test_only_grpcs_lost_status_is_taken_for_one() -> None:
    assert status_lost(lost())
    other = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Internal error from Core"
    )
    assert not status_lost(other), "no failed write behind it"
    assert not status_lost(not_found())


async def test_an_upload_of_bytes_is_sent_again_once_when_the_status_is_lost() -> None:
    upload = Upload(lost(), None)
    stored = await client(upload).upload(b"hello", **WHERE, timeout=30)
    assert stored.file_name == "a.bin"
    assert len(upload.calls) == 2
    for requests in upload.calls:  # each attempt sent the whole file, header first
        assert requests[0].header.sha256 and requests[0].header.size == 5
        assert b"".join(r.chunk for r in requests[1:]) == b"hello"
    first, second = upload.timeouts
    assert first is not None and second is not None and second <= first <= 30, "one timeout for both attempts"


async def test_the_repeated_upload_reports_the_servers_own_error() -> None:
    with pytest.raises(NotFoundError):
        await client(Upload(lost(), not_found())).upload(b"hello", **WHERE)


async def test_an_upload_whose_status_is_lost_twice_says_so() -> None:
    upload = Upload(lost(), lost())
    with pytest.raises(ProcessorError) as caught:
        await client(upload).upload(b"hello", **WHERE)
    assert caught.value.code == grpc.StatusCode.UNKNOWN and caught.value.message == STATUS_LOST
    assert len(upload.calls) == 2


async def test_an_upload_from_an_iterator_is_not_repeated_and_says_why_it_failed() -> None:
    upload = Upload(lost())
    with pytest.raises(ProcessorError) as caught:
        await client(upload).upload([b"he", b"llo"], **WHERE)
    assert caught.value.code == grpc.StatusCode.UNKNOWN and caught.value.message == STATUS_LOST
    assert "grpc/grpc#36066" in str(caught.value) and "nothing was kept" in str(caught.value)
    assert len(upload.calls) == 1, "an iterator cannot be read twice"


async def test_other_errors_are_raised_as_they_are_without_a_repeat() -> None:
    internal = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), details="the store failed"
    )
    upload = Upload(internal)
    with pytest.raises(InternalError):
        await client(upload).upload(b"hello", **WHERE)
    assert len(upload.calls) == 1
