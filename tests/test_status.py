"""Error statuses on the wire: built by grpcio-status, retry hints in google.rpc.RetryInfo."""

from __future__ import annotations

import grpc
import pytest
from ductape.processor import InvalidArgumentError, NotFoundError, UnavailableError
from ductape.processor.v1 import action_pb2, action_pb2_grpc, job_pb2, job_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import Running, ServerFactory
from tests.test_actions import shop
from tests.upstream import Upstream, json_answer


@pytest.fixture
async def open_circuit(upstream: Upstream, start_server: ServerFactory) -> Running:
    """A processor whose `api` app (circuit: 3 failures, 300 ms cooldown) has just failed three times."""
    running = await start_server()
    await running.client.product.apply(shop(upstream.url))
    upstream.on("GET /users/1", lambda r: json_answer({}, status=500))
    for _ in range(3):
        await running.client.action.run(
            product="shop", env="dev", app="api", event="user", input={"params": {"id": "1"}}, retries=0
        )
    return running


async def test_an_open_circuit_sends_its_retry_delay_as_retry_info(open_circuit: Running) -> None:
    async with grpc.aio.insecure_channel(open_circuit.address) as channel:
        call = action_pb2_grpc.ActionServiceStub(channel).Run(
            action_pb2.RunRequest(
                product="shop",
                env="dev",
                app="api",
                event="user",
                input=action_pb2.ActionInput(params={"id": "1"}),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        status = await rpc_status.aio.from_call(call)
    assert status is not None, "the call carries a google.rpc.Status"
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    retry_infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry_infos) == 1
    retry = error_details_pb2.RetryInfo()
    retry_infos[0].Unpack(retry)
    assert 0 < retry.retry_delay.ToNanoseconds() <= 300_000_000
    [error_info] = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    error_info.Unpack(info)
    assert info.reason == "CIRCUIT_OPEN"
    assert "retry_in_s" not in info.metadata, "the hint is in RetryInfo, not in custom metadata"


async def test_the_python_client_reads_the_retry_delay(open_circuit: Running) -> None:
    with pytest.raises(UnavailableError) as caught:
        await open_circuit.client.action.run(
            product="shop", env="dev", app="api", event="user", input={"params": {"id": "1"}}
        )
    assert caught.value.reason == "CIRCUIT_OPEN"
    assert caught.value.retry_after_s is not None and 0 < caught.value.retry_after_s <= 0.3


async def test_an_error_without_a_retry_hint_has_none(server: Running) -> None:
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.get("nope")
    assert caught.value.reason == "PRODUCT_NOT_FOUND" and caught.value.retry_after_s is None


async def test_an_error_quoting_a_huge_value_still_reaches_the_caller_with_its_reason(server: Running) -> None:
    """Found by tests/test_fuzz_rpcs.py: `no job 'xxx…'` quoted a 300 KB id, the trailers outgrew what gRPC clients
    accept, and the caller got a RESOURCE_EXHAUSTED of its own client instead of the error."""
    await server.client.product.apply(b"product: shop\nenvironments: [{slug: dev}]\n")
    huge = "x\u00e9" * 150_000
    async with server.channel() as channel:
        call = job_pb2_grpc.JobServiceStub(channel).Get(
            job_pb2.JobServiceGetRequest(job=job_pb2.JobRef(product="shop", env="dev", job_id=huge))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        status = await rpc_status.aio.from_call(call)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert status is not None
    [detail] = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    assert info.reason == "JOB_NOT_FOUND"
    assert len(status.message.encode()) <= 400 and status.message.endswith("…")
    assert all(len(value.encode()) <= 200 for value in info.metadata.values())
    assert info.metadata["job"].startswith("x\u00e9x\u00e9"), "the value is clipped, not dropped"


async def test_a_request_with_thousands_of_bad_fields_lists_those_that_fit(server: Running, upstream: Upstream) -> None:
    await server.client.product.apply(shop(upstream.url))
    headers = {f"Bad Header {i:05d} " + "y" * 40: "z" for i in range(5000)}
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.action.run(
            product="shop", env="dev", app="api", event="user", input={"params": {"id": "1"}, "headers": headers}
        )
    assert caught.value.reason == "INVALID_INPUT"
    listed = [v.field for v in caught.value.field_violations]
    assert 10 <= len(listed) < 100 and all(f.startswith('input.headers["Bad Header ') for f in listed), listed[:2]
    assert upstream.seen == [], "nothing was sent"
