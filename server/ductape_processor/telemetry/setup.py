"""OpenTelemetry providers for the processor.

Tracing and RPC metrics are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces/metrics specific
variables) is set. Otherwise no provider is built and the interceptor skips spans and metrics entirely, so the
cost per call is a dictionary lookup. Tests inject their own exporter. No global provider is installed: the
composition root passes this object to whoever needs it.

The last export at shutdown is bounded (TELEMETRY_FLUSH_TIMEOUT_S): the SDK's own shutdown waits up to 30 s per
provider and the OTLP exporter retries for up to its timeout, so a down or silent collector would otherwise hold a
stopping processor past its orchestrator's grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from ductape_processor import __version__

if TYPE_CHECKING:  # the API and SDK are imported when telemetry is on (setup_telemetry), not by one that exports none
    from opentelemetry.metrics import Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

TELEMETRY_FLUSH_TIMEOUT_S: Final = 5.0
"""Longest the final export of spans and metrics may take when the processor stops; what is unsent then is dropped."""

_CANCEL_WAIT_S: Final = 0.5
"""How long to wait for the exporters' threads after their channels were closed at the flush deadline."""


class _Exporter(Protocol):
    def shutdown(self) -> None: ...


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
    job_lateness: Histogram | None = None
    """How late each job run started (start - due, ms), by target kind (runtime/jobs/)."""
    _tracer_provider: TracerProvider | None = None
    _meter_provider: MeterProvider | None = None
    _exporters: list[_Exporter] = field(default_factory=list)
    _closed: bool = field(default=False)

    @property
    def enabled(self) -> bool:
        """True when spans or metrics are recorded."""
        return self.tracer is not None or self.rpc_duration is not None

    async def shutdown(self, timeout_s: float = TELEMETRY_FLUSH_TIMEOUT_S) -> bool:
        """Export what is pending and stop, within `timeout_s`; False when something had to be dropped. Idempotent.

        The SDK calls block, so they run on their own daemon threads (one per provider, so a stuck trace export
        does not eat the metrics' time), never on the event loop nor in its executor, which the interpreter would
        wait for at exit. At the deadline the exporters are shut down, which closes their channels and ends an
        export in flight.
        """
        if self._closed:
            return True
        self._closed = True
        steps: list[Callable[[], object]] = []
        if self._tracer_provider is not None:
            steps.append(self._tracer_provider.shutdown)
        if self._meter_provider is not None:
            meter_provider = self._meter_provider
            steps.append(lambda: meter_provider.shutdown(timeout_millis=timeout_s * 1000))
        if not steps:
            return True
        loop = asyncio.get_running_loop()
        pending = [_run_in_daemon_thread(loop, step) for step in steps]
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        if not late:
            return True
        for exporter in self._exporters:
            exporter.shutdown()
        await asyncio.wait(late, timeout=_CANCEL_WAIT_S)
        log.warning(
            "telemetry not exported within %.1fs of stopping: the rest is dropped (is the OTLP collector reachable?)",
            timeout_s,
        )
        return False


def _run_in_daemon_thread(loop: asyncio.AbstractEventLoop, step: Callable[[], object]) -> asyncio.Future[None]:
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            step()
        except Exception as exc:  # an SDK failure must not stop the rest of the shutdown
            log.warning("telemetry shutdown failed: %s", exc)
        finally:
            loop.call_soon_threadsafe(finish)

    threading.Thread(target=run, name="telemetry-shutdown", daemon=True).start()
    return done


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
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.version": __version__})
    # The SDK's default name is "unknown_service…"; OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES may set one.
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "ductape-processor"}))
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = list(metric_readers)
    exporters: list[_Exporter] = []
    if use_otlp:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if _exports("TRACES"):
            span_otlp = OTLPSpanExporter()
            exporters.append(span_otlp)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_otlp))
        if _exports("METRICS"):
            metric_otlp = OTLPMetricExporter()
            exporters.append(metric_otlp)
            readers.append(PeriodicExportingMetricReader(metric_otlp))
    elif span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = meter_provider.get_meter("ductape_processor", __version__)
    histogram = meter.create_histogram(
        "rpc.server.duration", unit="ms", description="Duration of inbound RPCs, by method and status code."
    )
    lateness = meter.create_histogram(
        "ductape.job.lateness", unit="ms", description="How late job runs started (start - due), by target kind."
    )
    return Telemetry(
        tracer=tracer_provider.get_tracer("ductape_processor", __version__),
        rpc_duration=histogram,
        job_lateness=lateness,
        _tracer_provider=tracer_provider,
        _meter_provider=meter_provider,
        _exporters=exporters,
    )
