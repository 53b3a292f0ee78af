"""The webhook HTTP listener: provider webhooks POSTed to `/webhooks/<product>/<env><path>` (a webhook's receive
path in that environment).

Started only once a product declares a `receive` (checked at start and on every registry poll), on
`PROCESSOR_WEBHOOK_HTTP_ADDRESS` (loopback by default). Like a servicer it only converts: it finds the receive
target, reads at most its `max_body_bytes` (larger: 413), and answers what the receiver says: 200 with the received
webhook's id once it is verified and stored (dispatch goes on after the answer), 401 for a signature that does not
verify, is too old or replays a webhook id, 404 for an unknown path.

The HTTP/1.1 it needs is small (one POST, one JSON answer, then the connection closes), so it is served on the
loop's transports with llhttp (httptools) parsing, strict, as the actions' client parses answers
(`adapters/http/connection.py`), rather than on aiohttp's web server, which cost about 12 MB of every processor
that receives webhooks. A request's head is bounded, and so are its chunk framing and trailers (FRAMING_BYTES), a
connection that does not complete a request in REQUEST_TIMEOUT_S is closed, and after an early answer (404, 413) the
rest of a body is read and dropped for a while, so that the sender sees the answer rather than a reset connection.
Bytes after the request (a pipelined one) are dropped unparsed, connections beyond MAX_CONNECTIONS are answered 503,
and an unexpected failure is a 500 whose details stay in the log. docs/webhooks.md lists these promises;
tests/test_webhook_listener_hostile.py and tests/test_hostile_http.py hold them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools

from ductape_processor.errors import NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.webhooks.receiver import ReceiveTarget, WebhookReceiver
from ductape_processor.runtime.webhooks.signing import SignatureRefused

log = logging.getLogger(__name__)

PATH_PREFIX = "/webhooks"
MAX_HEAD_BYTES: Final = 65_536
"""Bytes of a request's line and headers, together."""
FRAMING_BYTES: Final = 65_536
"""Bytes a request may carry beyond its head, its body's limit and 4 bytes a body byte (chunks of 2 bytes on pass):
chunk sizes and extensions, and trailers (which llhttp hands over whole, so an endless one would otherwise grow in
memory until the connection's timeout)."""
REQUEST_TIMEOUT_S: Final = 30.0
"""A connection that has not sent a whole request by then is closed."""
LINGER_S: Final = 5.0
"""After an answer sent before the body was read, the rest of the body is read and dropped for at most this long."""
MAX_CONNECTIONS: Final = 512
"""Connections open at once; one more is answered 503 and closed (each holds at most a head and a body)."""
BODY_BUDGET_BYTES: Final = 256 * 1024 * 1024
"""Bytes of bodies all connections may hold at once: a body that would pass it while others hold bytes is answered
503 (providers retry), so that MAX_CONNECTIONS senders of `max_body_bytes` (up to 64 MiB each) cannot make the
listener hold their product (32 GiB); a request alone is never refused by it."""
_REASONS: Final = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                   413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Request(asyncio.Protocol):
    """One connection: one request read, handed to the listener, answered, then the connection closes."""

    def __init__(self, listener: WebhookHttpListener) -> None:
        self._listener = listener
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._head = 0
        self._head_parsed = 0
        self._received = 0
        self._head_done = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._held = 0  # bytes of `_body` counted in the listener's `buffered`
        self._size = 0
        self._limit = 0
        self._target: asyncio.Future[ReceiveTarget | None] | None = None
        self._complete = False
        self._answered = False
        self._task: asyncio.Task[None] | None = None

    # -- asyncio ------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if len(self._listener.connections) >= MAX_CONNECTIONS:
            self.answer(503, linger=False, reason=str(Reason.UNAVAILABLE))
            return
        self._listener.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        # A task in progress goes on: a webhook being stored when its sender went away is still received.
        self._listener.connections.discard(self)
        self._listener.buffered -= self._held
        self._held = 0
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._complete:
            return  # one request per connection: what follows it (a pipelined request) is dropped
        self._received += len(data)
        if self._head_done and self._received > MAX_HEAD_BYTES + FRAMING_BYTES + self._limit + 4 * self._size:
            if self._answered:
                return  # lingering: dropped unparsed
            if self._target is not None and self._target.done():  # else reading is paused; the head's bytes
                self.answer(413, error=f"the body with its framing is larger than {self._limit} bytes")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.answer(400, linger=False, error="protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            if not self._answered and not self._complete:
                self.answer(400, linger=False, error=f"the request cannot be parsed: {exc}")
            return
        if self._target is None and not self._answered:  # the head is not complete yet
            self._head += len(data)
            if self._head > MAX_HEAD_BYTES:
                self.answer(400, linger=False, error=f"the request's head is larger than {MAX_HEAD_BYTES} bytes")

    # -- llhttp callbacks -----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Answered  # a second request in the same bytes: not parsed (the answer says Connection: close)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if self._head_done:
            return  # a trailer field: not a header (the signature covers neither), dropped
        key, text = _text(name).lower(), _text(value)
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def _count(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > MAX_HEAD_BYTES:
            self.answer(400, linger=False, error=f"the request's head is larger than {MAX_HEAD_BYTES} bytes")
            raise _Answered

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self._parser.get_method() != b"POST":
            self.answer(405, error="only POST is served here")
            return
        # Each segment is decoded alone: an encoded slash (`shop%2Fdev`) must not move a name into the next part.
        segments = [unquote(segment) for segment in _text(self._url).split("?", 1)[0].split("/")]
        path = "/".join(segments)
        product, env, receive = "", "", ""
        if path.startswith(PATH_PREFIX + "/") and not any("/" in segment for segment in segments):
            product, _, rest = path[len(PATH_PREFIX) + 1 :].partition("/")
            env, _, receive = rest.partition("/")
        if not (product and env and receive):
            self.answer(404, error="not found")
            return
        assert self._transport is not None
        self._transport.pause_reading()  # the body waits until its target (and its size limit) is known
        self._target = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._find(product, env, "/" + receive))

    def on_body(self, chunk: bytes) -> None:
        # Bytes that came with the head are parsed before the target (and its limit) is known: counted then.
        if self._answered:
            return  # read to the end of the request, and dropped
        self._size += len(chunk)
        if self._limit and self._size > self._limit:
            self.answer(413, error=f"the body is larger than {self._limit} bytes")
            raise _Answered
        listener = self._listener
        if listener.buffered + len(chunk) > BODY_BUDGET_BYTES and listener.buffered > self._held:
            self.answer(503, reason=str(Reason.UNAVAILABLE), error="too many bodies are being received at once; retry")
            raise _Answered
        listener.buffered += len(chunk)
        self._held += len(chunk)
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        self._complete = True
        if self._answered:
            self.close()  # answered early; the rest of the request has now been read
        elif self._target is not None and self._target.done():
            self._accept_when_known()

    def _accept_when_known(self) -> None:
        assert self._target is not None
        target = self._target.result()
        if target is not None and not self._answered:
            self._task = asyncio.ensure_future(self._accept(target, b"".join(self._body)))

    # -- the listener's work -------------------------------------------------------------------------------------

    async def _find(self, product: str, env: str, path: str) -> None:
        assert self._target is not None and self._transport is not None
        try:
            target = await self._listener.target(self, product, env, path)
        except Exception:
            log.exception("webhook receive target not found")
            self.answer(500, reason=str(Reason.INTERNAL))
            return
        if target is None:
            return  # answered
        self._limit = target.receive.max_body_bytes
        length = self._headers.get("content-length", "")
        if (length.isdigit() and int(length) > self._limit) or self._size > self._limit:
            self.answer(413, error=f"the body is larger than {self._limit} bytes")
            return
        self._target.set_result(target)
        if self._complete:
            self._accept_when_known()
            return
        if "100-continue" in self._headers.get("expect", "").lower():
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._transport.resume_reading()

    async def _accept(self, target: ReceiveTarget, body: bytes) -> None:
        try:
            status, fields = await self._listener.accept(target, self._headers, body)
        except Exception:
            log.exception("received webhook not accepted")
            status, fields = 500, {"reason": str(Reason.INTERNAL)}  # the details are in the log, not the answer
        self.answer(status, **fields)

    def answer(self, status: int, *, linger: bool = True, **fields: str) -> None:
        """Send the answer and close the connection: at once when the request is read or cannot be parsed
        (`linger=False`), else once the rest of it is read and dropped (at most LINGER_S)."""
        if self._answered or self._transport is None or self._transport.is_closing():
            return
        self._answered = True
        data = json.dumps(fields).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        self._transport.write(head.encode() + data)
        if self._target is not None and not self._target.done():
            self._target.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        if self._complete or not linger:
            self._transport.close()
        else:  # a body may still be on its way: read and drop it for a while, so the sender reads the answer
            self._transport.resume_reading()
            self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def close(self) -> None:
        """Close now."""
        if self._transport is not None:
            self._transport.close()


class _Answered(Exception):
    """Raised in a parser callback once the request is answered: parsing stops there."""


class WebhookHttpListener:
    """One HTTP listener bound to `address` (host:port; port 0 picks one), started by `ensure`."""

    def __init__(self, receiver: WebhookReceiver, address: str) -> None:
        self._receiver = receiver
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self.port = 0
        """The bound port, once started."""
        self._server: asyncio.Server | None = None
        self._stopped = False
        self.connections: set[_Request] = set()
        self.buffered = 0
        """Bytes of bodies the connections hold (BODY_BUDGET_BYTES)."""

    async def ensure(self) -> None:
        """Start serving when a product declares a receive path (and the listener is not serving yet)."""
        if self._server is not None or self._stopped or not await self._receiver.declared():
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Request(self), self._host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("webhook HTTP listener serving", extra={"address": f"{self._host}:{self.port}"})

    async def stop(self) -> None:
        """Stop serving; requests in flight are cut."""
        self._stopped = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for connection in list(self.connections):
                connection.close()
            await server.wait_closed()

    async def target(self, request: _Request, product: str, env: str, path: str) -> ReceiveTarget | None:
        """The receive target of a path, or None once `request` is answered 404 (or 503)."""
        try:
            return await self._receiver.target(product, env, path)
        except ProcessorError as exc:
            status = 404 if isinstance(exc, NotFound) else 503
            request.answer(status, reason=str(exc.reason) if status == 404 else str(Reason.UNAVAILABLE))
            return None

    async def accept(self, target: ReceiveTarget, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and JSON fields answering a received webhook."""
        try:
            record = await self._receiver.accept(target, headers, body)
        except SignatureRefused as exc:
            log.info(
                "received webhook refused",
                extra={"product": target.product, "env": target.env, "webhook": target.webhook.tag, "why": str(exc)},
            )
            return 401, {"error": "the webhook's signature does not verify"}
        except ProcessorError as exc:
            log.warning("received webhook not stored: %s", exc.message)
            return 503, {"reason": str(exc.reason)}
        return 200, {"id": record.received_id}
