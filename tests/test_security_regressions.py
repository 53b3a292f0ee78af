"""Security regressions that a mutation run showed no test would catch (issue 8 item 7).

Each test pins one behaviour whose loss was a surviving mutant: the verified-token memo keyed by product,
environment and session type; every configured API key accepted (key rotation); the idempotency key bound to the
caller's session when the action uses session data; redirects never followed to another port or scheme.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from ductape.processor import (
    FailedPreconditionError,
    InvalidArgumentError,
    Processor,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from ductape.processor.v1 import log_pb2, log_pb2_grpc

from ductape_processor.api.auth import hash_key
from ductape_processor.runtime.sessions import new_root_key
from ductape_processor.settings import Settings
from tests.conftest import Running, ServerFactory
from tests.upstream import Upstream, json_answer, redirect_answer, start_upstream

USER_SCHEMA = {"userId": {"type": "string", "required": True}}
ITEM = {"item": {"type": "string"}}


def product(name: str, base_url: str = "http://127.0.0.1:9") -> bytes:
    """A product with two session types and two actions: one that sends session data upstream, one that does not."""
    document: dict[str, Any] = {
        "product": name,
        "environments": [{"slug": "dev"}, {"slug": "prd"}],
        "sessions": [
            {"tag": "user", "schema": USER_SCHEMA, "selector": "$Session{userId}"},
            {
                "tag": "admin",
                "schema": USER_SCHEMA,
                "selector": "$Session{userId}",
            },
        ],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": base_url}, "prd": {"base_url": base_url}},
                "retry": {"max": 0},
                "actions": [
                    {
                        "tag": "order",
                        "method": "POST",
                        "path": "/orders",
                        "headers": {"X-User": "$Session{userId}"},
                        "input": {"body": ITEM},
                    },
                    {"tag": "ping", "method": "POST", "path": "/ping", "input": {"body": ITEM}},
                    {
                        "tag": "get",
                        "method": "GET",
                        "path": "/items/:id",
                        "input": {"params": {"id": {"type": "string"}}},
                    },
                ],
            }
        ],
    }
    return json.dumps(document).encode()


# -- the verified-token memo ----------------------------------------------------------------------------------------


async def test_a_token_verified_in_its_own_product_is_still_refused_elsewhere(start_server: ServerFactory) -> None:
    running = await start_server(session_keys=[new_root_key("k1")])
    await running.client.product.apply(product("shop"))
    await running.client.product.apply(product("blog"))
    session = running.client.session
    pair = await session.start(product="shop", env="dev", tag="user", data={"userId": "u-1"})
    for _ in range(2):  # the second verify is answered from the memo: it must still be the right place
        assert (await session.verify(product="shop", env="dev", tag="user", token=pair.token)).identifier == "u-1"
    for where in (
        {"product": "blog", "env": "dev", "tag": "user"},
        {"product": "shop", "env": "prd", "tag": "user"},
        {"product": "shop", "env": "dev", "tag": "admin"},
    ):
        with pytest.raises(UnauthenticatedError) as caught:
            await session.verify(token=pair.token, **where)
        assert caught.value.reason == "SESSION_INVALID", where
    with pytest.raises(UnauthenticatedError) as caught:
        await running.client.action.run(
            product="blog", env="dev", app="api", event="ping", session=("user", pair.token), input={}
        )
    assert caught.value.reason == "SESSION_INVALID", "ActionService.Run uses the same memo"


async def test_a_token_verified_in_the_wrong_place_first_still_opens_in_its_own(start_server: ServerFactory) -> None:
    running = await start_server(session_keys=[new_root_key("k1")])
    await running.client.product.apply(product("shop"))
    await running.client.product.apply(product("blog"))
    session = running.client.session
    pair = await session.start(product="blog", env="prd", tag="admin", data={"userId": "a-1"})
    with pytest.raises(UnauthenticatedError):
        await session.verify(product="shop", env="prd", tag="admin", token=pair.token)
    assert (await session.verify(product="blog", env="prd", tag="admin", token=pair.token)).identifier == "a-1"


# -- API keys --------------------------------------------------------------------------------------------------------


async def test_every_configured_api_key_is_accepted_and_no_other(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotation: the operator adds the new key's hash beside the old one; both must work until the old one is removed.
    monkeypatch.setenv("PROCESSOR_API_KEY_HASHES", f"{hash_key('old-key')}, {hash_key('new-key')}")
    hashes = Settings().api_key_hashes
    running = await start_server(api_key_hashes=hashes, api_key="old-key")
    await running.client.product.apply(product("shop"))
    for key in ("old-key", "new-key", "old-key", "new-key"):
        async with Processor(running.address, api_key=key) as caller:
            assert (await caller.product.get("shop")).version.version == 1, key
    for key in ("other-key", "OLD-KEY", "new-keyx", "old"):
        async with Processor(running.address, api_key=key) as stranger:
            with pytest.raises(UnauthenticatedError) as caught:
                await stranger.product.get("shop")
            assert caught.value.reason == "API_KEY_INVALID", key


async def test_an_api_key_under_another_scheme_is_refused(start_server: ServerFactory) -> None:
    # Only `Bearer <key>` authenticates: the right key under Basic, Token or no scheme at all is refused, so a key
    # pasted into the wrong header form never works by accident (and is not remembered as accepted).
    running = await start_server(api_key_hashes=[hash_key("good-key")], api_key="good-key")
    await running.client.product.apply(product("shop"))
    assert (await running.client.product.get("shop", metadata={"authorization": "bearer good-key"})).version.version
    for header in ("Basic good-key", "Token good-key", "good-key", "Bearergood-key", "Bearer ", "Basic  good-key"):
        async with Processor(running.address) as caller:
            with pytest.raises(UnauthenticatedError) as caught:
                await caller.product.get("shop", metadata={"authorization": header})
            assert caught.value.reason == "API_KEY_INVALID", header


# -- idempotency and sessions ----------------------------------------------------------------------------------------


async def test_another_user_reusing_an_idempotency_key_never_gets_the_first_users_answer(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server(session_keys=[new_root_key("k1")])
    await running.client.product.apply(product("shop", upstream.url))
    upstream.on("POST /orders", lambda r: json_answer({"owner": r.headers["X-User"]}, status=201))
    alice = await running.client.session.start(product="shop", env="dev", tag="user", data={"userId": "alice"})
    bob = await running.client.session.start(product="shop", env="dev", tag="user", data={"userId": "bob"})
    call: dict[str, Any] = {
        "product": "shop",
        "env": "dev",
        "app": "api",
        "event": "order",
        "input": {"body": {"item": "book"}},
        "idempotency_key": "order-1",
    }
    first = await running.client.action.run(**call, session=("user", alice.token))
    again = await running.client.action.run(**call, session=("user", alice.token))
    assert first.body == again.body == {"owner": "alice"} and again.attempts == 0, "alice's retry is replayed"
    with pytest.raises(FailedPreconditionError) as caught:
        await running.client.action.run(**call, session=("user", bob.token))
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert [seen.headers["X-User"] for seen in upstream.hits("/orders")] == ["alice"]


async def test_an_action_without_session_data_replays_across_sessions(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    # The session is part of the request only when the action reads it; otherwise the answer is the same for all.
    running = await start_server(session_keys=[new_root_key("k1")])
    await running.client.product.apply(product("shop", upstream.url))
    upstream.on("POST /ping", lambda r: json_answer({"n": len(upstream.hits("/ping"))}, status=201))
    alice = await running.client.session.start(product="shop", env="dev", tag="user", data={"userId": "alice"})
    bob = await running.client.session.start(product="shop", env="dev", tag="user", data={"userId": "bob"})
    call: dict[str, Any] = {
        "product": "shop",
        "env": "dev",
        "app": "api",
        "event": "ping",
        "input": {"body": {"item": "x"}},
        "idempotency_key": "ping-1",
    }
    first = await running.client.action.run(**call, session=("user", alice.token))
    second = await running.client.action.run(**call, session=("user", bob.token))
    assert first.body == second.body == {"n": 1} and second.attempts == 0
    assert len(upstream.hits("/ping")) == 1


# -- redirects -------------------------------------------------------------------------------------------------------


@pytest.fixture
async def other_upstream() -> AsyncIterator[Upstream]:
    """A second real HTTP server on 127.0.0.1: same host as `upstream`, another port."""
    state = await start_upstream()
    yield state
    assert state.server is not None
    await state.server.close()


async def test_a_redirect_to_the_same_host_on_another_port_or_scheme_is_not_followed(
    start_server: ServerFactory, upstream: Upstream, other_upstream: Upstream
) -> None:
    running = await start_server()
    await running.client.product.apply(product("shop", upstream.url))
    assert other_upstream.server is not None and upstream.server is not None
    port, other_port = upstream.server.port, other_upstream.server.port
    targets = {
        "port": f"http://127.0.0.1:{other_port}/items/stolen",
        "scheme": f"https://127.0.0.1:{port}/items/stolen",
        "scheme-and-port": f"https://127.0.0.1:{other_port}/items/stolen",
        "name": f"http://localhost:{port}/items/stolen",
    }
    for case, location in targets.items():
        upstream.on(f"GET /items/{case}", lambda r, location=location: redirect_answer(location))
        result = await running.client.action.run(
            product="shop", env="dev", app="api", event="get", input={"params": {"id": case}}
        )
        assert result.status_code == 302 and result.headers["Location"] == location, case
    assert other_upstream.seen == [], "nothing reached the server on the other port"
    assert upstream.hits("/items/stolen") == [], "nothing came back to the first server by another name or scheme"
    upstream.on("GET /items/moved", lambda r: redirect_answer(f"http://127.0.0.1:{port}/items/here"))
    upstream.on("GET /items/here", lambda r: web.json_response({"here": True}))
    moved = await running.client.action.run(
        product="shop", env="dev", app="api", event="get", input={"params": {"id": "moved"}}
    )
    assert moved.status_code == 200 and moved.body == {"here": True}, "the same origin, spelled out, is followed"


# -- response size bounds --------------------------------------------------------------------------------------------

LIMIT = 64 * 1024


def _gzipped(body: bytes, content_type: str = "text/plain") -> web.Response:
    return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip", "Content-Type": content_type})


def _chunked(body: bytes) -> Any:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 10_000):
            await response.write(body[start : start + 10_000])
        await response.write_eof()
        return response

    return answer


async def get_item(running: Running, item: str) -> Any:
    return await running.client.action.run(
        product="shop", env="dev", app="api", event="get", input={"params": {"id": item}}
    )


async def test_a_compressed_answer_is_bounded_by_its_size_once_decompressed(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    # A 2 KiB gzip body with an honest Content-Length that inflates to 4 MiB: the bound is on what the processor
    # would hold, not on the bytes on the wire.
    running = await start_server(max_upstream_response_bytes=LIMIT)
    await running.client.product.apply(product("shop", upstream.url))
    upstream.on("GET /items/bomb", lambda r: _gzipped(b"0" * (4 * 1024 * 1024)))
    upstream.on("GET /items/zipped", lambda r: _gzipped(b'{"ok": true}', "application/json"))
    with pytest.raises(ResourceExhaustedError) as caught:
        await get_item(running, "bomb")
    assert caught.value.reason == "UPSTREAM_RESPONSE_TOO_LARGE"
    assert (await get_item(running, "zipped")).body == {"ok": True}, "a gzip answer reaches the caller decoded"


async def test_a_response_of_exactly_the_limit_passes_and_one_byte_more_does_not(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server(max_upstream_response_bytes=LIMIT)
    await running.client.product.apply(product("shop", upstream.url))
    for framing, answer in (("sized", lambda body: lambda r: web.Response(body=body)), ("chunked", _chunked)):
        upstream.on(f"GET /items/{framing}-full", answer(b"x" * LIMIT))
        upstream.on(f"GET /items/{framing}-over", answer(b"x" * (LIMIT + 1)))
        assert (await get_item(running, f"{framing}-full")).status_code == 200, framing
        with pytest.raises(ResourceExhaustedError) as caught:
            await get_item(running, f"{framing}-over")
        assert caught.value.reason == "UPSTREAM_RESPONSE_TOO_LARGE", framing


# -- redirects within the same origin --------------------------------------------------------------------------------


async def test_at_most_five_redirects_are_followed(start_server: ServerFactory, upstream: Upstream) -> None:
    running = await start_server()
    await running.client.product.apply(product("shop", upstream.url))
    for hop in range(1, 7):
        upstream.on(f"GET /items/r{hop}", lambda r, hop=hop: redirect_answer(f"/items/r{hop - 1}"))
    upstream.on("GET /items/r0", lambda r: web.json_response({"landed": True}))
    five = await get_item(running, "r5")
    assert five.status_code == 200 and five.body == {"landed": True}
    six = await get_item(running, "r6")
    assert six.status_code == 302 and six.headers["Location"] == "/items/r0", "the sixth redirect is the answer"


async def test_a_redirected_post_becomes_a_get_only_where_http_says_so(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server()
    await running.client.product.apply(product("shop", upstream.url))
    upstream.on("GET /landing", lambda r: web.json_response({"method": "GET"}))
    upstream.on("POST /landing", lambda r: web.json_response({"method": "POST"}))
    for status, method in ((301, "GET"), (302, "GET"), (303, "GET"), (307, "POST"), (308, "POST")):
        upstream.on(
            "POST /ping", lambda r, status=status: web.Response(status=status, headers={"Location": "/landing"})
        )
        upstream.seen.clear()
        result = await running.client.action.run(
            product="shop", env="dev", app="api", event="ping", input={"body": {"item": "i"}}
        )
        assert result.body == {"method": method}, status
        landed = upstream.hits("/landing")
        assert len(landed) == 1 and json.loads(landed[0].body or b"null") == (
            None if method == "GET" else {"item": "i"}
        ), status


# -- retries after a broken connection -------------------------------------------------------------------------------


async def test_a_post_whose_connection_broke_after_sending_is_not_sent_again(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    # The upstream read the request, then dropped the connection: it may have acted on it, so a POST is not repeated
    # (a second payment); a GET is.
    running = await start_server()
    document = json.loads(product("shop", upstream.url))
    document["apps"][0]["retry"] = {"max": 2, "on": ["network"], "initial": "10ms"}
    await running.client.product.apply(json.dumps(document).encode())

    async def hang_up(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    upstream.on("POST /ping", hang_up)
    upstream.on("GET /items/flaky", hang_up)
    with pytest.raises(UnavailableError) as caught:
        await running.client.action.run(
            product="shop", env="dev", app="api", event="ping", input={"body": {"item": "i"}}
        )
    assert caught.value.reason == "UPSTREAM_UNREACHABLE"
    assert len(upstream.hits("/ping")) == 1, "a POST that may have been acted on is not sent again"
    with pytest.raises(UnavailableError):
        await get_item(running, "flaky")
    assert len(upstream.hits("/items/flaky")) >= 3, "a GET is retried (aiohttp may add one on a reused connection)"


async def test_a_post_answered_with_garbage_is_not_sent_again(start_server: ServerFactory) -> None:
    # The upstream read the request and answered something that is not HTTP: it may have acted on it.
    received: list[bytes] = []

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    running = await start_server()
    document = json.loads(product("shop", f"http://127.0.0.1:{port}"))
    document["apps"][0]["retry"] = {"max": 2, "on": ["network"], "initial": "10ms"}
    await running.client.product.apply(json.dumps(document).encode())
    try:
        with pytest.raises(UnavailableError) as caught:
            await running.client.action.run(
                product="shop", env="dev", app="api", event="ping", input={"body": {"item": "i"}}
            )
        assert caught.value.reason == "UPSTREAM_UNREACHABLE"
        assert len(received) == 1, "a POST the upstream may have acted on is not sent again"
    finally:
        server.close()
        await server.wait_closed()


# -- page tokens -----------------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_a_hostile_page_token_is_invalid_argument_on_page_token_in_every_listing(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server()
    client = running.client
    await client.product.apply(product("shop", upstream.url))
    await client.product.apply(product("shop", upstream.url).replace(b'"retry"', b'"timeout": "5s", "retry"'))
    for item in ("a", "b", "c"):
        await client.session.start(product="shop", env="dev", tag="user", data={"userId": item})
        await client.action.run(product="shop", env="dev", app="api", event="ping", input={"body": {"item": item}})
    listings = {
        "versions": lambda token: client.product.list_versions("shop", page_size=1, page_token=token),
        "sessions": lambda token: client.session.list_active(
            product="shop", env="dev", tag="user", page_size=1, page_token=token
        ),
        "executions": lambda token: client.logs.list_executions(product="shop", page_size=1, page_token=token),
    }
    tokens = {name: (await listing("")).next_page_token for name, listing in listings.items()}
    assert all(tokens.values()), tokens
    hostile = {
        "deep JSON": _b64(b"[" * 100_000),
        "deep object": _b64(b'{"a":' * 50_000),
        "huge": "A" * 3_000_000,
        "huge JSON": _b64(json.dumps(["x" * 100_000, 1]).encode()),
        "not base64": "%%%not base64%%%",
        "not ASCII": "jeton-\u00e9",
        "NUL": "\x00",
        "big number": _b64(b'["x",' + b"9" * 5000 + b',"id"]'),
        "infinite time": _b64(b'["x",1e999,"id"]'),
        "not a list": _b64(b'{"a":1}'),
    }
    for name, listing in listings.items():
        others = {f"a {other} token": token for other, token in tokens.items() if other != name}
        for case, token in {**hostile, **others}.items():
            with pytest.raises(InvalidArgumentError) as caught:
                await listing(token)
            assert [v.field for v in caught.value.field_violations] == ["page_token"], (name, case)
        assert (await listing(tokens[name])).ByteSize() > 0, f"{name}: its own token still reads the next page"


# -- found by tests/test_fuzz_rpcs.py --------------------------------------------------------------------------------


async def test_an_optional_path_parameter_left_out_is_invalid_input_not_internal(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server()
    await running.client.product.apply(product("shop", upstream.url))
    for given in ({}, {"params": {}}, {"params": {"id": None}}):
        with pytest.raises(InvalidArgumentError) as caught:
            await running.client.action.run(product="shop", env="dev", app="api", event="get", input=given)
        assert caught.value.reason == "INVALID_INPUT", given
        assert [v.field for v in caught.value.field_violations] == ["input.params.id"]
    assert upstream.seen == [], "nothing was sent"


async def test_bytes_that_do_not_parse_as_the_request_are_invalid_argument_not_unknown(server: Running) -> None:
    deep = b"\x1a\x01x"  # Value.string_value
    for _ in range(150):  # Struct/ListValue nested past protobuf's limit of 100
        deep = b"\x32" + _varint(len(b"\x0a" + _varint(len(deep)) + deep)) + b"\x0a" + _varint(len(deep)) + deep
    body = b"\x0a" + _varint(len(b"\x0a\x01k\x12" + _varint(len(deep)) + deep)) + b"\x0a\x01k\x12" + _varint(len(deep))
    body += deep
    action_input = b"\x1a" + _varint(len(body)) + body
    deep_request = b"\x0a\x04shop\x12\x03dev\x1a\x03api\x22\x03get\x2a" + _varint(len(action_input)) + action_input
    async with server.channel() as channel:
        for path, payload in (
            ("/ductape.processor.v1.ActionService/Run", b"\xff\xff\xff"),
            ("/ductape.processor.v1.ActionService/Run", deep_request),
            ("/ductape.processor.v1.ProductService/Get", b"\x0a\x05sho"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(path)(payload, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, caught.value.details())
            assert "the request cannot be decoded" in (caught.value.details() or "")
        stream = channel.stream_stream("/ductape.processor.v1.BrokerService/Subscribe")(timeout=5)
        await stream.write(b"\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_out_of_range_timestamp_filter_is_invalid_argument(server: Running) -> None:
    async with server.channel() as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        for field in ("start_time", "end_time"):
            request = log_pb2.ListExecutionsRequest(product="shop")
            getattr(request, field).seconds = 2**62
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListExecutions(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert field in (caught.value.details() or "")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
