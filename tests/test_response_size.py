"""A unary answer larger than the server may send is RESOURCE_EXHAUSTED `RESPONSE_TOO_LARGE`, said as such.

Before, gRPC refused it after the handler returned: the caller got RESOURCE_EXHAUSTED "Sent message larger than
max" with no reason, no limit and no way to find the call, though an action had run (an upstream may answer up to
`max_upstream_response_bytes`, 8 MiB by default, where a response may be 4 MiB)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web
from ductape.processor.errors import ProcessorError

from tests.conftest import Running
from tests.test_actions import run, running  # noqa: F401 - the fixture: a processor serving `shop` on the upstream
from tests.upstream import Upstream

# About 6 MB of JSON: more than the 4 MiB a response may be, less than the 8 MiB an upstream answer may be.
BIG = {"items": ["x" * 1000 for _ in range(6000)]}


async def test_an_action_answer_larger_than_a_response_may_be_is_response_too_large_with_its_process_id(
    running: Running,  # noqa: F811
    upstream: Upstream,
) -> None:
    async def big(_: web.Request) -> web.Response:
        return web.json_response(BIG)

    upstream.on("GET /users/7", big)
    with pytest.raises(ProcessorError) as raised:
        await run(running, "user", input={"params": {"id": "7"}})
    error = raised.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "RESPONSE_TOO_LARGE"
    assert error.metadata["limit"] == str(4 * 1024 * 1024) and int(error.metadata["size"]) > 6_000_000
    assert "PROCESSOR_MAX_MESSAGE_BYTES" in error.message
    # The action ran once, and its record is found by the process id the error names.
    assert len(upstream.hits("/users/7")) == 1
    process_id = error.metadata["process_id"]
    listed = await running.client.logs.list_executions(product="shop", resource="api:user")
    assert [record.process_id for record in listed.executions] == [process_id]

    # An answer within the limit still arrives whole (the same call, the answer smaller).
    small = {"items": BIG["items"][:100]}

    async def fits(_: web.Request) -> web.Response:
        return web.json_response(small)

    upstream.on("GET /users/8", fits)
    result = await run(running, "user", input={"params": {"id": "8"}})
    assert result.body == small


async def test_a_streamed_response_larger_than_a_response_may_be_ends_its_stream_with_response_too_large() -> None:
    """The same limit for each response a stream yields (the services' own streams split what they send: this is
    the net under them), through the interceptor as the server wires it."""
    from ductape.processor.errors import from_rpc_error

    from ductape_processor.api.auth import ApiKeyAuthenticator
    from ductape_processor.api.interceptor import ProcessorInterceptor
    from ductape_processor.telemetry.setup import Telemetry

    limit = 64 * 1024

    async def responses(request: bytes, context: object) -> AsyncIterator[bytes]:
        yield b"x" * 10
        yield b"y" * (limit + 1)
        yield b"never sent"

    def identity(value: bytes) -> bytes:
        return value

    handler = grpc.unary_stream_rpc_method_handler(
        responses, request_deserializer=identity, response_serializer=identity
    )
    interceptor = ProcessorInterceptor(ApiKeyAuthenticator(()), Telemetry(), limit)
    interceptor.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Big", {"Stream": handler})])
    server = grpc.aio.server(options=[("grpc.max_send_message_length", limit)])
    server.add_generic_rpc_handlers((interceptor,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/test.Big/Stream")(b"")
            assert await call.read() == b"x" * 10
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
        error = from_rpc_error(raised.value)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "RESPONSE_TOO_LARGE"
        assert error.metadata["size"] == str(limit + 1) and error.metadata["limit"] == str(limit)
    finally:
        await server.stop(0)
