"""The HTTP/1.1 client's connections (adapters/http/connection.py) against real servers on loopback: what it sends,
what it accepts back, when it reuses a connection and when it does not, how many it opens."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.multipart import BodyPartReader
from yarl import URL

from ductape_processor.adapters.http.client import HttpClientPool, HttpRequest, UpstreamUnreachable
from ductape_processor.adapters.http.connection import MAX_HEAD_BYTES
from ductape_processor.adapters.http.encoding import encode_body

Reply = Callable[[int, bytes], Awaitable[bytes | None]]
"""(connection number, request head) -> the bytes to answer, or None to close the connection without answering."""


@dataclass
class Wire:
    """A raw HTTP/1.1 server: reads each request's head (and a Content-Length body), answers what `reply` says."""

    reply: Reply
    port: int = 0
    connections: int = 0
    heads: list[tuple[int, bytes]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                self.heads.append((number, head))
                answer = await self.reply(number, head)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}", encoded=True)


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    async def ok(number: int, head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    served = Wire(ok)
    server = await asyncio.start_server(served.serve, "127.0.0.1", 0)
    served.port = server.sockets[0].getsockname()[1]
    yield served
    server.close()


@pytest.fixture
async def http() -> AsyncIterator[HttpClientPool]:
    pool = HttpClientPool(max_response_bytes=1024 * 1024, connections_per_upstream=2)
    yield pool
    await pool.close()


def get(url: URL, method: str = "GET", data: bytes | None = None) -> HttpRequest:
    return HttpRequest(method, url, {}, [], data)


async def test_answers_reuse_one_connection(wire: Wire, http: HttpClientPool) -> None:
    for _ in range(3):
        answer = await http.send("k", get(wire.url("/a")), 5)
        assert (answer.status, answer.body) == (200, b"ok")
    assert wire.connections == 1
    head = wire.heads[0][1].decode()
    assert head.startswith("GET /a HTTP/1.1\r\nHost: 127.0.0.1:") and "User-Agent: ductape-processor" in head


async def test_a_get_is_sent_again_once_when_the_upstream_closed_its_idle_connection(
    wire: Wire, http: HttpClientPool
) -> None:
    async def close_second(number: int, head: bytes) -> bytes | None:
        if number == 1 and len(wire.heads) == 2:
            return None  # the keep-alive race: closed as the second request arrived, nothing answered
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    wire.reply = close_second
    await http.send("k", get(wire.url("/a")), 5)
    answer = await http.send("k", get(wire.url("/b")), 5)
    assert answer.body == b"ok" and wire.connections == 2
    assert [h.split(b" ")[1] for _, h in wire.heads] == [b"/a", b"/b", b"/b"]


async def test_a_post_is_not_sent_again_when_its_connection_closed_unanswered(wire: Wire, http: HttpClientPool) -> None:
    async def close_second(number: int, head: bytes) -> bytes | None:
        return None if len(wire.heads) == 2 else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    wire.reply = close_second
    await http.send("k", get(wire.url("/a")), 5)
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", get(wire.url("/b"), "POST", b"{}"), 5)
    assert caught.value.sent
    assert len(wire.heads) == 2


async def test_a_head_answer_is_read_without_a_body_and_its_connection_is_not_reused(
    wire: Wire, http: HttpClientPool
) -> None:
    async def head_answer(number: int, head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Size: 5\r\n\r\n"

    wire.reply = head_answer
    answer = await http.send("k", get(wire.url("/h"), "HEAD"), 5)
    assert (answer.status, answer.body, answer.header("X-Size")) == (200, b"", "5")
    await http.send("k", get(wire.url("/h"), "HEAD"), 5)
    assert wire.connections == 2


async def test_an_interim_answer_is_skipped(wire: Wire, http: HttpClientPool) -> None:
    async def hints(number: int, head: bytes) -> bytes:
        return b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"

    wire.reply = hints
    answer = await http.send("k", get(wire.url("/e")), 5)
    assert (answer.status, answer.body, answer.header("Link")) == (201, b"x", None)


async def test_a_deflated_body_is_inflated(wire: Wire, http: HttpClientPool) -> None:
    body = zlib.compress(b'{"ok": true}')

    async def deflated(number: int, head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    wire.reply = deflated
    assert (await http.send("k", get(wire.url("/d")), 5)).body == b'{"ok": true}'
    assert b"Accept-Encoding: gzip, deflate" in wire.heads[0][1]


async def test_a_head_larger_than_the_bound_is_refused(wire: Wire, http: HttpClientPool) -> None:
    async def huge(number: int, head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n"

    wire.reply = huge
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", get(wire.url("/big")), 5)
    assert "head is larger" in caught.value.message


async def test_no_more_connections_than_the_bound_are_opened(wire: Wire, http: HttpClientPool) -> None:
    async def slow(number: int, head: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    wire.reply = slow
    answers = await asyncio.gather(*(http.send("k", get(wire.url(f"/{n}")), 5) for n in range(6)))
    assert [a.body for a in answers] == [b"ok"] * 6
    assert wire.connections == 2, "connections_per_upstream=2"


async def test_a_cancelled_exchange_closes_its_connection(wire: Wire, http: HttpClientPool) -> None:
    async def late(number: int, head: bytes) -> bytes:
        if len(wire.heads) == 1:
            await asyncio.sleep(0.3)  # answered after the caller gave up: must not reach the next caller
            return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    wire.reply = late
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await http.send("k", get(wire.url("/slow")), 5)
    await asyncio.sleep(0.3)
    assert (await http.send("k", get(wire.url("/next")), 5)).body == b"ok"
    assert wire.connections == 2


@pytest.fixture
async def parsing_upstream() -> AsyncIterator[tuple[URL, list[web.Request], list[object]]]:
    """An aiohttp server that records what it parsed of each request: its query and multipart fields."""
    seen: list[web.Request] = []
    parts: list[object] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request)
        if request.content_type == "multipart/form-data":
            async for part in await request.multipart():
                assert isinstance(part, BodyPartReader)
                parts.append((part.name, part.filename, part.headers.get("Content-Type"), bytes(await part.read())))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield URL(f"http://127.0.0.1:{port}"), seen, parts
    await runner.cleanup()


async def test_query_pairs_arrive_as_they_were_given(
    parsing_upstream: tuple[URL, list[web.Request], list[object]], http: HttpClientPool
) -> None:
    base, seen, _ = parsing_upstream
    pairs = [("q", "a b&c=d+e"), ("q", "ü/?:@"), ("e", ""), ("k y", "%41")]
    await http.send("k", HttpRequest("GET", base.join(URL("/s?x=1", encoded=True)), {}, pairs), 5)
    assert list(seen[0].query.items()) == [("x", "1"), *pairs]


async def test_a_multipart_body_is_parsed_into_its_parts(
    parsing_upstream: tuple[URL, list[web.Request], list[object]], http: HttpClientPool
) -> None:
    base, _, parts = parsing_upstream
    body = {"name": 'Ada "L" &', "file": {"content_base64": "AAEC/w==", "filename": "a b.bin"}, "n": 3}
    data, content_type = encode_body(body, "multipart/form-data", "POST")
    assert content_type is not None and content_type.startswith("multipart/form-data; boundary=")
    await http.send("k", HttpRequest("POST", base.join(URL("/up")), {"Content-Type": content_type}, [], data), 5)
    assert parts == [
        ("name", None, "text/plain; charset=utf-8", b'Ada "L" &'),
        ("file", "a b.bin", "application/octet-stream", b"\x00\x01\x02\xff"),
        ("n", None, "text/plain; charset=utf-8", b"3"),
    ]
