"""kill -9 of a replica (a real `ductape-processor serve` process on the shared PostgreSQL store) while it holds an
idempotency key whose request is at the upstream: the retry on another replica never runs the action again, and every
call the dead replica answered has its execution record."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ductape_processor.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN
from tests.faults.harness import (
    OUTCOME_UNKNOWN,
    CountingUpstream,
    Outcome,
    call_until_settled,
    figures,
    product,
    records,
)
from tests.faults.replicas import Replica, serve
from tests.upstream import Upstream

pytestmark = [pytest.mark.faults, pytest.mark.postgres]


async def test_kill_9_of_the_replica_holding_a_claim_runs_nothing_twice(
    upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    manifest = tmp_path / "faults.json"
    manifest.write_bytes(product(upstream.url))
    replicas.append(await serve(manifest, pg_schema, tmp_path / "a"))
    replicas.append(await serve(manifest, pg_schema, tmp_path / "b"))
    a, b = replicas
    counting = CountingUpstream(upstream, delay_s=0.02, slow={"victim": 3.0})
    counting.install()
    target = a

    # Load on replica A; a caller moves to B once A is gone, as a client with several addresses would.
    outcomes = [Outcome(f"c{caller}-k{n}") for caller in range(8) for n in range(40)]
    stop_load = asyncio.Event()

    async def caller(mine: list[Outcome]) -> None:
        for outcome in mine:
            if stop_load.is_set():
                return
            await call_until_settled(lambda: target.client, outcome.key, outcome)

    load = [asyncio.create_task(caller(outcomes[i::8])) for i in range(8)]
    victim = Outcome("victim")
    victim_call = asyncio.create_task(call_until_settled(lambda: target.client, "victim", victim, budget_s=20))
    await asyncio.wait_for(counting.arrival("victim").wait(), 10)
    await asyncio.sleep(0.3)  # calls keep being answered by A up to the kill
    a.process.kill()  # SIGKILL: no shutdown, no flush
    await a.process.wait()
    killed_at = time.monotonic()
    target = b
    await asyncio.sleep(0.5)
    stop_load.set()
    await asyncio.gather(*load)
    await victim_call
    recovered_at = time.monotonic()

    made = [o for o in outcomes if o.settled is not None] + [victim]
    store = PostgresStore(POSTGRES_DSN, pg_schema)
    await store.open()
    try:
        stored = await records(store, sum(1 for o in made if o.process_id))
    finally:
        await store.close()
    result = figures("kill -9 of the replica holding a claim", counting, made, stored)
    result.recovery_s = max(result.recovery_s, recovered_at - killed_at)
    result.show()

    assert counting.received["victim"] == 1, "the victim's request reached the upstream exactly once"
    assert victim.unknown, f"the retry on B answers {OUTCOME_UNKNOWN}, not a second run: {victim.errors}"
    assert result.duplicates == 0, f"an idempotent call ran twice: {counting.received.most_common(3)}"
    assert result.lost_records == 0, "every call answered before the kill has its execution record"
    assert "INTERNAL" not in result.errors
    assert result.recovery_s < 8, "a dead replica's claim ends within its lease"
