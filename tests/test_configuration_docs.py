"""What docs/configuration.md says about telemetry and logs, checked against a real OTLP receiver and real log lines."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ductape_processor.telemetry.logging import configure_logging
from ductape_processor.telemetry.setup import setup_telemetry
from tests.conftest import EXAMPLE, ROOT, ServerFactory

CONFIGURATION = ROOT / "docs" / "configuration.md"


@dataclass
class Receiver:
    """An OTLP/gRPC collector on loopback that keeps what it is sent."""

    endpoint: str = ""
    spans: list[Any] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    @property
    def span_names(self) -> set[str]:
        return {span.name for span in self.spans}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received = Receiver()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    received.spans += scope.spans
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    received.metrics += [metric.name for metric in scope.metrics]
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    received.endpoint = f"http://127.0.0.1:{port}"
    yield received
    await server.stop(0)


OTLP_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


@pytest.mark.parametrize(
    ("variable", "traces", "metrics"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", True, True),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", True, False),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", False, True),
    ],
)
async def test_an_endpoint_variable_exports_the_signals_the_docs_say(
    variable: str,
    traces: bool,
    metrics: bool,
    receiver: Receiver,
    start_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in OTLP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, receiver.endpoint)
    running = await start_server(telemetry=setup_telemetry(), manifests=[EXAMPLE])
    await running.client.product.get("shop")
    await running.client.close()
    await running.app.stop(grace=0)  # the final flush sends what is pending, within its bound
    assert ("ductape.processor.v1.ProductService/Get" in receiver.span_names) is traces
    assert ("rpc.server.duration" in receiver.metrics) is metrics
    documented = CONFIGURATION.read_text()
    assert "Setting only one of them (and not `OTEL_EXPORTER_OTLP_ENDPOINT`) exports only that signal" in documented


def _service_name(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(span_exporter=spans)
    assert telemetry.tracer is not None
    telemetry.tracer.start_span("probe").end()
    [span] = spans.get_finished_spans()
    return str(span.resource.attributes["service.name"])


def test_service_name_follows_otel_service_name_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _service_name(monkeypatch) == "ductape-processor"
    assert _service_name(monkeypatch, OTEL_SERVICE_NAME="shop-processor") == "shop-processor"
    assert _service_name(monkeypatch, OTEL_RESOURCE_ATTRIBUTES="service.name=from-attributes") == "from-attributes"
    documented = CONFIGURATION.read_text()
    assert "| `OTEL_SERVICE_NAME` | The resource's `service.name` (default `ductape-processor`). |" in documented
    assert "`OTEL_SERVICE_NAME` (`service.name` is always" not in documented


def _shape(text: str) -> str:
    return re.sub(r"\d", "9", text)


def test_log_times_look_like_the_documented_examples() -> None:
    documented = CONFIGURATION.read_text()
    json_example = json.loads(re.search(r"```json\n(.*?)\n```", documented, flags=re.S).group(1))  # type: ignore[union-attr]
    text_example = re.search(r"```text\n(.*?)\n```", documented, flags=re.S).group(1)  # type: ignore[union-attr]
    lines: dict[str, str] = {}
    for fmt in ("json", "text"):
        stream = io.StringIO()
        handler = configure_logging("INFO", fmt, stream)
        try:
            logging.getLogger("ductape_processor.app").info("manifest applied")
        finally:
            logging.getLogger().removeHandler(handler)
        lines[fmt] = stream.getvalue().strip()
    produced_time = json.loads(lines["json"])["time"]
    assert _shape(produced_time) == _shape(json_example["time"]) == "9999-99-99T99:99:99.999Z"
    assert _shape(lines["text"].split(" ")[0]) == _shape(text_example.split(" ")[0]) == "9999-99-99T99:99:99.999Z"
    assert "`YYYY-MM-DDTHH:MM:SS.mmmZ`" in documented
