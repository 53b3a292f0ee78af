"""Per-call values that travel in a contextvar: the request id and the caller's trace context."""

from __future__ import annotations

import contextvars


class CallInfo:
    """What is known of the call being served: its method, its request id and its W3C `traceparent`.

    A plain slotted class rather than a dataclass: one is built per call, so construction cost counts.
    """

    __slots__ = ("method", "request_id", "traceparent")

    def __init__(self, method: str, request_id: str, traceparent: str | None = None) -> None:
        self.method = method
        self.request_id = request_id
        self.traceparent = traceparent

    def trace_ids(self) -> tuple[str, str] | None:
        """(trace id, parent span id) from the caller's traceparent, when it sent a well-formed one."""
        if self.traceparent is None:
            return None
        parts = self.traceparent.split("-")
        if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
            return None
        return parts[1], parts[2]


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("current_call", default=None)
