"""Runs left by a replica that died are taken over from their records, on both stores: completed calls are not made
again, and a call recorded `running` (it may have been in flight) is made again only when it is safe to repeat; one
that is not fails with FEATURE_STEP_OUTCOME_UNKNOWN. The dead replica's records are written into the store as it
would have left them (its lease over), then a live processor finds them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ductape.processor.features import FeatureRun

from ductape_processor.store import Store
from ductape_processor.store.feature_records import (
    FeatureRunRecord,
    FeatureStepRecord,
    FeatureWrites,
    Phase,
    StepStatus,
)
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import Running, ServerFactory
from tests.features_harness import Ops, manifest, op, run_record, step

DEAD = "a-replica-that-died"


def left_run(feature: str, version: int) -> FeatureRunRecord:
    now = datetime.now(UTC)
    return run_record(DEAD, now - timedelta(seconds=30), now - timedelta(seconds=1), feature=feature, version=version)


def left_call(
    run: FeatureRunRecord, sequence: str, event: str, status: StepStatus, output: object = None
) -> FeatureStepRecord:
    started = run.created_at + timedelta(seconds=1)
    return FeatureStepRecord(
        run.run_id,
        sequence,
        event,
        Phase.CALL,
        status,
        1,
        0,
        1 if status == StepStatus.COMPLETED else 0,
        started,
        started if status == StepStatus.COMPLETED else None,
        json.dumps(output),
        "",
        "",
    )


async def wait_ended(running: Running, process_id: str) -> FeatureRun:
    async with asyncio.timeout(15):
        while True:
            run = await running.client.feature.get(product="shop", env="dev", process_id=process_id)
            if run.status not in ("running", "rolling_back"):
                return run
            await asyncio.sleep(0.05)


async def test_a_dead_replicas_runs_are_taken_over_without_repeating_completed_or_unsafe_calls(
    start_server: ServerFactory, ops: Ops, store_factory: Callable[[], Awaitable[Store]]
) -> None:
    ops.answers["created"] = {"id": "u-9"}
    store = await store_factory()
    running = await start_server(store=store, feature_poll_s=0.2)
    applied = await running.client.product.apply(
        manifest(
            ops.url,
            {"tag": "unsafe", "sequence": [step("a", op("created")), step("b", op("posted"), parents=["a"])]},
            {
                "tag": "safe",
                "sequence": [
                    step("a", op("created")),
                    step("b", op("read", method="GET", body=None), op("keyed", idempotency_key="auto"), parents=["a"]),
                    step("c", op("after", body={"id": "$Sequence{a}{created}{id}"}), parents=["b"]),
                ],
            },
        )
    )
    version = applied.version.version
    unsafe, safe = left_run("unsafe", version), left_run("safe", version)
    for run in (unsafe, safe):
        await store.insert_feature_run(run)
    lost = await store.write_features(
        DEAD,
        FeatureWrites(
            steps=(
                left_call(unsafe, "a", "created", StepStatus.COMPLETED, {"id": "u-9"}),
                left_call(unsafe, "b", "posted", StepStatus.RUNNING),
                left_call(safe, "a", "created", StepStatus.COMPLETED, {"id": "u-9"}),
                left_call(safe, "b", "read", StepStatus.RUNNING),
                left_call(safe, "b", "keyed", StepStatus.RUNNING),
            )
        ),
    )
    assert lost == set()
    refused, finished = await wait_ended(running, unsafe.run_id), await wait_ended(running, safe.run_id)
    assert refused.status == "failed" and refused.takeovers == 1
    assert (refused.error_reason, refused.failed_step) == ("FEATURE_STEP_OUTCOME_UNKNOWN", "b.posted")
    assert finished.status == "completed" and finished.takeovers == 1
    assert ops.count == {"read": 1, "keyed": 1, "after": 1}, "completed calls and the unsafe one are not made again"
    assert ops.bodies["after"] == [{"id": "u-9"}], "a completed call's output is read back from its record"
    # The dead replica's lease is gone: anything it still tries to record is refused.
    late = left_call(safe, "c", "after", StepStatus.COMPLETED)
    assert await store.write_features(DEAD, FeatureWrites(steps=(late,))) == {safe.run_id}


class SlowJournalStore(SqliteStore):
    """Writes a run's records half a second late: a lease renewal comes round while a run's start is still queued."""

    async def write_features(self, owner: str, writes: FeatureWrites) -> set[str]:
        await asyncio.sleep(0.5)
        return await super().write_features(owner, writes)


async def test_a_run_is_renewed_only_once_stored_so_a_slow_store_does_not_stop_it(
    start_server: ServerFactory, ops: Ops, tmp_path: Path
) -> None:
    store = SlowJournalStore(tmp_path / "slow.db")
    await store.open()
    running = await start_server(store=store, feature_lease_s=1)
    await running.client.product.apply(manifest(ops.url, {"tag": "flow", "sequence": [step("a", op("one"))]}))
    runs = await asyncio.gather(
        *(running.client.feature.run(product="shop", env="dev", feature="flow", wait=True) for _ in range(5))
    )
    assert [run.status for run in runs] == ["completed"] * 5
    assert ops.count["one"] == 5
