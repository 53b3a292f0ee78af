"""The HTTP client (adapters/http/) read as an attacker would: a caller whose input fills the request, or an upstream
that misbehaves byte by byte. Every upstream here is a real socket server written in the test; what it received,
how many connections it saw and what the caller got are the assertions."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from yarl import URL

from ductape_processor.adapters.http.addresses import address_problem, public_addresses
from ductape_processor.adapters.http.client import (
    MAX_REDIRECTS,
    HttpClientPool,
    HttpRequest,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ductape_processor.adapters.http.connection import MAX_HEAD_BYTES
from ductape_processor.errors import InvalidArgument
from tests.pki import make_pki

Handler = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
LIMIT = 64 * 1024


@dataclass
class Upstream:
    """A TCP server that hands each connection to `handler`; counts connections and keeps what they received."""

    handler: Handler
    port: int = 0
    host: str = "127.0.0.1"
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # connection numbers the client closed (EOF or reset)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        """One request's head, and its Content-Length body, recorded."""
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                head += await reader.readexactly(int(line.split(b":")[1]))
        self.received.append(head)
        return head

    def url(self, path: str = "/") -> URL:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return URL(f"http://{host}:{self.port}{path}", encoded=True)


def answering(*answers: bytes) -> Handler:
    """A handler that answers each request on a connection with the next of `answers` (the last one repeats)."""

    async def handle(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = 0
        while True:
            await upstream.head(reader)
            writer.write(answers[min(number, len(answers) - 1)])
            await writer.drain()
            number += 1

    return handle


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Upstream:
        upstream = Upstream(handler, host=host)
        server = await asyncio.start_server(upstream.serve, host, 0, ssl=tls)
        servers.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        return upstream

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def http() -> AsyncIterator[HttpClientPool]:
    pool = HttpClientPool(max_response_bytes=LIMIT, connections_per_upstream=4)
    yield pool
    await pool.close()


def request(url: URL, method: str = "GET", data: bytes | None = None, **headers: str) -> HttpRequest:
    return HttpRequest(method, url, headers, [], data)


# -- the request: nothing a caller or a manifest gives can add a line to it ---------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/a\r\nX-Injected: 1"),
        ("GET", "/a b"),
        ("GET", "/a\x00b"),
        ("GET", "/a?q=1\r\n\r\nGET /admin HTTP/1.1"),
        ("GET /admin HTTP/1.1\r\nX:", "/a"),
        ("GET\x00", "/a"),
        ("", "/a"),
    ],
)
async def test_control_characters_or_spaces_in_the_method_or_target_are_refused_and_never_sent(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, method: str, path: str
) -> None:
    upstream = await serve(answering(OK))
    url = URL(f"http://127.0.0.1:{upstream.port}", encoded=True).with_path(path.split("?")[0], encoded=True)
    if "?" in path:
        url = URL(str(url) + "?" + path.split("?", 1)[1], encoded=True)
    with pytest.raises(InvalidArgument):
        await http.send("k", request(url, method), 5)
    await asyncio.sleep(0.05)
    assert upstream.connections == 0


@pytest.mark.parametrize(
    ("name", "value"), [("X-A\r\nX-B", "1"), ("X-A", "1\r\nX-B: 2"), ("X-A", "1\x00"), ("X-A", "\n")]
)
async def test_control_characters_in_headers_are_refused_before_connecting(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, name: str, value: str
) -> None:
    upstream = await serve(answering(OK))
    with pytest.raises(InvalidArgument):
        await http.send("k", HttpRequest("GET", upstream.url(), {name: value}, []), 5)
    assert upstream.connections == 0


async def test_query_pairs_cannot_break_the_request_line(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    upstream = await serve(answering(OK))
    pairs = [("q", "1 HTTP/1.1\r\nX-Injected: 1\r\n\r\n"), ("k\r\n", "\x00")]
    await http.send("k", HttpRequest("GET", upstream.url("/s"), {}, pairs), 5)
    line, *_ = upstream.received[0].split(b"\r\n")
    assert line == b"GET /s?q=1%20HTTP/1.1%0D%0AX-Injected:%201%0D%0A%0D%0A&k%0D%0A=%00 HTTP/1.1"


async def test_the_request_is_origin_form_with_the_host_and_its_non_default_port(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    upstream = await serve(answering(OK))
    await http.send("k", request(upstream.url("/p/a%20b?x=1")), 5)
    lines = upstream.received[0].split(b"\r\n")
    assert lines[0] == b"GET /p/a%20b?x=1 HTTP/1.1"
    assert lines[1] == b"Host: 127.0.0.1:%d" % upstream.port


async def test_an_ipv6_literal_goes_in_brackets_in_the_host_header(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    try:
        upstream = await serve(answering(OK), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    await http.send("k", request(upstream.url("/six")), 5)
    assert upstream.received[0].split(b"\r\n")[1] == b"Host: [::1]:%d" % upstream.port


async def test_a_body_goes_with_its_exact_content_length(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    upstream = await serve(answering(OK))
    body = "é\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".encode()
    await http.send("k", request(upstream.url("/b"), "POST", body), 5)
    await http.send("k", request(upstream.url("/c"), "DELETE"), 5)
    first, second = upstream.received
    assert b"\r\nContent-Length: %d\r\n" % len(body) in first and first.endswith(b"\r\n\r\n" + body)
    assert second.startswith(b"DELETE /c HTTP/1.1\r\n") and b"Content-Length" not in second
    assert upstream.connections == 1


# -- the answer: what is refused, and the connection closed after it -------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded: value\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
)
async def test_a_malformed_or_ambiguous_answer_is_unreachable_and_its_connection_closed(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, answer: bytes
) -> None:
    upstream = await serve(answering(OK, answer))
    assert (await http.send("k", request(upstream.url("/first")), 5)).body == b"ok"
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", request(upstream.url("/bad")), 5)
    assert caught.value.sent
    assert (await http.send("k", request(upstream.url("/after")), 5)).body == b"ok"
    assert upstream.connections == 2, "the connection that carried the bad answer is not reused"


async def test_a_head_sent_slowly_and_without_end_is_bounded_by_the_timeout(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    async def drip(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)

    upstream = await serve(drip)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout):
        await http.send("k", request(upstream.url()), 0.5)
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_an_endless_run_of_interim_answers_is_bounded_like_a_head(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    async def flood(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        while True:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)
            await writer.drain()

    upstream = await serve(flood)
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", request(upstream.url()), 5)
    assert f"larger than {MAX_HEAD_BYTES}" in caught.value.message


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1) + b"x" * (LIMIT + 1),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"x" * 4096 + b"\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * (LIMIT + 1),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzipped(b"\0" * 10**8))
        + gzipped(b"\0" * 10**8),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(zlib.compress(b"\0" * 10**7))
        + zlib.compress(b"\0" * 10**7)
        + b"\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked-endless", "until-close", "gzip-bomb", "deflate-chunked"],
)
async def test_a_body_over_the_bound_is_refused_however_it_is_framed(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, answer: bytes
) -> None:
    async def big(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(answer)
        while b"chunked" in answer and b"0\r\n\r\n" not in answer[-7:]:  # an endless chunked body
            writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            await writer.drain()
        await writer.drain()
        await reader.read()

    upstream = await serve(big)
    with pytest.raises(ResponseTooLarge):
        await http.send("k", request(upstream.url()), 5)


async def test_a_large_compressed_body_is_inflated_without_stalling_the_event_loop(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    bound = 8 * 1024 * 1024  # the product's default PROCESSOR_MAX_UPSTREAM_RESPONSE_BYTES
    bomb = gzipped(b"\0" * 10**8)

    async def big(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)
        await writer.drain()
        await reader.read()

    upstream = await serve(big)
    loop = asyncio.get_running_loop()
    ticks = [loop.time()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.001)
            ticks.append(loop.time())

    ticker = asyncio.create_task(tick())
    pool = HttpClientPool(max_response_bytes=bound)
    try:
        with pytest.raises(ResponseTooLarge):
            await pool.send("k", request(upstream.url()), 10)
    finally:
        ticks.append(loop.time())
        ticker.cancel()
        await pool.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    assert max(gaps) < 0.25, f"the loop stalled {max(gaps):.3f}s"


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_a_truncated_compressed_body_is_refused(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, framing: str
) -> None:
    whole = gzipped(b'{"amount": 100000}')
    cut = whole[: len(whole) - 6]  # the gzip trailer (CRC, length) and a byte of the stream are missing
    if framing == "content-length":
        answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(cut) + cut
    elif framing == "chunked":
        answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer += b"%x\r\n" % len(cut) + cut + b"\r\n0\r\n\r\n"
    else:
        answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n" + cut

    async def truncated(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(answer)
        await writer.drain()
        if framing == "until-close":
            return
        await reader.read()

    upstream = await serve(truncated)
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", request(upstream.url()), 5)
    assert "compressed body" in caught.value.message


async def test_an_upstream_closing_mid_body_is_unreachable_after_sending(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    async def cut(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    upstream = await serve(cut)
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", request(upstream.url(), "POST", b"{}"), 5)
    assert caught.value.sent


async def test_trailers_do_not_become_headers(serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool) -> None:
    upstream = await serve(
        answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
            b"2\r\nok\r\n0\r\nLocation: http://evil.example/\r\nX-Trailer: t\r\n\r\n"
        )
    )
    answer = await http.send("k", request(upstream.url()), 5)
    assert answer.body == b"ok"
    assert answer.header("X-Trailer") is None and answer.header("Location") is None


async def test_bytes_after_the_answer_never_reach_the_next_request(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    upstream = await serve(answering(OK + extra, OK))
    assert (await http.send("k", request(upstream.url("/a")), 5)).body == b"ok"
    await asyncio.sleep(0.05)
    assert (await http.send("k", request(upstream.url("/b")), 5)).body == b"ok"
    assert upstream.connections == 2


async def test_an_answer_that_comes_before_the_request_body_is_sent_closes_the_connection(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    body = b"x" * (32 * 1024 * 1024)  # more than the socket buffers hold: still being written when answered

    async def early(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        upstream.received.append(head)
        writer.write(OK)  # answered before the body is read: what follows on this connection is anyone's guess
        await writer.drain()
        if head.startswith(b"POST"):
            await asyncio.sleep(0.2)
            while await reader.read(1 << 20):
                pass
            return
        await answering(OK)(upstream, reader, writer)

    upstream = await serve(early)
    assert (await http.send("k", request(upstream.url("/upload"), "POST", body), 10)).body == b"ok"
    assert (await http.send("k", request(upstream.url("/next")), 5)).body == b"ok"
    assert upstream.connections == 2


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    ],
)
async def test_http_1_0_and_closing_answers_are_read_and_their_connection_not_reused(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, answer: bytes, reused: bool
) -> None:
    async def once(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.head(reader)
        writer.write(answer)
        await writer.drain()
        if b"Content-Length" not in answer or b"HTTP/1.0" in answer or b"close" in answer:
            return
        await answering(answer)(upstream, reader, writer)

    upstream = await serve(once)
    for _ in range(2):
        assert (await http.send("k", request(upstream.url()), 5)).body == b"ok"
    assert upstream.connections == (1 if reused else 2)


async def test_a_timed_out_exchange_closes_its_connection(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    eof = asyncio.Event()

    async def late(upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if upstream.connections == 1:
            await upstream.head(reader)
            await reader.read()  # returns when the client closes
            eof.set()
            return
        await answering(OK)(upstream, reader, writer)

    upstream = await serve(late)
    with pytest.raises(UpstreamTimeout):
        await http.send("k", request(upstream.url()), 0.2)
    await asyncio.wait_for(eof.wait(), 2)
    assert (await http.send("k", request(upstream.url()), 5)).body == b"ok"


# -- redirects ----------------------------------------------------------------------------------------------------


async def test_a_redirect_to_another_origin_is_returned_and_nothing_reaches_it(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    other = await serve(answering(OK))
    for location in (str(other.url("/steal")), f"//127.0.0.1:{other.port}/steal", f"https://127.0.0.1:{other.port}/"):
        upstream = await serve(
            answering(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location.encode())
        )
        answer = await http.send("k", request(upstream.url("/a"), Authorization="Bearer secret"), 5)
        assert answer.status == 302
    assert other.connections == 0


async def test_redirects_are_bounded(serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool) -> None:
    upstream = await serve(
        answering(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
    )
    answer = await http.send("k", request(upstream.url("/loop")), 5)
    assert answer.status == 307 and len(upstream.received) == MAX_REDIRECTS + 1


async def test_a_303_turns_a_post_into_a_get_without_its_body(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool
) -> None:
    upstream = await serve(answering(b"HTTP/1.1 303 See Other\r\nLocation: /done?x=1\r\nContent-Length: 0\r\n\r\n", OK))
    answer = await http.send("k", request(upstream.url("/form"), "POST", b"secret=1"), 5)
    assert answer.body == b"ok"
    second = upstream.received[1]
    assert second.startswith(b"GET /done?x=1 HTTP/1.1\r\n") and b"secret=1" not in second


@pytest.mark.parametrize("location", [b"http://[::1", b"http://h:99999/", b"http://exa mple.com/", b"http://h:x/"])
async def test_a_redirect_whose_location_is_not_a_url_is_returned_as_it_is(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, location: bytes
) -> None:
    upstream = await serve(answering(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"))
    answer = await http.send("k", request(upstream.url("/a")), 5)
    assert answer.status == 302 and len(upstream.received) == 1


# -- TLS ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


def server_tls(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    return context


async def test_an_https_upstream_with_a_certificate_from_an_unknown_ca_is_refused(
    serve: Callable[..., Awaitable[Upstream]], http: HttpClientPool, pki: dict[str, Path]
) -> None:
    upstream = await serve(answering(OK), tls=server_tls(pki))
    with pytest.raises(UpstreamUnreachable) as caught:
        await http.send("k", request(URL(f"https://127.0.0.1:{upstream.port}/")), 5)
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message and not caught.value.sent
    assert upstream.received == []


async def test_an_https_upstream_is_checked_against_its_host_name_with_a_ca_named_by_ssl_cert_file(
    serve: Callable[..., Awaitable[Upstream]], pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca"]))
    upstream = await serve(answering(OK), host="127.0.0.2", tls=server_tls(pki))
    trusted = await serve(answering(OK), tls=server_tls(pki))
    pool = HttpClientPool(max_response_bytes=LIMIT)
    try:
        assert (await pool.send("k", request(URL(f"https://localhost:{trusted.port}/")), 5)).body == b"ok"
        with pytest.raises(UpstreamUnreachable) as caught:  # the certificate names 127.0.0.1 and localhost only
            await pool.send("k", request(URL(f"https://127.0.0.2:{upstream.port}/")), 5)
        assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message
    finally:
        await pool.close()
    assert upstream.received == []


# -- webhook deliveries: no private address, however the name resolves --------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "127.1", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]", "0.0.0.0"]
)
async def test_a_webhook_pool_never_connects_to_a_loopback_address_whatever_names_it(
    serve: Callable[..., Awaitable[Upstream]], host: str
) -> None:
    upstream = await serve(answering(OK), host="0.0.0.0")
    pool = HttpClientPool(max_response_bytes=LIMIT, resolve=public_addresses)
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            await pool.send("k", request(URL(f"http://{host}:{upstream.port}/hook")), 5)
        assert not caught.value.sent
    finally:
        await pool.close()
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "100.64.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "::127.0.0.1",
    ],
)
def test_private_addresses_and_ipv6_forms_embedding_one_are_not_public(address: str) -> None:
    assert address_problem(address) is not None


def test_public_addresses_and_ipv6_forms_embedding_one_are_public() -> None:
    assert [address_problem(a) for a in ("93.184.216.34", "2606:2800:220:1::1", "64:ff9b::5db8:d822")] == [None] * 3
