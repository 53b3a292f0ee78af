"""The Python client's per-call `metadata=`: the server sees the caller's traceparent and request id."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ductape.processor import NotFoundError, Processor, ProcessorError, UnauthenticatedError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ductape_processor.api.auth import hash_key
from ductape_processor.telemetry.setup import setup_telemetry
from tests.conftest import EXAMPLE, ServerFactory
from tests.test_brokers import _forget_pending_reads, opened  # noqa: F401 - `_forget_pending_reads` is a fixture

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

Call = Callable[[Processor, Any], Awaitable[object]]

# One call of each facade client, each passing `metadata` through.
CALLS: dict[str, Call] = {
    "ProductService/Get": lambda p, m: p.product.get("shop", env="dev", metadata=m),
    "ProductService/Validate": lambda p, m: p.product.validate(EXAMPLE, metadata=m),
    "ProductService/Apply": lambda p, m: p.product.apply(EXAMPLE, metadata=m),
    "ProductService/ListVersions": lambda p, m: p.product.list_versions("shop", metadata=m),
    "ProductService/Promote": lambda p, m: p.product.promote("shop", env="dev", version=1, metadata=m),
    "ActionService/Run": lambda p, m: p.action.run(
        product="shop", env="dev", app="nope", event="nope", metadata=m, timeout=5
    ),
    "SessionService/Start": lambda p, m: p.session.start(
        product="shop", env="dev", tag="user", data={"userId": "u-1"}, metadata=m
    ),
    "SessionService/Verify": lambda p, m: p.session.verify(
        product="shop", env="dev", tag="user", token="x", metadata=m
    ),
    "SessionService/Refresh": lambda p, m: p.session.refresh(
        product="shop", env="dev", tag="user", refresh_token="x", metadata=m
    ),
    "SessionService/Revoke": lambda p, m: p.session.revoke(
        product="shop", env="dev", tag="user", identifier="u-1", metadata=m
    ),
    "SessionService/ListActive": lambda p, m: p.session.list_active(product="shop", env="dev", tag="user", metadata=m),
    "LogService/ListExecutions": lambda p, m: p.logs.list_executions(product="shop", metadata=m),
    "BrokerService/Publish": lambda p, m: p.message_broker.publish(
        product="shop", env="dev", event="events:user-created", data=b"{}", metadata=m
    ),
    "BrokerService/PublishBatch": lambda p, m: p.message_broker.publish_batch(
        product="shop", env="dev", event="events:user-created", messages=[], metadata=m
    ),
    "StorageService/Save": lambda p, m: p.storage.save(
        product="shop", env="dev", event="files", file_name="m.txt", data=b"m", metadata=m
    ),
    "StorageService/Read": lambda p, m: p.storage.read(
        product="shop", env="dev", event="files", file_name="m.txt", metadata=m
    ),
    "StorageService/List": lambda p, m: p.storage.list(product="shop", env="dev", event="files", metadata=m),
    "StorageService/Delete": lambda p, m: p.storage.delete(
        product="shop", env="dev", event="files", file_name="m.txt", metadata=m
    ),
    "DatabaseService/Execute": lambda p, m: p.database.execute(
        product="shop",
        env="dev",
        database="main",
        action="find_user",
        input={"filter": {"email": "a@b.co"}},
        metadata=m,
    ),
    "DatabaseService/Batch": lambda p, m: p.database.batch(
        product="shop", env="dev", database="main", steps=[], metadata=m
    ),
    "MigrationService/Run": lambda p, m: p.migration.run(product="shop", env="dev", database="main", metadata=m),
    "MigrationService/Rollback": lambda p, m: p.migration.rollback(
        product="shop", env="dev", database="main", metadata=m
    ),
    "MigrationService/Status": lambda p, m: p.migration.status(product="shop", env="dev", database="main", metadata=m),
    "MigrationService/Plan": lambda p, m: p.migration.plan(product="shop", env="dev", database="main", metadata=m),
    "NotificationService/Send": lambda p, m: p.notification.send(
        product="shop", env="dev", event="users:welcome", sms={"to": ["+447700900123"]}, metadata=m
    ),
    "JobService/Schedule": lambda p, m: p.job.schedule(
        product="shop", env="dev", event="mailer:send_welcome", delay=3600, metadata=m
    ),
    "JobService/Get": lambda p, m: p.job.get(product="shop", env="dev", job_id="none", metadata=m),
    "JobService/List": lambda p, m: p.job.list(product="shop", env="dev", metadata=m),
    "JobService/Cancel": lambda p, m: p.job.cancel(product="shop", env="dev", name="none", metadata=m),
    "JobService/Pause": lambda p, m: p.job.pause(product="shop", env="dev", name="none", metadata=m),
    "JobService/Resume": lambda p, m: p.job.resume(product="shop", env="dev", name="none", metadata=m),
    "JobService/TriggerNow": lambda p, m: p.job.trigger_now(product="shop", env="dev", name="none", metadata=m),
    "JobService/ListRuns": lambda p, m: p.job.list_runs(product="shop", env="dev", name="none", metadata=m),
    "WebhookService/Emit": lambda p, m: p.webhook.emit(
        product="shop", env="dev", event="orders:paid", payload={"orderId": "o-1"}, metadata=m
    ),
    "WebhookService/ListDeliveries": lambda p, m: p.webhook.list_deliveries(product="shop", env="dev", metadata=m),
    "WebhookService/GetDelivery": lambda p, m: p.webhook.get_delivery(
        product="shop", env="dev", delivery_id="none", metadata=m
    ),
    "WebhookService/Redeliver": lambda p, m: p.webhook.redeliver(
        product="shop", env="dev", delivery_id="none", metadata=m
    ),
    "WebhookService/ListReceived": lambda p, m: p.webhook.list_received(product="shop", env="dev", metadata=m),
    "FeatureService/Run": lambda p, m: p.feature.run(product="shop", env="dev", feature="none", metadata=m),
    "FeatureService/Get": lambda p, m: p.feature.get(product="shop", env="dev", process_id="none", metadata=m),
    "FeatureService/List": lambda p, m: p.feature.list(product="shop", env="dev", metadata=m),
    "FeatureService/Cancel": lambda p, m: p.feature.cancel(product="shop", env="dev", process_id="none", metadata=m),
    "FeatureService/Resume": lambda p, m: p.feature.resume(product="shop", env="dev", process_id="none", metadata=m),
    "FeatureService/Replay": lambda p, m: p.feature.replay(product="shop", env="dev", process_id="none", metadata=m),
}


async def finished_span(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The one finished span of that name: the server ends a call's span after it has answered, so it may lag."""
    deadline = asyncio.get_running_loop().time() + 10
    while not (found := [s for s in spans.get_finished_spans() if s.name == name]):
        assert asyncio.get_running_loop().time() < deadline, f"no span {name!r} ended within 10 s"
        await asyncio.sleep(0.01)
    [span] = found
    return span


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_the_callers_traceparent_is_the_parent_of_the_server_span(
    method: str, start_server: ServerFactory
) -> None:
    spans = InMemorySpanExporter()
    running = await start_server(telemetry=setup_telemetry(span_exporter=spans), manifests=[EXAMPLE])
    with contextlib.suppress(ProcessorError):  # some calls fail on purpose; the span is there either way
        await CALLS[method](running.client, {"traceparent": TRACEPARENT})
    span = await finished_span(spans, f"ductape.processor.v1.{method}")
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID


async def test_the_callers_request_id_comes_back_with_an_error(start_server: ServerFactory) -> None:
    running = await start_server()
    with pytest.raises(NotFoundError) as caught:
        await running.client.product.get("nope", metadata=[("X-Request-Id", "caller-req-7")])
    assert caught.value.request_id == "caller-req-7"
    with pytest.raises(NotFoundError) as again:
        await running.client.product.get("nope")
    assert again.value.request_id not in ("", "caller-req-7"), "metadata is per call, not kept on the client"


async def test_per_call_metadata_replaces_the_clients_value_for_the_same_key(start_server: ServerFactory) -> None:
    running = await start_server(api_key_hashes=[hash_key("right")])
    async with Processor(running.address, api_key="wrong") as processor:
        with pytest.raises(UnauthenticatedError):
            await processor.product.list_versions("shop")
        with pytest.raises(NotFoundError):  # authenticated: the product just does not exist
            await processor.product.list_versions("shop", metadata={"authorization": "Bearer right"})


async def test_a_subscriptions_metadata_reaches_the_server(start_server: ServerFactory) -> None:
    spans = InMemorySpanExporter()
    running = await start_server(telemetry=setup_telemetry(span_exporter=spans), manifests=[EXAMPLE])
    subscription = running.client.message_broker.subscribe(
        product="shop", env="dev", event="events:user-created", group="g", metadata={"traceparent": TRACEPARENT}
    )
    await opened(subscription)  # the server answered `ready`: the call is on
    await subscription.close()
    span = await finished_span(spans, "ductape.processor.v1.BrokerService/Subscribe")
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
