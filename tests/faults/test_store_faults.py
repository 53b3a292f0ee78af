"""PostgreSQL connections terminated under load: idempotent calls never run twice, every answered call has its record,
and callers only ever see retryable errors."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ductape_processor.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN, ServerFactory
from tests.faults.harness import CountingUpstream, Outcome, call_until_settled, figures, product, records
from tests.upstream import Upstream

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

CALLERS = 8
KEYS_PER_CALLER = 12


async def terminate_connections(schema: str, stop: asyncio.Event, every_s: float) -> int:
    """pg_terminate_backend on this test's processor connections only (its application_name names the schema), so
    other sessions on the same server are left alone."""
    killer = await asyncpg.connect(POSTGRES_DSN)
    terminated = 0
    try:
        while not stop.is_set():
            terminated += await killer.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND pid <> pg_backend_pid()",
                f"ductape-processor/{schema}",
            )
            await asyncio.sleep(every_s)
    finally:
        await killer.close()
    return terminated


async def test_terminated_store_connections_under_load_run_nothing_twice(
    pg_schema: str,
    start_server: ServerFactory,
    upstream: Upstream,  # the schema outlives the server
) -> None:
    store = PostgresStore(POSTGRES_DSN, pg_schema)
    server = await start_server(store=store)
    await server.client.product.apply(product(upstream.url))
    counting = CountingUpstream(upstream, delay_s=0.03)
    counting.install()

    outcomes = [Outcome(f"c{caller}-k{n}") for caller in range(CALLERS) for n in range(KEYS_PER_CALLER)]

    async def caller(mine: list[Outcome]) -> None:
        for outcome in mine:
            await call_until_settled(lambda: server.client, outcome.key, outcome, unknown_is_final=False)

    stop = asyncio.Event()
    killer = asyncio.create_task(terminate_connections(pg_schema, stop, every_s=0.25))
    await asyncio.gather(*(caller(outcomes[i::CALLERS]) for i in range(CALLERS)))
    stop.set()
    terminated = await killer

    answered = [o for o in outcomes if o.process_id]
    stored = await records(store, len(answered))
    result = figures("pg_terminate_backend under load", counting, outcomes, stored)
    result.show()
    print(f"  connections terminated: {terminated}")

    assert terminated > 0, "the fault was injected"
    assert result.duplicates == 0, f"an idempotent call ran twice: {counting.received.most_common(3)}"
    assert "INTERNAL" not in result.errors, "a store failure reached a caller as INTERNAL"
    assert result.unknown == 0, "with the replica alive, every outcome becomes known"
    assert len(answered) == len(outcomes), [o for o in outcomes if not o.process_id]
    assert result.lost_records == 0, "every answered call has its execution record"
    for key, count in counting.answered.items():
        assert count == 1, key
