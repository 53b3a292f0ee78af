"""OpenTelemetry providers for the processor.

Tracing and RPC metrics are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces/metrics specific
variables) is set. Otherwise no provider is built and the interceptor skips spans and metrics entirely, so the
cost per call is a dictionary lookup. Tests inject their own exporter. No global provider is installed: the
composition root passes this object to whoever needs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Tracer

from ductape_processor import __version__

_OTLP_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def _exports(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


@dataclass(slots=True)
class Telemetry:
    """The tracer and RPC duration histogram the interceptor uses; both None when telemetry is off."""

    tracer: Tracer | None = None
    rpc_duration: Histogram | None = None
    _tracer_provider: TracerProvider | None = None
    _meter_provider: MeterProvider | None = None
    _closed: bool = field(default=False)

    @property
    def enabled(self) -> bool:
        """True when spans or metrics are recorded."""
        return self.tracer is not None or self.rpc_duration is not None

    def shutdown(self) -> None:
        """Flush and stop exporters. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()


def otlp_configured() -> bool:
    """True when the standard OTLP endpoint variables ask for export."""
    return any(os.environ.get(name) for name in _OTLP_VARIABLES)


def setup_telemetry(
    *,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Build providers: from the injected exporter/readers, else OTLP when configured, else nothing."""
    use_otlp = span_exporter is None and not metric_readers and otlp_configured()
    if span_exporter is None and not metric_readers and not use_otlp:
        return Telemetry()
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "ductape-processor"
    resource = Resource.create(attributes)
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = list(metric_readers)
    if use_otlp:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if _exports("TRACES"):
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if _exports("METRICS"):
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    elif span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = meter_provider.get_meter("ductape_processor", __version__)
    histogram = meter.create_histogram(
        "rpc.server.duration", unit="ms", description="Duration of inbound RPCs, by method and status code."
    )
    return Telemetry(
        tracer=tracer_provider.get_tracer("ductape_processor", __version__),
        rpc_duration=histogram,
        _tracer_provider=tracer_provider,
        _meter_provider=meter_provider,
    )
