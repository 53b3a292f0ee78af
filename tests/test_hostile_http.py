"""The processor's HTTP listeners read as an attacker would, beyond tests/test_webhook_listener_hostile.py: the
webhook listener's chunk framing and trailers, encoded slashes in its targets and timestamps in other scripts' digits;
the storage listener's signed-URL query and slow senders. Each was found answering 500, accepting what it should
refuse, or holding a connection (and memory) for as long as the sender liked."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from ductape_processor.api import webhook_http
from tests import test_webhooks_receive
from tests.test_webhook_listener_hostile import clean, closed_within, connect, read_head
from tests.test_webhooks_receive import Listener, post_request, raw_exchange, signed

listener = test_webhooks_receive.listener  # a started processor with the shop's receive paths (2048 bytes on /payments)

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
