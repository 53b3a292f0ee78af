"""One manifest cannot stall or overwhelm the server: size limits, bounded answers, work off the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from ductape.processor import InvalidArgumentError, Processor, ProcessorError
from ductape.processor.v1 import product_pb2, product_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ductape_processor.runtime.registry.loader import INLINE_MAX_BYTES, MAX_MANIFEST_BYTES, MAX_VALUES
from ductape_processor.settings import Settings
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import EXAMPLE, Running, ServerFactory
from tests.test_cli import run

T = TypeVar("T")

_APP = """- tag: app{a}
  envs: {{dev: {{base_url: "http://127.0.0.1:1"}}, prd: {{base_url: "https://api.example"}}}}
  actions:
"""
_ACTION = """  - tag: a{i}
    method: POST
    path: /v1/items/:id/x{i}
    headers: {{X-Trace: "$Input{{headers}}{{trace}}"}}
    body: {{name: "$Input{{body}}{{name}}", n: {i}}}
    input:
      params: {{id: {{type: string, required: true}}}}
      body: {{name: {{type: string, max_length: 100}}}}
"""


def maximal_manifest(limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """A valid YAML manifest just under `limit` bytes: thousands of actions with templates and contracts."""
    parts = ["product: big\nenvironments: [{slug: dev}, {slug: prd}]\napps:\n"]
    size = len(parts[0])
    for i in range(limit):
        block = (_APP.format(a=i // 1000) if i % 1000 == 0 else "") + _ACTION.format(i=i)
        if size + len(block) > limit:
            break
        parts.append(block)
        size += len(block)
    return "".join(parts).encode()


def many_problems(count: int) -> bytes:
    """A JSON manifest with `count` unknown top-level fields: that many problems."""
    keys = ",".join(f'"{i:x}":0' for i in range(count))
    return f'{{"product":"big","environments":[{{"slug":"dev"}}],{keys}}}'.encode()


async def while_busy(server: Running, busy: Awaitable[T]) -> tuple[T | BaseException, list[float]]:
    """Call health Check and ProductService.Get from another connection until `busy` ends; their latencies (ms)."""
    latencies: list[float] = []
    async with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        product = product_pb2_grpc.ProductServiceStub(channel)
        await product.Get(product_pb2.GetRequest(product="shop"), timeout=10)  # connected before the work starts
        work = asyncio.ensure_future(busy)
        while not work.done():
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await product.Get(product_pb2.GetRequest(product="shop"), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        try:
            return work.result(), latencies
        except BaseException as exc:
            return exc, latencies


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99)]


async def test_a_manifest_over_the_size_limit_is_refused_unread(start_server: ServerFactory) -> None:
    assert Settings().manifest_max_bytes == MAX_MANIFEST_BYTES == 1024 * 1024
    server = await start_server(manifest_max_bytes=8192)  # the example manifest, applied below, fits
    unreadable = b"product: [" + b"x" * 9000  # a syntax error, were it parsed
    for call in (server.client.product.apply, server.client.product.validate):
        with pytest.raises(InvalidArgumentError) as caught:
            await call(unreadable)
        error = caught.value
        assert error.reason == "MANIFEST_TOO_LARGE"
        assert error.metadata == {"limit": "bytes", "maximum": "8192"}
        assert [(v.field, v.description) for v in error.field_violations] == [
            ("manifest", "is 9010 bytes, more than the 8192 bytes allowed (PROCESSOR_MANIFEST_MAX_BYTES)")
        ]
    assert (await server.client.product.apply(EXAMPLE)).created


async def test_values_and_depth_limits_hold_in_the_worker_too(server: Running) -> None:
    many = b'{"product": "big", "environments": [{"slug": "dev"}], "constants": [' + b"0," * MAX_VALUES + b"0]}"
    deep = b'{"product": "big", "environments": [{"slug": "dev"}], "constants": ' + b"[" * 65 + b"]" * 65
    deep += b"}" + b" " * INLINE_MAX_BYTES
    for source, limit, maximum in [(many, "values", MAX_VALUES), (deep, "depth", 64)]:
        assert len(source) > INLINE_MAX_BYTES, "large enough to be read by the worker process"
        with pytest.raises(InvalidArgumentError) as caught:
            await server.client.product.validate(source)
        assert caught.value.reason == "MANIFEST_TOO_LARGE"
        assert caught.value.metadata == {"limit": limit, "maximum": str(maximum)}
        assert caught.value.field_violations[0].field == "manifest"


async def test_a_maximal_manifest_does_not_stall_other_calls(server: Running) -> None:
    await server.client.product.apply(EXAMPLE)
    manifest = maximal_manifest()
    assert MAX_MANIFEST_BYTES - 1024 < len(manifest) <= MAX_MANIFEST_BYTES
    applied, latencies = await while_busy(server, server.client.product.apply(manifest))
    assert isinstance(applied, product_pb2.ApplyResponse), applied
    assert applied.created and applied.version.product == "big"
    assert len(latencies) >= 100, f"only {len(latencies)} calls answered while the manifest was applied"
    assert p99(latencies) < 50, f"p99 {p99(latencies):.1f} ms over {len(latencies)} calls"
    got = await server.client.product.get("big", env="prd")
    assert got.manifest == manifest


async def test_a_stored_maximal_manifest_is_read_off_the_loop_after_a_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    first = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    await first.client.product.apply(EXAMPLE)
    manifest = maximal_manifest(256 * 1024)
    await first.client.product.apply(manifest)
    second = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    got, latencies = await while_busy(second, second.client.product.get("big", env="dev"))
    assert isinstance(got, product_pb2.GetResponse), got
    assert got.manifest == manifest and got.version.version == 1
    assert p99(latencies) < 50, f"p99 {p99(latencies):.1f} ms over {len(latencies)} calls"


async def test_calls_needing_a_stored_manifest_at_once_share_one_read(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    first = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    await first.client.product.apply(maximal_manifest(128 * 1024))
    second = await start_server(store=SqliteStore(tmp_path / "shared.db"))
    resolved = await asyncio.gather(*(second.app.components.registry.resolve("big", "dev") for _ in range(8)))
    assert len({id(r.manifest) for r in resolved}) == 1, "each call read the manifest again"


async def test_answers_about_100k_problems_stay_bounded(server: Running) -> None:
    manifest = many_problems(100_000)
    assert len(manifest) <= MAX_MANIFEST_BYTES
    result = await server.client.product.validate(manifest)
    assert not result.valid and result.product == "big"
    assert len(result.problems) == 100 and result.omitted_problems == 100_000 - 100
    assert result.problems[0].path == "0" and "unknown field" in result.problems[0].message
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.product.apply(manifest)
    error = caught.value
    assert error.reason == "INVALID_MANIFEST" and error.metadata == {"problems": "100000"}
    assert 10 < len(error.field_violations) <= 100
    assert error.field_violations[0].field == "0"
    assert str(error).endswith("(and 99999 more problems)")


async def test_long_problems_fit_in_an_error(server: Running) -> None:
    """Paths and reasons quoting long non-ASCII keys and values are clipped, so the error's trailers stay small."""
    key = "ключ" * 500
    document = {"product": "big", "environments": [{"slug": "dev", "name": "имя" * 300}]}
    manifest = json.dumps({**document, **{f"{key}{i}": 0 for i in range(150)}}, ensure_ascii=False).encode()
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.product.apply(manifest)
    error = caught.value
    assert error.reason == "INVALID_MANIFEST" and error.metadata == {"problems": "151"}
    assert error.field_violations, "the details reached the client"
    assert all(len(v.field) <= 300 and len(v.description) <= 300 for v in error.field_violations)
    result = await server.client.product.validate(manifest)
    assert len(result.problems) == 100 and result.omitted_problems == 51
    assert all(len(p.path) <= 300 and len(p.message) <= 300 for p in result.problems)


async def test_a_killed_worker_gives_a_clear_error_then_a_fresh_worker(server: Running) -> None:
    loader = server.app.components.registry._loader
    worker = await loader._in_worker(os.getpid)
    # retries=0: the server's answer itself (the default client retries a Validate after UNAVAILABLE, and a fresh
    # worker answers it)
    once = Processor(server.address, timeout=30, retries=0)
    validating = asyncio.ensure_future(once.product.validate(maximal_manifest()))
    await asyncio.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(ProcessorError) as caught:
        await asyncio.wait_for(validating, 30)
    await once.close()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "MANIFEST_WORKER_FAILED"
    assert "nothing was stored" in str(caught.value)
    assert await loader._in_worker(os.getpid) != worker
    result = await server.client.product.validate(maximal_manifest(64 * 1024))
    assert result.valid and result.product == "big"


async def test_validate_command_applies_the_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(maximal_manifest(8000))
    problems = tmp_path / "problems.json"
    problems.write_bytes(many_problems(300))
    code, out, _ = await run("validate", "--manifest-max-bytes", "4096", str(big), str(problems))
    assert code == 1
    assert f"(document): is {big.stat().st_size} bytes, more than the 4096 bytes allowed" in out, out
    assert out.count("unknown field") == 100 and "… and 200 more problems" in out, out
