"""The webhook listener read as an attacker on the network would: raw bytes on real sockets against a started
processor. Smuggling attempts, heads and bodies over their bounds, slow senders, pipelining, odd targets and methods,
and garbage are answered with a clean 4xx (or cut), never a traceback, and the listener goes on serving."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from ductape_processor.api import webhook_http
from tests import test_webhooks_receive
from tests.test_webhooks_receive import Listener, post_request, raw_exchange, signed

listener = test_webhooks_receive.listener  # a started processor with the shop's receive paths (2048 bytes on /payments)

QUIET = "/webhooks/shop/dev/quiet"


async def connect(listener: Listener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    http = listener.running.app.components.webhook_http
    assert http is not None
    return await asyncio.open_connection("127.0.0.1", http.port)


async def read_head(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """The answer's status line and headers (the connection may still be open)."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What is left to read before the listener closes the connection (fails if it is still open after `timeout`)."""
    return await asyncio.wait_for(reader.read(), timeout)


def clean(answer: bytes, status: int) -> None:
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Traceback" not in answer and b'File "' not in answer and b"Error(" not in answer, answer


async def still_serving(listener: Listener) -> None:
    body = b'{"still": "serving"}'
    answer = await raw_exchange(listener, post_request("/payments", body, signed(body, f"evt_{os.urandom(4).hex()}")))
    clean(answer, 200)


# -- 1. smuggling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        "Content-Length: 2\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 2",
        "Content-Length: 2\r\nContent-Length: 3",
        "Content-Length: 2\r\nContent-Length: 2",
        "Content-Length: 2, 3",
        "Content-Length: +2",
        "Content-Length: 0x2",
        "Content-Length : 2",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding: identity, chunked\r\nContent-Length: 2",
        "Transfer-Encoding: xchunked\r\nContent-Length: 2",
        " Transfer-Encoding: chunked\r\nContent-Length: 2",
        "X-Folded: a\r\n b\r\nContent-Length: 2",
        "Content-Length: 2\r\n\tTransfer-Encoding: chunked",
    ],
)
async def test_ambiguous_framing_is_400_and_the_connection_closed(listener: Listener, head: str) -> None:
    answer = await raw_exchange(
        listener, f"POST {QUIET} HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n{{}}".encode()
    )  # read until the listener closes
    clean(answer, 400)
    assert answer.count(b"HTTP/1.1") == 1
    assert await listener.received("quiet") == []


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"-2\r\n{}\r\n0\r\n\r\n",
        b"2\r\n{}XX0\r\n\r\n",
        b"fffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    ],
)
async def test_invalid_chunks_are_400_and_the_connection_closed(listener: Listener, chunks: bytes) -> None:
    answer = await raw_exchange(
        listener, f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks
    )  # read until the listener closes
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), answer
    clean(answer, int(answer[9:12]))
    assert await listener.received("quiet") == []


# -- 2. bounds ---------------------------------------------------------------------------------------------------


async def test_many_small_headers_over_the_head_bound_are_refused(listener: Listener) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    answer = await raw_exchange(listener, f"POST {QUIET} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    clean(answer, 400)


async def test_a_declared_oversize_body_is_413_before_it_is_sent(listener: Listener) -> None:
    reader, writer = await connect(listener)
    try:
        writer.write(b"POST /webhooks/shop/dev/payments HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        clean(await read_head(reader), 413)
    finally:
        writer.close()


async def test_a_chunked_body_over_the_limit_is_413_and_not_held(listener: Listener) -> None:
    reader, writer = await connect(listener)
    try:
        writer.write(b"POST /webhooks/shop/dev/payments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
        for _ in range(4):  # the limit is 2048
            writer.write(chunk)
            await writer.drain()
        clean(await read_head(reader), 413)
        for _ in range(64):  # the rest is read and dropped, then the connection closes
            writer.write(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await closed_within(reader, webhook_http.LINGER_S + 2)
    finally:
        writer.close()
    assert await listener.received("payments") == []


@pytest.mark.parametrize("sent", [b"POST /webhooks/shop/dev/quiet HTTP/1.1\r\nHost: x\r\n", b""])
async def test_a_slow_or_idle_head_is_cut(listener: Listener, monkeypatch: pytest.MonkeyPatch, sent: bytes) -> None:
    monkeypatch.setattr(webhook_http, "REQUEST_TIMEOUT_S", 0.5)
    reader, writer = await connect(listener)
    try:
        writer.write(sent)
        for _ in range(3):  # a byte now and then does not keep the connection
            await asyncio.sleep(0.2)
            if sent and not reader.at_eof():
                writer.write(b"X")
        await closed_within(reader, 2)
    finally:
        writer.close()


async def test_a_slow_body_is_cut(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook_http, "REQUEST_TIMEOUT_S", 0.5)
    reader, writer = await connect(listener)
    try:
        writer.write(f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        for _ in range(4):
            await asyncio.sleep(0.2)
            if writer.is_closing() or reader.at_eof():
                break
            writer.write(b" ")
        await closed_within(reader, 2)
    finally:
        writer.close()
    assert await listener.received("quiet") == []


async def test_connections_over_the_cap_are_refused_and_the_listener_recovers(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_http, "MAX_CONNECTIONS", 3)
    held = [await connect(listener) for _ in range(3)]
    try:
        await asyncio.sleep(0.1)
        reader, writer = await connect(listener)
        try:
            clean(await closed_within(reader, 3), 503)
        finally:
            writer.close()
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.2)
    await still_serving(listener)


async def test_bodies_past_the_listeners_budget_are_503_while_others_hold_theirs(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_http, "BODY_BUDGET_BYTES", 3000)
    http = listener.running.app.components.webhook_http
    assert http is not None
    body = json.dumps({"pad": "x" * 1960}).encode()  # 1,972 bytes: within /payments' 2048
    first = post_request("/payments", body, signed(body, "evt_budget_first"))
    reader, writer = await connect(listener)
    try:
        writer.write(first[: len(first) - 400])  # all but the last 400 bytes: about 1,570 held
        await writer.drain()
        for _ in range(50):
            if http.buffered:
                break
            await asyncio.sleep(0.02)
        assert 1000 < http.buffered < 2000
        # Another sender's whole body would pass the budget while the first holds its bytes: 503, kept nowhere.
        second = post_request("/payments", body, signed(body, "evt_budget_second"))
        other_reader, other_writer = await connect(listener)
        try:
            other_writer.write(second)
            clean(await read_head(other_reader), 503)  # then the rest is read and dropped for a while
        finally:
            other_writer.close()
        # The first completes: a body is refused only for what others hold.
        writer.write(first[len(first) - 400 :])
        await writer.drain()
        clean(await closed_within(reader, 3), 200)
    finally:
        writer.close()
    for _ in range(50):
        if http.buffered == 0:
            break
        await asyncio.sleep(0.02)
    assert http.buffered == 0, "what the connections held is given back"
    assert [r.webhook_id for r in await listener.received("payments")] == ["evt_budget_first"]
    # With nothing held, the one refused goes through when sent again (as a provider retries a 503).
    clean(await raw_exchange(listener, second), 200)


# -- 3. pipelining -----------------------------------------------------------------------------------------------


async def test_a_pipelined_second_request_is_not_mixed_into_the_first(listener: Listener) -> None:
    first = f'POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nX-Who: first\r\n\r\n{{"n":"one"}}'.encode()
    second = f'POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nX-Who: second\r\n\r\n{{"n":"two"}}'.encode()
    answer = await raw_exchange(listener, first + second)
    clean(answer, 200)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer  # the second is for a new connection
    received = await listener.received("quiet")
    assert len(received) == 1
    assert received[0].body == b'{"n":"one"}' and received[0].headers["x-who"] == "first"


async def test_a_request_after_an_early_answer_is_not_served(listener: Listener) -> None:
    first = f"GET {QUIET} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    second = f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    answer = await raw_exchange(listener, first + second)
    clean(answer, 405)
    assert answer.count(b"HTTP/1.1 ") == 1
    assert await listener.received("quiet") == []


# -- 4. targets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "statuses"),
    [
        ("/webhooks/shop/dev/qu%69et/../x", (404,)),
        ("/webhooks/shop/dev/../dev/quiet", (404,)),
        ("/webhooks/shop/dev/%2e%2e/quiet", (404,)),
        ("/webhooks/sh%00op/dev/quiet", (404, 400)),
        ("/webhooks/shop/d%00ev/quiet", (404, 400)),
        ("/webhooks/shop/dev/quiet%00", (404, 400)),
        ("/webhooks/%ff%fe/dev/quiet", (404, 400)),
        ("/webhooks/shop/dev/%", (404, 400)),
        ("http://evil.example/webhooks/shop/dev/nothing", (404, 400)),
        ("*", (404, 400)),
        ("/webhooks/shop/dev/" + "a" * 70_000, (400,)),
        ("/webhooks/" + "a" * 60_000 + "/dev/quiet", (404, 400)),
    ],
)
async def test_odd_targets_are_404_or_400_never_500(listener: Listener, target: str, statuses: tuple[int, ...]) -> None:
    answer = await raw_exchange(
        listener, f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    assert answer[9:12] in [str(s).encode() for s in statuses], answer[:300]
    clean(answer, int(answer[9:12]))
    assert await listener.received("quiet") == []


async def test_a_nul_byte_in_the_target_is_400(listener: Listener) -> None:
    answer = await raw_exchange(
        listener, f"POST {QUIET}\0 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    clean(answer, 400)


# -- 5. methods and versions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD", "TRACE"])
async def test_methods_other_than_post_are_405(listener: Listener, method: str) -> None:
    answer = await raw_exchange(
        listener, f"{method} {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    clean(answer, 405)
    assert await listener.received("quiet") == []


async def test_connect_and_upgrades_are_refused(listener: Listener) -> None:
    connect_answer = await raw_exchange(
        listener, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    )
    clean(connect_answer, int(connect_answer[9:12]))
    assert connect_answer[9:12] in (b"400", b"405"), connect_answer
    upgrade = (
        f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    answer = await raw_exchange(listener, upgrade.encode())
    assert answer[9:12] in (b"200", b"400"), answer  # either served as a plain POST or refused, never switched
    assert b"101" not in answer[:12]


async def test_http_1_0_is_served(listener: Listener) -> None:
    answer = await raw_exchange(listener, f"POST {QUIET} HTTP/1.0\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    clean(answer, 200)


async def test_expect_100_continue_with_an_oversize_length_is_413_without_a_100(listener: Listener) -> None:
    reader, writer = await connect(listener)
    try:
        writer.write(
            b"POST /webhooks/shop/dev/payments HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
        )
        head = await read_head(reader)
    finally:
        writer.close()
    clean(head, 413)
    assert b"100 Continue" not in head


# -- 6. garbage ---------------------------------------------------------------------------------------------------

CLIENT_HELLO = bytes.fromhex(
    "16030100c4010000c00303" + "ab" * 32 + "00" + "0020" + "c02b" * 16 + "0100" + "0077" + "00" * 0x77
)


@pytest.mark.parametrize(
    "garbage",
    [CLIENT_HELLO, os.urandom(4096), b"\0" * 100, b"\r\n" * 40_000, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"POST"],
)
async def test_garbage_is_refused_and_the_listener_goes_on(listener: Listener, garbage: bytes) -> None:
    reader, writer = await connect(listener)
    try:
        writer.write(garbage)
        await writer.drain()
        if garbage == b"POST":
            writer.write_eof()
        answer = await closed_within(reader, 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") or (garbage == b"POST" and answer == b""), answer[:200]
    assert b"Traceback" not in answer
    await still_serving(listener)


async def test_a_receiver_failure_is_a_clean_500(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    http = listener.running.app.components.webhook_http
    assert http is not None

    async def broken(*args: object) -> None:
        raise RuntimeError("secret internals: password=hunter2")

    request = f"POST {QUIET} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    for stage in ("accept", "target"):  # storing the webhook fails; finding its receive path fails
        with monkeypatch.context() as patch:
            patch.setattr(http._receiver, stage, broken)
            answer = await raw_exchange(listener, request)
        clean(answer, 500)
        assert b"hunter2" not in answer and b"RuntimeError" not in answer
    await still_serving(listener)
