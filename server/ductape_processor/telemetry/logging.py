"""Structured logs: one JSON object a line, carrying the request id and the trace id of the call being served."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from ductape_processor.telemetry.context import current_call, current_span_context


class CallContextFilter(logging.Filter):
    """Adds `request_id`, `rpc_method`, `trace_id` and `span_id` of the current call to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call.get()
        span = current_span_context()
        if span is not None:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        elif call is not None and (ids := call.trace_ids()) is not None:
            record.trace_id, record.span_id = ids
        if call is not None:
            record.request_id = call.request_id
            record.rpc_method = call.method
        return True


_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _utc_iso(record: logging.LogRecord) -> str:
    seconds = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"


class _JsonFormatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_iso(record)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: the message, then the record's extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_iso(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={value}" for key, value in record.__dict__.items() if key not in _STANDARD_ATTRIBUTES)
        if not extras:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} {extras}{newline}{rest}"


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Send the processor's logs to `stream` (stderr), as JSON lines (`json`) or readable text (`text`)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(CallContextFilter())
    if fmt == "json":
        handler.setFormatter(
            _JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG: those hold tokens and cached answers.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    # The AMQP client logs a traceback at WARNING on every dropped connection; the adapter logs the drop itself.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return handler
