"""Idempotency keys: the claim's states in the store, the key sent upstream, the record written with the answer."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
from ductape.processor import InvalidArgumentError, UnavailableError

from ductape_processor.runtime.registry.manifest import App
from ductape_processor.store.base import ExecutionFilter, ExecutionRecord
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import ServerFactory
from tests.faults.harness import product
from tests.test_store_contract import StoreFactory, at
from tests.upstream import Upstream


def execution(process_id: str) -> ExecutionRecord:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return ExecutionRecord(process_id, "p", "dev", 1, "action", "api:create", 1, moment, moment, 1, 201, "", False, "")


async def test_a_sent_claim_is_never_taken_over(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.idempotency_claim("key", "h", "dead", at(0), at(5), at(3600))
    assert await store.idempotency_mark_sent("key", "dead", at(5))
    assert not await store.idempotency_mark_sent("key", "other", at(5)), "only the owner marks its claim"
    later = await store.idempotency_claim("key", "h", "alive", at(60), at(65), at(3660))
    assert (later.owner, later.state) == ("dead", "sent"), "the request may have reached the upstream"
    assert later.lease_until <= at(60)


async def test_a_pending_claim_of_a_dead_owner_is_taken_over_and_renewal_keeps_a_live_one(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await store.idempotency_claim("key", "h", "a", at(0), at(5), at(3600))
    assert await store.idempotency_renew("key", "a", at(20))
    assert (await store.idempotency_claim("key", "h", "b", at(10), at(15), at(3600))).owner == "a"
    taken = await store.idempotency_claim("key", "h", "b", at(21), at(26), at(3600))
    assert (taken.owner, taken.state) == ("b", "pending")
    assert not await store.idempotency_renew("key", "a", at(40)), "the old owner learns it lost the claim"


async def test_completing_writes_the_execution_record_in_the_same_transaction(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.idempotency_claim("key", "h", "a", at(0), at(5), at(3600))
    await store.idempotency_mark_sent("key", "a", at(5))
    assert await store.idempotency_complete("key", "a", b"answer", execution("pid-1"))
    assert await store.idempotency_complete("key", "a", b"answer", execution("pid-1")), "safe to repeat"
    found = await store.list_executions(ExecutionFilter(product="p"), after=None, limit=10)
    assert [r.process_id for r in found] == ["pid-1"]
    record = await store.idempotency_get("key")
    assert record is not None and (record.state, record.response) == ("done", b"answer")


def with_header(base_url: str, header: str | None) -> bytes:
    document: dict[str, Any] = json.loads(product(base_url))
    if header is not None:
        document["apps"][0]["idempotency_header"] = header
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("header", "sent_as"), [(None, "Idempotency-Key"), ("X-Request-Key", "X-Request-Key"), ("", None)]
)
async def test_the_upstream_receives_the_idempotency_key(
    start_server: ServerFactory, upstream: Upstream, header: str | None, sent_as: str | None
) -> None:
    server = await start_server()
    await server.client.product.apply(with_header(upstream.url, header))
    await server.client.action.run(
        product="faults", env="dev", app="api", event="create", input={"body": {"name": "x"}}, idempotency_key='a"b'
    )
    await server.client.action.run(
        product="faults", env="dev", app="api", event="create", input={"body": {"name": "x"}}
    )
    with_key, without_key = upstream.hits("/create")
    names = {name.lower(): value for name, value in with_key.headers.items()}
    if sent_as is None:
        assert "idempotency-key" not in names
    else:
        assert names[sent_as.lower()] == '"a\\"b"', "a structured-field string (IETF httpapi-idempotency-key-header)"
    assert not {"idempotency-key", "x-request-key"} & {name.lower() for name in without_key.headers}


async def test_a_key_that_cannot_be_a_header_value_is_refused(start_server: ServerFactory, upstream: Upstream) -> None:
    server = await start_server()
    await server.client.product.apply(with_header(upstream.url, None))
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.action.run(
            product="faults", env="dev", app="api", event="create", input={"body": {"name": "x"}}, idempotency_key="ké"
        )
    assert caught.value.field_violations[0].field == "idempotency_key"
    assert upstream.hits("/create") == []


async def test_a_key_longer_than_256_characters_is_refused(start_server: ServerFactory, upstream: Upstream) -> None:
    server = await start_server()
    await server.client.product.apply(with_header(upstream.url, ""))
    call = {"product": "faults", "env": "dev", "app": "api", "event": "create", "input": {"body": {"name": "x"}}}
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.action.run(**call, idempotency_key="k" * 257)
    assert caught.value.field_violations[0].field == "idempotency_key"
    assert caught.value.field_violations[0].description == "is longer than 256 characters"
    assert upstream.hits("/create") == []
    await server.client.action.run(**call, idempotency_key="k" * 256)
    assert len(upstream.hits("/create")) == 1


async def test_an_answered_idempotent_call_has_its_record_before_the_answer(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    server = await start_server(execution_flush_s=3600)  # the batch writer would not write it during this test
    await server.client.product.apply(product(upstream.url))
    result = await server.client.action.run(
        product="faults", env="dev", app="api", event="create", input={"body": {"name": "x"}}, idempotency_key="k"
    )
    found = await server.app.components.store.list_executions(ExecutionFilter(product="faults"), after=None, limit=10)
    assert [r.process_id for r in found] == [result.process_id], "a kill -9 now would not lose it"
    assert found[0].attempts == 1 and found[0].upstream_status == 200


def test_the_manifest_refuses_a_header_name_that_is_not_a_token() -> None:
    assert App.model_validate({"tag": "api", "envs": {}, "idempotency_header": "X-Key"}).idempotency_header == "X-Key"
    with pytest.raises(ValueError, match="idempotency_header"):
        App.model_validate({"tag": "api", "envs": {}, "idempotency_header": "Bad Header:"})


async def test_a_locked_sqlite_store_is_unavailable_not_internal(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    server = await start_server()
    await server.client.product.apply(product(upstream.url))
    store = server.app.components.store
    assert isinstance(store, SqliteStore)
    await store.db.raw.execute("PRAGMA busy_timeout=50")  # the default waits 5 s for the lock
    other = sqlite3.connect(store.path)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process writing, past the busy timeout
        with pytest.raises(UnavailableError) as caught:
            await server.client.action.run(
                product="faults",
                env="dev",
                app="api",
                event="create",
                input={"body": {"name": "x"}},
                idempotency_key="k",
            )
        assert caught.value.reason == "STORE_UNAVAILABLE"
    finally:
        other.rollback()
        other.close()
    assert upstream.hits("/create") == [], "nothing was sent without a claim"
