"""Per-call values that travel in a contextvar: the request id and the caller's trace context.

The OpenTelemetry API is imported when something needs it, not with the server: a processor that exports no spans
never starts one, and only a call that brings a `traceparent` needs the propagator (the API is about 0.5 MB idle).
"""

from __future__ import annotations

import contextvars
import functools
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


@functools.cache
def w3c_propagator() -> TraceContextTextMapPropagator:
    """The W3C trace-context propagator (stateless: it only parses and formats the headers), imported on first use."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def current_span_context() -> SpanContext | None:
    """The context of the current OpenTelemetry span, if one is current.

    Until a module imported `opentelemetry.trace` (setup_telemetry does when spans are exported), no span can have
    been started, so none is current: the API is not imported to find that out.
    """
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace

    span = trace.get_current_span().get_span_context()
    return span if span.is_valid else None


class CallInfo:
    """What is known of the call being served: its method, its request id and its W3C `traceparent`/`tracestate`.

    A plain slotted class rather than a dataclass: one is built per call, so construction cost counts.
    """

    __slots__ = ("method", "request_id", "traced", "traceparent", "tracestate")

    def __init__(
        self, method: str, request_id: str, traceparent: str | None = None, tracestate: str | None = None
    ) -> None:
        self.method = method
        self.request_id = request_id
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.traced = False  # the interceptor started a span for the call (tracing is on)

    def trace_ids(self) -> tuple[str, str] | None:
        """(trace id, parent span id) from the caller's traceparent, when it sent a well-formed one."""
        if self.traceparent is None:
            return None
        parts = self.traceparent.split("-")
        if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
            return None
        return parts[1], parts[2]


def outgoing_trace_context() -> dict[str, str]:
    """W3C `traceparent` (and `tracestate`) for what the current call sends on: an upstream request, a message.

    With tracing on, the processor's span for the call is the parent (so a message published by a caller without
    trace context still carries one). With tracing off, the caller's context passes through, but only when the
    propagator accepts it: a malformed value is never forwarded.
    """
    call = current_call.get()
    if call is not None and not call.traced and not call.traceparent:
        return {}  # tracing off and no caller context: nothing to look up
    carrier: dict[str, str] = {}
    if current_span_context() is not None:
        w3c_propagator().inject(carrier)
        return carrier
    if call is not None and call.traceparent:
        given = {"traceparent": call.traceparent}
        if call.tracestate:
            given["tracestate"] = call.tracestate
        propagator = w3c_propagator()
        propagator.inject(carrier, context=propagator.extract(given))
    return carrier


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("current_call", default=None)
