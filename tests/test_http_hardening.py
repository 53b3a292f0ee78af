"""What reaches the wire, byte for byte: header names and values, pooled connections, dot-segments, odd answers.

The upstream here is a raw socket server on loopback (asyncio.start_server), not an HTTP library: it records the
exact bytes each connection receives and parses them leniently, the way a permissive backend or proxy would, so a
smuggled request shows up as what it is.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from ductape.processor import InvalidArgumentError, UnavailableError
from ductape.processor.v1 import action_pb2, session_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Running, ServerFactory

VICTIM_KEY = "sk-victim-key"


@dataclass
class RawRequest:
    """One request as the lenient upstream parsed it, and the connection it came on."""

    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


Answer = Callable[[RawRequest], Awaitable[bytes] | bytes]


@dataclass
class RawUpstream:
    """A keep-alive HTTP/1.1 server on a raw socket; `answer` turns a parsed request into the bytes to write."""

    port: int = 0
    received: dict[int, bytearray] = field(default_factory=dict)
    writers: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    requests: list[RawRequest] = field(default_factory=list)
    answer: Answer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.received) + 1
        raw = self.received[number] = bytearray()
        self.writers[number] = writer
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    raw += chunk
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                # Lenient, like many backends: the name ends at the first colon, and a Transfer-Encoding that
                # mentions chunked wins over Content-Length (RFC 9112 says so too).
                headers = [(n.strip(), v.strip()) for n, _, v in (item.partition(":") for item in lines)]
                found = {n.lower(): v for n, v in headers}
                body = b""
                if "chunked" in found.get("transfer-encoding", "").lower():
                    while True:
                        while b"\r\n" not in buffer:
                            chunk = await reader.read(65536)
                            raw += chunk
                            buffer += chunk
                        size_line, buffer = buffer.split(b"\r\n", 1)
                        size = int(size_line.split(b";")[0] or b"0", 16)
                        while len(buffer) < size + 2:
                            chunk = await reader.read(65536)
                            raw += chunk
                            buffer += chunk
                        body, buffer = body + buffer[:size], buffer[size + 2 :]
                        if size == 0:
                            break
                else:
                    length = int(found.get("content-length", "0") or 0)
                    while len(buffer) < length:
                        chunk = await reader.read(65536)
                        raw += chunk
                        buffer += chunk
                    body, buffer = buffer[:length], buffer[length:]
                request = RawRequest(number, method, target, headers, body)
                self.requests.append(request)
                assert self.answer is not None
                answer = self.answer(request)
                data = await answer if not isinstance(answer, bytes) else answer
                writer.write(data)
                await writer.drain()
                framing = data.split(b"\r\n\r\n", 1)[0].lower()
                if b"content-length" not in framing and b"chunked" not in framing:
                    return  # a body delimited by the end of the connection
        except (ConnectionError, ValueError):
            return
        finally:
            writer.close()


def http_answer(status: int, data: Any, *extra: str) -> bytes:
    body = json.dumps(data).encode()
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def echo(request: RawRequest) -> bytes:
    """The path the upstream saw and the Authorization it saw with it."""
    auth = next((v for n, v in request.headers if n.lower() == "authorization"), "")
    return http_answer(200, {"path": request.target, "auth": auth, "connection": request.connection})


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(answer=echo)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()
    await server.wait_closed()


def product(base_url: str, *actions: dict[str, Any], request_type: str = "application/xml") -> bytes:
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": base_url, "request_type": request_type}},
                "retry": {"max": 0},
                "actions": [
                    {
                        "tag": "submit",
                        "method": "POST",
                        "path": "/submit",
                        "body": "$Input{body}{xml}",
                        "input": {"body": {"xml": {"type": "string"}}},
                    },
                    {
                        "tag": "profile",
                        "method": "GET",
                        "path": "/profile",
                        "headers": {"Authorization": "Bearer $Secret{API_KEY}"},
                    },
                    *actions,
                ],
            }
        ],
    }
    return json.dumps(document).encode()


@pytest.fixture
async def running(raw_upstream: RawUpstream, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> Running:
    monkeypatch.setenv("PROCESSOR_SECRET_API_KEY", VICTIM_KEY)
    server = await start_server()
    await server.client.product.apply(
        product(
            raw_upstream.url,
            {
                "tag": "traced",
                "method": "GET",
                "path": "/traced",
                "headers": {"X-Tag": "$Input{body}{tag}"},
                "input": {"headers": {"X-Request-Id": {"type": "string"}, "X-Trace": {"type": "string"}}},
            },
            {"tag": "read", "method": "GET", "path": "/read", "headers": {"X-Copy": "$Input{headers}{X-Seen}"}},
        )
    )
    return server


async def run(server: Running, event: str, **kwargs: Any) -> Any:
    return await server.client.action.run(product="shop", env="dev", app="api", event=event, **kwargs)


# -- header names and values ---------------------------------------------------------------------------------------


async def test_a_smuggling_caller_cannot_touch_another_callers_request(
    running: Running, raw_upstream: RawUpstream
) -> None:
    """One caller tries to smuggle a request through a header name and a raw body; the other's calls stay its own."""
    smuggled = "0\r\n\r\nGET /steal HTTP/1.1\r\nX-Ignore: "
    refused: list[str] = []
    attacked = asyncio.Event()

    async def attacker() -> None:
        for _ in range(8):
            with pytest.raises(InvalidArgumentError) as caught:
                await run(
                    running,
                    "submit",
                    input={"headers": {"Transfer-Encoding:chunked": "x"}, "body": {"xml": smuggled}},
                )
            refused.extend(v.field for v in caught.value.field_violations)
            attacked.set()
            await asyncio.sleep(0)

    async def victim() -> list[Any]:
        answers = []
        await attacked.wait()  # so the victim's first call takes the connection the attack used, if any
        for _ in range(8):
            answers.append((await run(running, "profile")).body)
            await asyncio.sleep(0)
        return answers

    _, answers = await asyncio.gather(attacker(), victim())
    assert [{k: a[k] for k in ("path", "auth")} for a in answers] == [
        {"path": "/profile", "auth": f"Bearer {VICTIM_KEY}"}
    ] * 8
    assert refused == ['input.headers["Transfer-Encoding:chunked"]'] * 8
    assert [(r.method, r.target) for r in raw_upstream.requests] == [("GET", "/profile")] * 8
    wire = b"".join(raw_upstream.received.values())
    assert b"steal" not in wire and b"Transfer-Encoding" not in wire
    for request in raw_upstream.requests:
        assert [v for n, v in request.headers if n == "Authorization"] == [f"Bearer {VICTIM_KEY}"]


@pytest.mark.parametrize(
    "name",
    ["X Y", "HOST ", "Host:evil", "Transfer-Encoding:chunked", "Content-Length ", "X-A\r\nX-B", "X\x00", "Ü", ""],
)
async def test_a_header_name_that_is_not_a_token_is_refused_and_never_sent(
    running: Running, raw_upstream: RawUpstream, name: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "traced", input={"headers": {name: "1"}, "body": {"tag": "t"}})
    assert caught.value.reason == "INVALID_INPUT"
    assert [v.field for v in caught.value.field_violations] == [f"input.headers[{json.dumps(name)}]"]
    assert raw_upstream.received == {}


@pytest.mark.parametrize(
    "name", ["Host", "content-length", "TRANSFER-ENCODING", " Connection", "Upgrade", "te", "Trailer", "Keep-Alive"]
)
async def test_framing_and_hop_by_hop_headers_cannot_be_given_in_any_case(
    running: Running, raw_upstream: RawUpstream, name: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "traced", input={"headers": {name: "1"}, "body": {"tag": "t"}})
    assert "framing or hop-by-hop" in caught.value.field_violations[0].description
    for proxy in ("Proxy-Authorization", "proxy-connection"):
        with pytest.raises(InvalidArgumentError):
            await run(running, "traced", input={"headers": {proxy: "1"}, "body": {"tag": "t"}})
    assert raw_upstream.received == {}


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb", "a\x85b"])
async def test_control_characters_in_header_values_are_refused(
    running: Running, raw_upstream: RawUpstream, value: str
) -> None:
    with pytest.raises(InvalidArgumentError) as given:
        await run(running, "traced", input={"headers": {"X-Trace": value}, "body": {"tag": "t"}})
    assert given.value.reason == "INVALID_INPUT"
    assert [v.field for v in given.value.field_violations] == ['input.headers["X-Trace"]']
    with pytest.raises(InvalidArgumentError) as rendered:
        await run(running, "traced", input={"body": {"tag": value}})
    assert rendered.value.reason == "HEADER_VALUE_INVALID"
    assert [v.field for v in rendered.value.field_violations] == ['headers["X-Tag"]']
    assert rendered.value.metadata["template"] == "apps[0].actions[2].headers.X-Tag"
    assert raw_upstream.received == {}


async def test_only_declared_caller_headers_are_sent(running: Running, raw_upstream: RawUpstream) -> None:
    answer = await run(
        running, "traced", input={"headers": {"x-request-id": "r-1", "X-Trace": "tab\tok é"}, "body": {"tag": "t"}}
    )
    assert answer.status_code == 200
    sent = raw_upstream.requests[-1].headers
    assert ("X-Request-Id", "r-1") in sent and ("X-Tag", "t") in sent
    assert ("X-Trace", "tab\tok Ã©") in sent  # UTF-8 on the wire, read here as latin-1
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "traced", input={"headers": {"X-Other": "o"}, "body": {"tag": "t"}})
    assert caught.value.field_violations[0].field == 'input.headers["X-Other"]'
    assert "not declared" in caught.value.field_violations[0].description
    # A header a template reads is data for the template: accepted, and sent only where the template puts it.
    await run(running, "read", input={"headers": {"X-Seen": "s-1"}})
    sent = raw_upstream.requests[-1].headers
    assert ("X-Copy", "s-1") in sent and all(n != "X-Seen" for n, _ in sent)


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X Y": "1"}, 'apps[0].actions[2].headers["X Y"]'),
        ({"Host": "evil"}, 'apps[0].actions[2].headers["Host"]'),
        ({"Proxy-Authorization": "x"}, 'apps[0].actions[2].headers["Proxy-Authorization"]'),
        ({"X-Ok": "a\r\nX-Evil: 1"}, 'apps[0].actions[2].headers["X-Ok"]'),
    ],
)
async def test_manifest_header_problems_are_refused_at_apply(
    running: Running, raw_upstream: RawUpstream, headers: dict[str, str], field: str
) -> None:
    action = {"tag": "bad", "method": "GET", "path": "/bad", "headers": headers}
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.product.apply(product(raw_upstream.url, action))
    assert caught.value.reason == "INVALID_MANIFEST"
    assert [v.field for v in caught.value.field_violations] == [field]


async def test_declared_input_header_names_are_checked_at_apply(running: Running, raw_upstream: RawUpstream) -> None:
    action = {
        "tag": "bad",
        "method": "GET",
        "path": "/bad",
        "input": {"headers": {"Transfer-Encoding": {"type": "string"}, "X Y": {"type": "string"}}},
    }
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.product.apply(product(raw_upstream.url, action))
    assert sorted(v.field for v in caught.value.field_violations) == [
        'apps[0].actions[2].input.headers["Transfer-Encoding"]',
        'apps[0].actions[2].input.headers["X Y"]',
    ]


# -- pooled connections --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(http_answer(200, {"ok": 1}), id="framed-keeps-the-connection"),
        pytest.param(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok": 1}', id="no-length"),
        pytest.param(http_answer(400, {"bad": 1}), id="400"),
        pytest.param(http_answer(413, {"big": 1}), id="413"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="two-lengths"),
        pytest.param(http_answer(200, {"ok": 1}) + http_answer(200, {"stolen": 1}), id="extra-answer"),
        pytest.param(b"late", id="answer-arriving-while-idle"),
    ],
)
async def test_a_connection_is_not_reused_after_an_ambiguous_exchange(
    running: Running, raw_upstream: RawUpstream, first: bytes
) -> None:
    def answer(request: RawRequest) -> bytes:
        if request.target != "/submit":
            return echo(request)
        if first == b"late":
            late = http_answer(200, {"stolen": 1})
            asyncio.get_running_loop().call_later(0.05, raw_upstream.writers[request.connection].write, late)
            return http_answer(200, {"ok": 1})
        return first

    raw_upstream.answer = answer
    head = first.split(b"\r\n\r\n", 1)[0]
    if b"Transfer-Encoding" in head or head.count(b"Content-Length") > 1:
        with pytest.raises(UnavailableError) as caught:  # aiohttp refuses to parse it
            await run(running, "submit", input={"body": {"xml": "<a/>"}})
        assert caught.value.reason == "UPSTREAM_UNREACHABLE"
    else:
        await run(running, "submit", input={"body": {"xml": "<a/>"}})
    await asyncio.sleep(0.15)
    after = await run(running, "profile")
    assert after.body["path"] == "/profile" and "stolen" not in after.body
    reused = after.body["connection"] == raw_upstream.requests[0].connection
    assert reused == (first == http_answer(200, {"ok": 1}))


# -- what the upstream answers -------------------------------------------------------------------------------------


async def test_non_utf8_upstream_header_bytes_are_handed_on_as_latin1(
    running: Running, raw_upstream: RawUpstream
) -> None:
    raw_upstream.answer = lambda request: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Name: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    answer = await run(running, "profile")
    assert answer.status_code == 200
    assert answer.headers["X-Name"] == "café" and answer.headers["X-Utf8"] == "café"


# -- dot-segments in path parameters --------------------------------------------------------------------------------


def normalised(target: str) -> str:
    """The path a normalising proxy routes to (RFC 3986: `%2E` is `.`, then dot-segments are removed)."""
    path = re.sub("%2[eE]", ".", target.split("?", 1)[0])
    segments: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    return "/" + "/".join(segments)


ITEM = {
    "tag": "item",
    "method": "GET",
    "path": "/api/items/:id/detail",
    "input": {"params": {"id": {"type": "string", "required": True}}},
}


@pytest.mark.parametrize("value", [".", "..", "%2e", "%2E%2e", ".%2E", "%252e%252e", "%25252E"])
async def test_a_dot_segment_path_parameter_is_refused(running: Running, raw_upstream: RawUpstream, value: str) -> None:
    raw_upstream.answer = lambda request: http_answer(200, {"routed": normalised(request.target)})
    await running.client.product.apply(product(raw_upstream.url, ITEM))
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "item", input={"params": {"id": value}})
    assert caught.value.reason == "INVALID_INPUT"
    assert [v.field for v in caught.value.field_violations] == ["input.params.id"]
    assert raw_upstream.received == {}


@pytest.mark.parametrize("value", ["...", ".a", "a..", "a/../b", "%2e%2e%2f", " .."])
async def test_other_path_parameters_stay_inside_the_path_behind_a_normalising_proxy(
    running: Running, raw_upstream: RawUpstream, value: str
) -> None:
    raw_upstream.answer = lambda request: http_answer(200, {"routed": normalised(request.target)})
    await running.client.product.apply(product(raw_upstream.url, ITEM))
    routed = (await run(running, "item", input={"params": {"id": value}})).body["routed"]
    assert routed.startswith("/api/items/") and routed.endswith("/detail") and routed.count("/") == 4


# -- multipart part headers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"a\r\nX-Evil: 1": "v"}, 'input.body["a\\r\\nX-Evil: 1"]'),
        ({"f": {"content_base64": "aGk=", "filename": "x\r\n.txt"}}, "input.body.f.filename"),
        ({"f": {"content_base64": "aGk=", "filename": "x\x00.txt"}}, "input.body.f.filename"),
        ({"f": {"content_base64": "aGk=", "content_type": "text/plain\r\nX-Evil: 1"}}, "input.body.f.content_type"),
    ],
)
async def test_control_characters_in_multipart_part_headers_are_refused(
    running: Running, raw_upstream: RawUpstream, body: dict[str, Any], field: str
) -> None:
    upload = {"tag": "upload", "method": "POST", "path": "/upload"}
    await running.client.product.apply(product(raw_upstream.url, upload, request_type="multipart/form-data"))
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "upload", input={"body": body})
    assert caught.value.reason == "INVALID_INPUT"
    assert [v.field for v in caught.value.field_violations] == [field]
    assert raw_upstream.received == {}


# -- deep JSON, both ways -------------------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [33, 900, 100_000])
async def test_upstream_json_too_deep_for_protobuf_comes_back_as_bytes(
    running: Running, raw_upstream: RawUpstream, depth: int
) -> None:
    text = nested(depth).encode()
    raw_upstream.answer = lambda request: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(text) + text
    )
    answer = await run(running, "profile")
    assert answer.status_code == 200 and answer.content_type == "application/json"
    assert answer.body == text


async def test_upstream_json_as_deep_as_protobuf_allows_is_parsed(running: Running, raw_upstream: RawUpstream) -> None:
    text = nested(32).encode()
    raw_upstream.answer = lambda request: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(text) + text
    )
    answer = await run(running, "profile")
    assert answer.body == json.loads(text)


def deep_struct(depth: int) -> struct_pb2.Struct:
    data: Any = 1
    for _ in range(depth):
        data = {"a": data}
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, written by hand (a client library would refuse to build it)."""

    def varint(value: int) -> bytes:
        out = b""
        while value > 0x7F:
            out += bytes([value & 0x7F | 0x80])
            value >>= 7
        return out + bytes([value])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


async def test_a_request_nested_past_protobufs_limit_is_invalid_argument(running: Running) -> None:
    deep = deep_struct(40).SerializeToString()
    run_request = action_pb2.RunRequest(product="shop", env="dev", app="api", event="submit").SerializeToString()
    run_request += field_bytes(
        action_pb2.RunRequest.DESCRIPTOR.fields_by_name["input"].number,
        field_bytes(action_pb2.ActionInput.DESCRIPTOR.fields_by_name["body"].number, deep),
    )
    start_request = session_pb2.StartRequest(product="shop", env="dev", tag="user").SerializeToString()
    start_request += field_bytes(session_pb2.StartRequest.DESCRIPTOR.fields_by_name["data"].number, deep)
    channel = running.channel()
    try:
        for method, request in (
            ("/ductape.processor.v1.ActionService/Run", run_request),
            ("/ductape.processor.v1.SessionService/Start", start_request),
        ):
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "cannot be decoded" in (caught.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


# -- the same mistake elsewhere: caller-controlled names onto other wires ------------------------------------------


@pytest.mark.parametrize("key", ["region\n", "region\r\nNats-Msg-Id", "re gion", "région"])
async def test_a_broker_attribute_key_with_a_newline_or_space_is_refused(start_server: ServerFactory, key: str) -> None:
    """Attribute keys become NATS header names (`attr-<key>`); a regex ending in `$` let a trailing newline through."""
    server = await start_server()
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "brokers": [{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": [{"tag": "orders", "name": "o"}]}],
    }
    await server.client.product.apply(json.dumps(document).encode())
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.message_broker.publish(
            product="shop", env="dev", event="events:orders", data=b"x", attributes={key: "v"}
        )
    assert caught.value.field_violations[0].field == f"message.attributes.{key}"
