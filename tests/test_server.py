"""The server around the services: health, drain, reflection, authentication, TLS, errors, telemetry, logging."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ductape.processor import InternalError, Processor, UnauthenticatedError, UnavailableError
from ductape.processor.v1 import product_pb2, product_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ductape_processor.api.auth import hash_key
from ductape_processor.app import ProcessorApp, StartupError
from ductape_processor.runtime.sessions import new_root_key
from ductape_processor.settings import Settings
from ductape_processor.store.base import VersionRecord
from ductape_processor.store.sqlite import SqliteStore
from ductape_processor.telemetry.logging import configure_logging
from ductape_processor.telemetry.setup import setup_telemetry
from tests.conftest import EXAMPLE, Running, ServerFactory
from tests.pki import make_pki


async def health_status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return response.status


async def test_health_is_serving_for_the_server_and_each_service(server: Running) -> None:
    assert await health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert (
        await health_status(server.address, "ductape.processor.v1.ProductService")
        == health_pb2.HealthCheckResponse.SERVING
    )


async def list_services(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """The services reflection lists, asked through gRPC's synchronous client (in a thread).

    Not grpc.aio's: when a server ends a client-streaming call before reading its request (as an unauthenticated
    one is), a grpc.aio client whose request write then fails reports INTERNAL "Internal error from Core" instead of
    the server's status, now and then under load (grpc/grpc#36066, open); the synchronous client reports the
    server's status."""

    def ask() -> list[str]:
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=5
            )
            for response in responses:
                return sorted(s.name for s in response.list_services_response.service)
        return []

    return await asyncio.to_thread(ask)


async def test_reflection_lists_the_services(server: Running) -> None:
    assert await list_services(server.address) == [
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


class SlowStore(SqliteStore):
    """A real SQLite store whose applies take a while, to have a call in flight."""

    delay = 0.5

    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        await asyncio.sleep(self.delay)
        return await super().apply_version(product, checksum, fmt, source, document)


async def test_shutdown_reports_not_serving_then_lets_calls_in_flight_finish(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    running = await start_server(store=SlowStore(tmp_path / "slow.db"))
    async with grpc.aio.insecure_channel(running.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        applying = asyncio.ensure_future(running.client.product.apply(EXAMPLE))
        await asyncio.sleep(0.1)  # the apply is now in flight, inside the slow store
        stopping = asyncio.ensure_future(running.app.stop(grace=5))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        applied = await applying
        assert applied.created and applied.version.version == 1, "the call in flight finished"
        await stopping
    with pytest.raises(UnavailableError):
        await running.client.product.get("shop", version=1)
    reopened = SqliteStore(tmp_path / "slow.db")
    await reopened.open()
    assert (await reopened.latest_version("shop")) is not None, "what the drained call stored is kept"
    await reopened.close()


async def test_api_keys_are_required_except_for_health(start_server: ServerFactory) -> None:
    running = await start_server(api_key_hashes=[hash_key("s3cret-key")], api_key="s3cret-key")
    assert (await running.client.product.apply(EXAMPLE)).version.version == 1
    assert await health_status(running.address) == health_pb2.HealthCheckResponse.SERVING
    async with Processor(running.address) as anonymous:
        with pytest.raises(UnauthenticatedError) as caught:
            await anonymous.product.get("shop")
        assert caught.value.reason == "API_KEY_MISSING"
    async with Processor(running.address, api_key="wrong-key") as wrong:
        with pytest.raises(UnauthenticatedError) as caught:
            await wrong.product.get("shop")
        assert caught.value.reason == "API_KEY_INVALID"
    with pytest.raises(grpc.RpcError) as raw:
        await list_services(running.address)
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await list_services(running.address, (("authorization", "Bearer s3cret-key"),))


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.10:50051"])
async def test_an_exposed_bind_without_tls_and_auth_is_refused(address: str, tmp_path: Path) -> None:
    app = ProcessorApp(Settings(address=address, data_dir=tmp_path))
    with pytest.raises(StartupError, match="not a loopback address and TLS is off") as caught:
        await app.start()
    assert "--insecure" in str(caught.value)
    assert "no client authentication" in str(caught.value)


def test_exposure_rules() -> None:
    assert Settings(address="127.0.0.1:1").exposure_problems() == []
    assert Settings(address="localhost:1").exposure_problems() == []
    assert Settings(address="[::1]:1").exposure_problems() == []
    keys = {"session_keys": [new_root_key("k1")]}
    assert Settings(address="0.0.0.0:1", insecure=True, **keys).exposure_problems() == []
    with_tls = {"tls_cert": Path("c.pem"), "tls_key": Path("k.pem"), **keys}
    problems = Settings(address="0.0.0.0:1", **with_tls).exposure_problems()
    assert len(problems) == 1 and "no client authentication" in problems[0]
    assert Settings(address="0.0.0.0:1", api_key_hashes=[hash_key("k")], **with_tls).exposure_problems() == []
    assert Settings(address="0.0.0.0:1", tls_client_ca=Path("ca.pem"), **with_tls).exposure_problems() == []
    assert "together" in Settings(tls_cert=Path("c.pem")).exposure_problems()[0]


@pytest.mark.parametrize("listener", ["webhook_http_address", "storage_http_address"])
def test_a_plain_http_listener_is_kept_on_loopback_unless_insecure(listener: str) -> None:
    """docs/deployment.md's security rules 4 and 5: also on a gRPC port that has TLS and keys."""
    exposed = {
        "address": "0.0.0.0:1",
        "session_keys": [new_root_key("k1")],
        "tls_cert": Path("c.pem"),
        "tls_key": Path("k.pem"),
        "api_key_hashes": [hash_key("k")],
    }
    assert Settings(**exposed, **{listener: "127.0.0.1:8090"}).exposure_problems() == []
    [problem] = Settings(**exposed, **{listener: "0.0.0.0:8090"}).exposure_problems()
    assert problem.startswith(f"{listener} 0.0.0.0:8090 is not a loopback address") and "--insecure" in problem
    assert Settings(**exposed, insecure=True, **{listener: "0.0.0.0:8090"}).exposure_problems() == []


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


async def test_tls_with_client_certificates(start_server: ServerFactory, pki: dict[str, Path]) -> None:
    running = await start_server(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    await running.client.close()
    address = f"localhost:{running.port}"
    ca = pki["ca"].read_bytes()
    async with Processor(
        address,
        root_certificates=ca,
        certificate_chain=pki["client_cert"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
    ) as with_cert:
        assert (await with_cert.product.apply(EXAMPLE)).version.version == 1
    async with Processor(address, root_certificates=ca, timeout=3) as without_cert:
        with pytest.raises(UnavailableError):
            await without_cert.product.get("shop")
    async with Processor(address, timeout=3) as plaintext:
        with pytest.raises(UnavailableError):
            await plaintext.product.get("shop")


class BrokenStore(SqliteStore):
    """A real store whose reads fail with a message that must never reach a caller."""

    async def latest_version(self, product: str) -> VersionRecord | None:
        raise RuntimeError("connection to db.internal:5432 failed, password=hunter2")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", stream)
    yield stream
    logging.getLogger().removeHandler(handler)


async def test_unexpected_errors_are_internal_with_a_correlation_id_only(
    start_server: ServerFactory, tmp_path: Path, json_logs: io.StringIO
) -> None:
    running = await start_server(store=BrokenStore(tmp_path / "broken.db"))
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = product_pb2_grpc.ProductServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.Get(
                product_pb2.GetRequest(product="shop"),
                metadata=(("traceparent", traceparent), ("x-request-id", "req-42")),
            )
    assert raw.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in str(raw.value.details()) and "Traceback" not in str(raw.value.details())
    assert "req-42" in str(raw.value.details())
    with pytest.raises(InternalError) as caught:
        await running.client.product.get("shop")
    assert caught.value.reason == "INTERNAL"
    assert caught.value.metadata["correlation_id"] == caught.value.request_id
    assert "hunter2" not in str(caught.value)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.startswith("{")]
    logged = [line for line in lines if line.get("request_id") == "req-42"]
    assert logged, lines
    assert logged[0]["level"] == "ERROR" and "req-42" in logged[0]["message"]
    assert logged[0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert logged[0]["rpc_method"] == "/ductape.processor.v1.ProductService/Get"
    assert "Traceback" in logged[0]["exc_info"], "the server log keeps the traceback"


async def test_each_rpc_is_traced_and_measured(start_server: ServerFactory) -> None:
    spans = InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    running = await start_server(telemetry=setup_telemetry(span_exporter=spans, metric_readers=[metrics]))
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = product_pb2_grpc.ProductServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Get(product_pb2.GetRequest(product="nope"), metadata=(("traceparent", traceparent),))
    # The server ends its span after the answer is on the wire: the client may see the error first.
    for _ in range(250):
        finished = [s for s in spans.get_finished_spans() if s.name == "ductape.processor.v1.ProductService/Get"]
        if finished:
            break
        await asyncio.sleep(0.02)
    [span] = finished
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes is not None
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == "ductape.processor.v1.ProductService"
    assert span.attributes["rpc.method"] == "Get"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]

    def measured() -> bool:
        data = metrics.get_metrics_data()
        points = [
            point
            for resource in (data.resource_metrics if data is not None else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "rpc.server.duration"
            for point in metric.data.data_points
        ]
        return any(p.attributes is not None and p.attributes["rpc.method"] == "Get" and p.count == 1 for p in points)

    for _ in range(250):  # recorded just after the span ends
        if measured():
            break
        await asyncio.sleep(0.02)
    assert measured()


async def test_invalid_startup_manifest_refuses_to_start_with_its_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("product: shop\nenvironments: [{slug: dev}]\ncaches: [{tag: c, ttl: forever}]\n")
    app = ProcessorApp(Settings(address="127.0.0.1:0", data_dir=tmp_path, manifests=[bad]))
    with pytest.raises(StartupError, match=r"caches\[0\]\.ttl: 'forever' is not a duration"):
        await app.start()


async def test_startup_manifests_from_a_folder_are_served(start_server: ServerFactory) -> None:
    running = await start_server(manifests=[EXAMPLE.parent])
    got = await running.client.product.get("shop", env="dev")
    assert got.version.version == 1


def test_settings_read_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSOR_ADDRESS", "127.0.0.1:6000")
    monkeypatch.setenv("PROCESSOR_MANIFESTS", "a.yaml, b/")
    monkeypatch.setenv("PROCESSOR_API_KEY_HASHES", hash_key("x").upper())
    settings = Settings()
    assert settings.address == "127.0.0.1:6000"
    assert settings.manifests == [Path("a.yaml"), Path("b/")]
    assert settings.api_key_hashes == [hash_key("x")]
    monkeypatch.setenv("PROCESSOR_API_KEY_HASHES", "not-a-hash")
    with pytest.raises(ValueError, match="64 hex digits"):
        Settings()


def test_text_logs_show_the_extra_fields() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", "text", stream)
    try:
        logging.getLogger("ductape_processor.test").info("serving", extra={"port": 50051, "store": "sqlite"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("ductape_processor.test: serving port=50051 store=sqlite")


async def test_an_unreachable_store_is_a_clear_startup_error(tmp_path: Path) -> None:
    settings = Settings(address="127.0.0.1:0", data_dir=tmp_path, store="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StartupError, match="cannot open the postgresql store"):
        await ProcessorApp(settings).start()
    with pytest.raises(ValueError, match="store must be"):
        Settings(store="mysql://x")
