"""Server reflection answers tools that speak only `grpc.reflection.v1` as well as `v1alpha` ones."""

from __future__ import annotations

import asyncio
import json

from ductape_processor.api.auth import hash_key
from tests.conftest import ROOT, Running, ServerFactory

BUF = ROOT / ".venv" / "bin" / "buf"
SERVICES = [
    "ductape.processor.v1.ActionService",
    "ductape.processor.v1.BrokerService",
    "ductape.processor.v1.DatabaseService",
    "ductape.processor.v1.FeatureService",
    "ductape.processor.v1.JobService",
    "ductape.processor.v1.LogService",
    "ductape.processor.v1.MigrationService",
    "ductape.processor.v1.NotificationService",
    "ductape.processor.v1.ProductService",
    "ductape.processor.v1.SessionService",
    "ductape.processor.v1.StorageService",
    "ductape.processor.v1.WebhookService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]


async def buf_curl(running: Running, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BUF),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_v1_only_client_lists_the_services(server: Running) -> None:
    code, out, err = await buf_curl(
        server, "--reflect-protocol", "grpc-v1", "--list-services", f"http://{server.address}"
    )
    assert code == 0, err
    assert sorted(out.split()) == SERVICES


async def test_a_v1_only_client_calls_a_method_it_learnt_by_reflection(server: Running) -> None:
    code, out, err = await buf_curl(
        server,
        "--reflect-protocol",
        "grpc-v1",
        "-d",
        '{"product": "nope"}',
        f"http://{server.address}/ductape.processor.v1.ProductService/ListVersions",
    )
    assert code != 0
    assert "not_found" in err.lower() and "nope" in err, err
    code, out, err = await buf_curl(
        server, "--reflect-protocol", "grpc-v1", "-d", "{}", f"http://{server.address}/grpc.health.v1.Health/Check"
    )
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_a_v1_client_can_describe_the_v1_reflection_service_itself(server: Running) -> None:
    code, out, err = await buf_curl(
        server, "--reflect-protocol", "grpc-v1", "--list-methods", f"http://{server.address}"
    )
    assert code == 0, err
    assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in out.split()


async def test_v1_reflection_needs_the_api_key_like_every_other_service(start_server: ServerFactory) -> None:
    running = await start_server(api_key_hashes=[hash_key("k")])
    code, _, err = await buf_curl(
        running, "--reflect-protocol", "grpc-v1", "--list-services", f"http://{running.address}"
    )
    assert code != 0 and "not authenticated" in err.lower(), err  # buf's wording for UNAUTHENTICATED
    code, out, err = await buf_curl(
        running,
        "--reflect-protocol",
        "grpc-v1",
        "--reflect-header",
        "authorization: Bearer k",
        "--list-services",
        f"http://{running.address}",
    )
    assert code == 0, err
    assert "grpc.reflection.v1.ServerReflection" in out.split()
