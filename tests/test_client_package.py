"""The Python client as callers get it: a wheel with every generated module, dependency floors the generated code
accepts, and retries on UNAVAILABLE for the calls that are safe to repeat (and only those)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from ductape.processor import Processor, UnavailableError
from ductape.processor.v1 import action_pb2, product_pb2

from tests.conftest import ROOT

CLIENT = ROOT / "clients" / "python"
GENERATED = CLIENT / "ductape" / "processor" / "v1"


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    [spec] = [r for r in requirements if re.match(rf"{re.escape(name)}\b(?![-_])", r)]
    found = re.search(r">=\s*([0-9.]+)", spec)
    assert found, f"{name} has no floor: {spec}"
    return tuple(int(part) for part in found.group(1).split("."))


def test_the_dependency_floors_are_what_the_generated_code_needs() -> None:
    requirements = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    grpc_stub = (GENERATED / "action_pb2_grpc.py").read_text()
    needs_grpc = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_stub)
    assert needs_grpc
    assert _floor(requirements, "grpcio") >= tuple(int(p) for p in needs_grpc.group(1).split("."))
    message_stub = (GENERATED / "action_pb2.py").read_text()
    needs_protobuf = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", message_stub)
    assert needs_protobuf
    assert _floor(requirements, "protobuf") >= tuple(int(p) for p in needs_protobuf.groups())


def test_the_client_builds_as_a_wheel_with_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(CLIENT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("ductape_processor_client-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    expected = {
        str(path.relative_to(CLIENT))
        for path in (CLIENT / "ductape").rglob("*")
        if path.is_file() and (path.suffix in (".py", ".pyi") or path.name == "py.typed")
    }
    assert expected - names == set(), "modules missing from the wheel"
    assert "ductape/processor/v1/job_pb2_grpc.py" in names and "ductape/processor/py.typed" in names
    assert "Requires-Dist: grpcio<2,>=" in metadata and "Requires-Python: >=3.11" in metadata


# -- retries ------------------------------------------------------------------------------------------------------


class FlakyServer:
    """A real gRPC server whose methods fail with UNAVAILABLE `failures` times, then answer; it counts the calls."""

    def __init__(self, failures: int, stall: bool = False) -> None:
        self.failures = failures
        self.stall = stall  # after the failures, never answer
        self.calls: dict[str, int] = {}
        self.server = grpc.aio.server()
        self.port = 0

    def _handler(self, name: str, reply: bytes) -> grpc.RpcMethodHandler:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] <= self.failures:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            if self.stall:
                await asyncio.sleep(3600)
            return reply

        return grpc.unary_unary_rpc_method_handler(handle)

    async def start(self) -> str:
        replies: dict[str, dict[str, Any]] = {
            "ductape.processor.v1.ProductService": {"Get": product_pb2.GetResponse()},
            "ductape.processor.v1.ActionService": {"Run": action_pb2.RunResponse(process_id="p-1")},
        }
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    service, {name: self._handler(name, reply.SerializeToString()) for name, reply in methods.items()}
                )
                for service, methods in replies.items()
            ]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[int], Any]]:
    servers: list[FlakyServer] = []

    async def start(failures: int, stall: bool = False) -> tuple[FlakyServer, str]:
        server = FlakyServer(failures, stall)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.server.stop(None)


async def test_a_read_is_retried_after_unavailable_within_its_timeout(flaky: Callable[[int], Any]) -> None:
    server, address = await flaky(2)
    async with Processor(address, timeout=5) as processor:
        await processor.product.get("shop", env="dev")
    assert server.calls["Get"] == 3, "two UNAVAILABLE answers, then the answer"


async def test_retries_give_up_after_their_count_and_zero_turns_them_off(flaky: Callable[[int], Any]) -> None:
    server, address = await flaky(10)
    async with Processor(address, timeout=5, retries=2) as processor:
        with pytest.raises(UnavailableError):
            await processor.product.get("shop", env="dev")
    assert server.calls["Get"] == 3
    server.calls.clear()
    async with Processor(address, timeout=5, retries=0) as processor:
        with pytest.raises(UnavailableError):
            await processor.product.get("shop", env="dev")
    assert server.calls["Get"] == 1


async def test_only_calls_safe_to_repeat_are_retried(flaky: Callable[[int], Any]) -> None:
    server, address = await flaky(1)
    async with Processor(address, timeout=5) as processor:
        with pytest.raises(UnavailableError):  # no key: the server may have acted, the client must not repeat it
            await processor.action.run(product="shop", env="dev", app="a", event="e", input={})
        assert server.calls["Run"] == 1
        server.calls.clear()
        result = await processor.action.run(
            product="shop", env="dev", app="a", event="e", input={}, idempotency_key="order-7"
        )
    assert result.process_id == "p-1" and server.calls["Run"] == 2, "with an idempotency key it is repeated"


async def test_a_retry_never_outlives_the_calls_timeout(flaky: Callable[[int], Any]) -> None:
    server, address = await flaky(1000)
    async with Processor(address, timeout=0.3, retries=1000) as processor:
        with pytest.raises(UnavailableError):
            await processor.product.get("shop", env="dev")
    assert 1 < server.calls["Get"] < 1000


async def test_a_timeout_that_runs_out_while_retrying_reports_the_unavailable_cause(
    flaky: Callable[..., Any],
) -> None:
    server, address = await flaky(1, stall=True)
    async with Processor(address, timeout=0.5) as processor:
        with pytest.raises(UnavailableError) as caught:  # not DEADLINE_EXCEEDED: the server was unavailable
            await processor.product.get("shop", env="dev")
    assert "restarting" in str(caught.value) and server.calls["Get"] == 2
