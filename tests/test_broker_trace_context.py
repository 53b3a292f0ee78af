"""W3C trace context on published messages, on every broker type: the processor's Publish span is the message's
parent when tracing is on (with or without the caller's context), a malformed traceparent is never delivered, and
`tracestate` travels with it. The same propagation as the HTTP path (telemetry.context.outgoing_trace_context).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc
import pytest
from ductape.processor.brokers import Message, outgoing
from ductape.processor.v1 import broker_pb2, broker_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ductape_processor.telemetry.setup import setup_telemetry
from tests.conftest import Running, ServerFactory, require_tcp
from tests.test_brokers import (
    KINDS,
    SERVERS,
    _forget_pending_reads,  # noqa: F401 - the autouse fixture that ends reads left pending by `take`
    _forget_run,
    manifest,
    opened,
    take,
)

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CALLER_STATE = "vendor=opaque,other=1"


async def _server(kind: str, start_server: ServerFactory, spans: InMemorySpanExporter | None) -> Running:
    if kind != "memory":
        name, host, port, _ = SERVERS[kind]
        await require_tcp(name, host, port)
    telemetry = setup_telemetry(span_exporter=spans) if spans is not None else None
    running = await start_server(telemetry=telemetry)
    running.kind = kind  # type: ignore[attr-defined]
    running.run = secrets.token_hex(4)  # type: ignore[attr-defined]
    await running.client.product.apply(manifest(kind, running.run))  # type: ignore[attr-defined]
    return running


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def cleanup(kind: str, made_queues: set[str]) -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for running in started:
        await _forget_run(kind, running.run, made_queues)  # type: ignore[attr-defined]


async def _publish_and_receive(running: Running, metadata: tuple[tuple[str, str], ...]) -> Message:
    sub = running.client.message_broker.subscribe(
        product="shop", env="dev", event="events:orders", group="trace", ack_deadline=10
    )
    messages = await opened(sub)
    async with grpc.aio.insecure_channel(running.address) as channel:
        response = await broker_pb2_grpc.BrokerServiceStub(channel).Publish(
            broker_pb2.PublishRequest(product="shop", env="dev", event="events:orders", message=outgoing(b"x")),
            metadata=metadata,
            timeout=10,
        )
    [message] = await take(messages, 1)
    assert message.id == response.message_id
    await message.ack()
    await sub.close()
    return message


def _publish_span(spans: InMemorySpanExporter) -> tuple[str, str]:
    [span] = [s for s in spans.get_finished_spans() if s.name.endswith("BrokerService/Publish")]
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


async def test_with_tracing_on_the_publish_span_is_the_messages_parent(
    kind: str, start_server: ServerFactory, cleanup: list[Running]
) -> None:
    for metadata, caller_trace in (
        ((("traceparent", CALLER), ("tracestate", CALLER_STATE)), "0af7651916cd43dd8448eb211c80319c"),
        ((("traceparent", "garbage-not-a-traceparent"),), None),
        ((), None),
    ):
        spans = InMemorySpanExporter()
        running = await _server(kind, start_server, spans)
        cleanup.append(running)
        message = await _publish_and_receive(running, metadata)
        trace_id, span_id = _publish_span(spans)
        assert message.traceparent.startswith(f"00-{trace_id}-{span_id}-"), metadata
        if caller_trace is not None:
            assert trace_id == caller_trace  # the caller's trace goes on through the Publish span
            assert message.tracestate == CALLER_STATE
        else:
            assert message.tracestate == ""


async def test_with_tracing_off_only_a_well_formed_caller_context_is_delivered(
    kind: str, start_server: ServerFactory, cleanup: list[Running]
) -> None:
    running = await _server(kind, start_server, None)
    cleanup.append(running)
    message = await _publish_and_receive(running, (("traceparent", CALLER), ("tracestate", CALLER_STATE)))
    assert (message.traceparent, message.tracestate) == (CALLER, CALLER_STATE)
    for bad in ("garbage-not-a-traceparent", "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01"):
        message = await _publish_and_receive(running, (("traceparent", bad), ("tracestate", CALLER_STATE)))
        assert (message.traceparent, message.tracestate) == ("", ""), bad
