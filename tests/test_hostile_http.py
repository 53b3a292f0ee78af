"""The processor's HTTP listeners read as an attacker would, beyond tests/test_webhook_listener_hostile.py: the
webhook listener's chunk framing and trailers, encoded slashes in its targets and timestamps in other scripts' digits;
the storage listener's signed-URL query and slow senders. Each was found answering 500, accepting what it should
refuse, or holding a connection (and memory) for as long as the sender liked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from ductape_processor.api import storage_http, webhook_http
from tests import test_webhooks_dispatch, test_webhooks_receive
from tests.conftest import Running, ServerFactory
from tests.test_storage import PRODUCT, TAG, manifest, where
from tests.test_webhook_listener_hostile import clean, closed_within, connect, read_head
from tests.test_webhooks_dispatch import FAILED, Setup
from tests.test_webhooks_receive import Listener, post_request, raw_exchange, signed
from tests.upstream import Upstream

listener = test_webhooks_receive.listener  # a started processor with the shop's receive paths (2048 bytes on /payments)
setup = test_webhooks_dispatch.setup  # one whose /invoices receive dispatches to a job of the upstream's action

QUIET = "/webhooks/shop/dev/quiet"

# -- the webhook listener ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"1;", id="an endless chunk extension"),
        pytest.param(b"", id="an endless chunk size of zeros"),
        pytest.param(b"2\r\n{}\r\n0\r\nX-Trailer: ", id="an endless trailer value"),
        pytest.param(b"2\r\n{}\r\n0\r\n", id="an endless trailer name"),
    ],
)
async def test_endless_chunk_framing_is_413_and_not_read_until_the_timeout(
    listener: Listener, monkeypatch: pytest.MonkeyPatch, framing: bytes
) -> None:
    """llhttp hands a trailer over whole (httptools joins its pieces in memory) and skips chunk extensions without a
    bound: these grew, or spun, for the whole 30 s request timeout while the body stayed within its 2048 bytes."""
    monkeypatch.setattr(webhook_http, "LINGER_S", 0.5)
    filler = {b"1;": b"e", b"": b"0", b"2\r\n{}\r\n0\r\nX-Trailer: ": b"v", b"2\r\n{}\r\n0\r\n": b"X"}[framing]
    reader, writer = await connect(listener)
    try:
        head = b"POST /webhooks/shop/dev/payments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + framing)
        for _ in range(16):  # 1 MiB: 8 times what the listener allows beyond the head and the body's limit
            writer.write(filler * 65_536)
            await writer.drain()
        clean(await read_head(reader), 413)
        await closed_within(reader, 3)
    finally:
        writer.close()
    assert await listener.received("payments") == []


async def test_a_body_at_its_limit_in_small_chunks_is_received(listener: Listener) -> None:
    """The bound on framing grows with the body: 16-byte chunks add 6 bytes of framing to each (1.4 MiB for a body
    of 1 MiB, the default limit), which a sender may well do."""
    body = b"x" * (1024 * 1024 - 16)
    chunks = b"".join(b"10\r\n" + body[i : i + 16] + b"\r\n" for i in range(0, len(body), 16))
    head = f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    clean(await raw_exchange(listener, head + chunks + b"0\r\n\r\n"), 200)
    [received] = await listener.received("quiet")
    assert received.body == body


async def test_trailer_fields_are_not_taken_for_headers(listener: Listener) -> None:
    """A trailer came into the stored headers (and merged into a header of its name), as if the sender had sent it
    in the head."""
    request = (
        f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        "2\r\n{}\r\n0\r\nContent-Type: text/evil\r\nX-Trailer: t\r\n\r\n"
    )
    clean(await raw_exchange(listener, request.encode()), 200)
    [received] = await listener.received("quiet")
    assert received.body == b"{}"
    assert received.headers["content-type"] == "application/json"
    assert "x-trailer" not in received.headers


@pytest.mark.parametrize(
    "target", ["/webhooks/shop%2Fdev%2Fquiet", "/webhooks/shop/dev%2Fquiet", "/webhooks/shop%2fdev/quiet"]
)
async def test_an_encoded_slash_does_not_move_a_name_into_the_next_part(listener: Listener, target: str) -> None:
    """`/webhooks/shop%2Fdev%2Fquiet` was decoded before it was split, so it reached shop's quiet path: a proxy in
    front that routes or refuses by the path's parts sees one part there, not three."""
    answer = await raw_exchange(
        listener, f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    clean(answer, 404)
    assert await listener.received("quiet") == []


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda stamp: "\u00b2", id="a superscript two (500: int() refuses what isdigit() takes)"),
        pytest.param(
            lambda stamp: "".join(chr(0x660 + int(digit)) for digit in stamp),
            id="the right time in Arabic-Indic digits (accepted: int() reads them)",
        ),
        pytest.param(lambda stamp: "".join(chr(0xFF10 + int(digit)) for digit in stamp), id="in fullwidth digits"),
    ],
)
async def test_a_timestamp_in_other_digits_than_ascii_is_401(listener: Listener, spoil: object) -> None:
    body = b'{"type":"payment.succeeded"}'
    headers = signed(body, "evt_digits", datetime.now(UTC))
    headers["webhook-timestamp"] = spoil(headers["webhook-timestamp"])  # type: ignore[operator]
    answer = await raw_exchange(listener, post_request("/payments", body, headers))
    clean(answer, 401)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "the webhook's signature does not verify"}
    assert await listener.received("payments") == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(b'{"x": 1e999999}', "out of range", id="a float past a double (was sent on as Infinity)"),
        pytest.param(b'{"x": -Infinity}', "out of range", id="-Infinity (was sent on)"),
        pytest.param(b'{"x": NaN}', "out of range", id="NaN (was sent on)"),
        pytest.param(b'{"x": ' + b"9" * 400 + b"}", "out of range", id="an integer past a double (Get was INTERNAL)"),
        pytest.param(b'{"x": ' + b"9" * 5000 + b"}", "out of range", id="an integer past int()'s 4300 digits"),
        pytest.param(b'{"x": "\\ud800"}', "lone surrogate", id="a lone surrogate (pending: UnicodeEncodeError)"),
        pytest.param(b'{"x": "\xff"}', "not UTF-8", id="bytes that are not UTF-8"),
    ],
)
async def test_a_body_no_job_can_carry_fails_its_dispatch_at_once_saying_why(
    setup: Setup, upstream: Upstream, body: bytes, says: str
) -> None:
    """Python's json takes NaN, Infinity and numbers past a double, and keeps lone surrogates: these bodies made a
    job that sent `{"x": Infinity}` upstream and poisoned JobService.Get (INTERNAL, or a client that cannot read the
    answer), or a dispatch that failed `UnicodeEncodeError` and was tried again for three hours."""
    received_id = await setup.post("/invoices", body, {"content-type": "application/json"})
    failed = await setup.settled(received_id, lambda d: d.status == FAILED)
    assert failed.attempts == 1 and not failed.job_id, failed
    assert says in failed.error and "processor failed" not in failed.error, failed.error
    assert upstream.hits("/record") == []


# -- the storage listener ----------------------------------------------------------------------------------------


@pytest.fixture
async def storage_server(
    start_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Running, Path]:
    monkeypatch.setattr(storage_http, "IDLE_S", 0.5, raising=False)  # read when the listener starts
    server = await start_server(storage_http_address="127.0.0.1:0")
    await server.client.product.apply(manifest({"provider": "fs"}))
    await server.client.storage.save(**where(), file_name="first", data=b"1")
    return server, tmp_path / "data0" / "storage" / PRODUCT / TAG / "dev"


async def open_url(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A raw connection to the listener of `url`, and the request target to put in a request line."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    return reader, writer, f"{parts.path}?{parts.query}"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda url: url.split("&sig=")[0] + "&sig=%C3%A9", id="a sig that is not ASCII (500)"),
        pytest.param(
            lambda url: re.sub(
                r"expires=(\d+)", lambda m: "expires=" + "".join(chr(0x660 + int(d)) for d in m[1]), url
            ),
            id="the signed expiry in Arabic-Indic digits (accepted: int() reads them)",
        ),
    ],
)
async def test_a_signed_url_query_in_other_characters_is_403(
    storage_server: tuple[Running, Path], spoil: Callable[[str], str]
) -> None:
    server, _ = storage_server
    good = await server.client.storage.signed_url(**where(), file_name="first", expires_in=60)
    async with aiohttp.ClientSession() as http, http.get(spoil(good.url)) as answer:
        assert answer.status == 403, await answer.text()
        assert (await answer.json())["reason"] == "STORAGE_URL_INVALID"


async def test_a_slow_head_is_cut(storage_server: tuple[Running, Path]) -> None:
    """aiohttp waited 3630 s (its keep-alive timeout) for a head sent a byte now and then."""
    server, _ = storage_server
    good = await server.client.storage.signed_url(**where(), file_name="first", expires_in=60)
    reader, writer, target = await open_url(good.url)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode())
        for _ in range(4):  # a byte now and then does not keep the connection
            await asyncio.sleep(0.2)
            if not reader.at_eof():
                writer.write(b"X")
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()


async def test_a_put_whose_body_stops_is_408_and_leaves_no_file(storage_server: tuple[Running, Path]) -> None:
    """A PUT that declared 10 bytes and sent 1 was waited for forever, its temporary file open."""
    server, root = storage_server
    put = await server.client.storage.signed_url(**where(), file_name="stalled.bin", method="PUT", expires_in=60)
    reader, writer, target = await open_url(put.url)
    try:
        writer.write(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nx".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 1))
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, head
    assert answer["reason"] == "DEADLINE_EXCEEDED" and "sent nothing" in answer["message"]
    assert [f.file_name async for f in server.client.storage.files(**where())] == ["first"]
    assert list((root / ".ductape" / "tmp").iterdir()) == []


async def test_a_get_whose_reader_stops_reading_is_cut_and_its_file_closed(
    storage_server: tuple[Running, Path],
) -> None:
    """A GET whose client took no bytes held the connection and the open file forever (the write waited)."""
    server, root = storage_server
    await server.client.storage.upload([b"z" * (1024 * 1024)] * 32, **where(), file_name="big.bin")
    get = await server.client.storage.signed_url(**where(), file_name="big.bin", expires_in=60)

    def open_copies() -> int:  # the server runs in this process
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed since it was listed
                found += os.readlink(f"/proc/self/fd/{fd}") == str(root / "big.bin")
        return found

    reader, writer, target = await open_url(get.url)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(0.3)
        assert open_copies() == 1  # the download is under way, waiting for the reader
        for _ in range(40):
            if open_copies() == 0:
                break
            await asyncio.sleep(0.1)
        assert open_copies() == 0, "a download nobody reads still holds its file"
        received = 0
        while chunk := await asyncio.wait_for(reader.read(1024 * 1024), 3):  # what was sent, then the end
            received += len(chunk)
        assert received < 32 * 1024 * 1024
    finally:
        writer.close()
