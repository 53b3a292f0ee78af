"""The in-process broker's adapter on its own: what a subscription hands out is the message that was published."""

from __future__ import annotations

from datetime import UTC, datetime

from ductape_processor.adapters.brokers.base import SubscribeOptions
from ductape_processor.adapters.brokers.memory import MemoryBroker
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingEvent, PlainEvents


async def test_fetched_events_equal_the_class_own_init_with_every_field_carried() -> None:
    broker = MemoryBroker()
    sub = await broker.subscribe("orders", "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    moment = datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC)
    full = OutgoingEvent(
        "id-1",
        "/ductape/shop/dev/events",
        "orders",
        moment,
        b'{"a":1}',
        "application/json",
        attributes={"k": "v"},
        ordering_key="key",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=1",
        json_payload=True,
    )
    plain = OutgoingEvent("id-2", "/s", "orders", moment, b"x", "application/octet-stream")
    await broker.publish_batch("orders", [full, plain])
    got = await sub.fetch(10, 1)
    # Built with the dataclass's own `__init__`: a field the adapter does not set fails the comparison.
    assert got == [
        IncomingEvent(
            full.id,
            full.source,
            full.type,
            full.time,
            full.data,
            full.content_type,
            got[0].handle,
            {"k": "v"},
            full.ordering_key,
            full.traceparent,
            1,
            full.tracestate,
            full.json_payload,
        ),
        IncomingEvent("id-2", "/s", "orders", moment, b"x", "application/octet-stream", got[1].handle, {}, "", "", 1),
    ]
    assert got[0].attributes is not full.attributes  # the subscriber's own copy
    await sub.nack([got[1].handle], 0)
    [again] = await sub.fetch(10, 1)
    assert (again.id, again.delivery_attempt) == ("id-2", 2)
    await sub.close()
    await broker.close()


async def test_plain_columns_are_published_as_the_events_the_class_own_init_makes() -> None:
    # `PlainEvents.events()` sets every field of each event in place (no `__init__` a message): compared with
    # events built by the dataclass's own `__init__`, and what a subscription then hands out.
    broker = MemoryBroker()
    sub = await broker.subscribe("orders", "g", SubscribeOptions(prefetch=10, ack_deadline_s=5))
    moment = datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    columns = PlainEvents(
        ["id-1", "id-2"], "/s", "orders", moment, [b"a", b"b"], ["text/plain", "application/json"], trace, "v=1"
    )
    expected = [
        OutgoingEvent("id-1", "/s", "orders", moment, b"a", "text/plain", {}, "", trace, "v=1", False),
        OutgoingEvent("id-2", "/s", "orders", moment, b"b", "application/json", {}, "", trace, "v=1", False),
    ]
    assert columns.events() == expected
    assert await broker.publish_plain("orders", columns) == {}, "no failures"
    got = await sub.fetch(10, 1)
    assert [(m.id, m.data, m.content_type, m.traceparent, m.tracestate) for m in got] == [
        ("id-1", b"a", "text/plain", trace, "v=1"),
        ("id-2", b"b", "application/json", trace, "v=1"),
    ]
    await sub.close()
    await broker.close()
