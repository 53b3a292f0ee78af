"""The store's feature runs, on both back-ends (several stores on one database stand for several replicas): writes
fenced by the lease, claims of runs whose lease ran out, cancel, resume, idempotent starts, renewals, the purge."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from ductape_processor.store import Store
from ductape_processor.store.feature_records import (
    FeatureRunChange,
    FeatureRunFilter,
    FeatureRunRecord,
    FeatureRunStatus,
    FeatureStepRecord,
    FeatureWrites,
    Phase,
    StepStatus,
)
from tests.features_harness import run_record

StoreFactory = Callable[[], Awaitable[Store]]
NOW = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def new_run(owner: str, key: str = "", at: datetime = NOW, feature: str = "signup") -> FeatureRunRecord:
    return run_record(
        owner, at, at + LEASE, feature=feature, idempotency_key=key, request_hash="h" if key else "", input='{"n":1}'
    )


def call(run: FeatureRunRecord, event: str, status: StepStatus, phase: Phase = Phase.CALL) -> FeatureStepRecord:
    return FeatureStepRecord(run.run_id, "s", event, phase, status, 1, 0, 1, NOW, NOW, '{"ok":true}', "", "")


async def test_writes_are_fenced_by_the_lease_and_a_run_whose_lease_ran_out_is_claimed_once(
    store_factory: StoreFactory,
) -> None:
    first, second = await store_factory(), await store_factory()
    run = new_run("a")
    assert await first.write_features("a", FeatureWrites((run,), (call(run, "e1", StepStatus.COMPLETED),))) == set()
    assert await second.claim_feature_runs("b", NOW, NOW + LEASE, 10) == [], "the lease is live"
    assert await second.next_feature_moment() == NOW + LEASE
    later = NOW + LEASE + timedelta(seconds=1)
    [taken] = await second.claim_feature_runs("b", later, later + LEASE, 10)
    assert (taken.run_id, taken.owner, taken.takeovers) == (run.run_id, "b", 1)
    assert await first.claim_feature_runs("a", later, later + LEASE, 10) == [], "claimed once"
    assert await first.write_features("a", FeatureWrites(steps=(call(run, "e2", StepStatus.COMPLETED),))) == {
        run.run_id
    }
    assert await first.renew_feature_runs("a", [run.run_id], later + LEASE) == set()
    assert await second.renew_feature_runs("b", [run.run_id], later + LEASE) == {run.run_id}
    ended = FeatureRunChange(run.run_id, FeatureRunStatus.COMPLETED, output='"done"', ended_at=later, expires_at=later)
    assert (
        await second.write_features("b", FeatureWrites((), (call(run, "e2", StepStatus.COMPLETED),), (ended,))) == set()
    )
    stored = await first.get_feature_run(run.run_id)
    assert stored is not None and stored.status == FeatureRunStatus.COMPLETED and stored.owner is None
    assert [(c.event, c.status) for c in sorted(await first.feature_steps(run.run_id), key=lambda c: c.event)] == [
        ("e1", StepStatus.COMPLETED),
        ("e2", StepStatus.COMPLETED),
    ]
    assert await first.next_feature_moment() is None


async def test_a_call_record_is_replaced_by_the_same_calls_next_one(store_factory: StoreFactory) -> None:
    store = await store_factory()
    run = new_run("a")
    await store.insert_feature_run(run)
    await store.write_features("a", FeatureWrites(steps=(call(run, "e", StepStatus.RUNNING),)))
    await store.write_features("a", FeatureWrites(steps=(replace(call(run, "e", StepStatus.COMPLETED), attempts=2),)))
    [record] = await store.feature_steps(run.run_id)
    assert (record.status, record.attempts, json.loads(record.output)) == (StepStatus.COMPLETED, 2, {"ok": True})


async def test_an_idempotency_key_keeps_the_first_run_and_finds_it_again(store_factory: StoreFactory) -> None:
    store = await store_factory()
    assert await store.feature_run_by_key("shop", "dev", "k") is None
    first, created = await store.insert_feature_run(new_run("a", key="k"))
    again, created_again = await store.insert_feature_run(new_run("b", key="k"))
    assert created and not created_again and again.run_id == first.run_id
    found = await store.feature_run_by_key("shop", "dev", "k")
    assert found is not None and found.run_id == first.run_id
    assert await store.feature_run_by_key("shop", "prd", "k") is None, "a key is scoped to its environment"


async def test_cancel_releases_the_run_and_resume_takes_only_failed_or_cancelled_runs(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    run = new_run("a")
    await store.insert_feature_run(run)
    assert await store.resume_feature_run(run.run_id, "b", NOW + LEASE) is None, "a running run does not resume"
    cancelled = await store.cancel_feature_run(run.run_id, NOW, NOW + timedelta(days=1))
    assert cancelled is not None and cancelled.status == FeatureRunStatus.CANCELLED and cancelled.owner is None
    assert await store.cancel_feature_run(run.run_id, NOW, NOW) is None, "once"
    assert await store.write_features("a", FeatureWrites(steps=(call(run, "e", StepStatus.COMPLETED),))) == {run.run_id}
    resumed = await store.resume_feature_run(run.run_id, "b", NOW + LEASE)
    assert resumed is not None and resumed[0].status == FeatureRunStatus.RUNNING and resumed[0].owner == "b"

    failed = new_run("a")
    await store.insert_feature_run(failed)
    change = FeatureRunChange(failed.run_id, FeatureRunStatus.FAILED, error_reason="X", ended_at=NOW, expires_at=NOW)
    records = (call(failed, "ok", StepStatus.COMPLETED), call(failed, "bad", StepStatus.FAILED))
    await store.write_features("a", FeatureWrites((), records, (change,)))
    again = await store.resume_feature_run(failed.run_id, "b", NOW + LEASE)
    assert again is not None
    assert [r.event for r in again[1]] == ["ok"], "the failed call runs again"
    assert again[0].error_reason == "" and again[0].ended_at is None

    rolled = new_run("a")
    await store.insert_feature_run(rolled)
    back = FeatureRunChange(rolled.run_id, FeatureRunStatus.FAILED, ended_at=NOW, expires_at=NOW)
    await store.write_features(
        "a", FeatureWrites((), (call(rolled, "x", StepStatus.COMPLETED, Phase.ROLLBACK),), (back,))
    )
    assert await store.resume_feature_run(rolled.run_id, "b", NOW + LEASE) is None, "it rolled something back"


async def test_runs_list_newest_first_by_feature_and_status_and_expired_ones_are_purged(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    runs = [new_run("a", at=NOW + timedelta(seconds=n), feature="signup" if n % 2 else "other") for n in range(4)]
    await store.write_features("a", FeatureWrites(tuple(runs)))
    signups = await store.list_feature_runs(FeatureRunFilter("shop", "dev", "signup"), after=None, limit=10)
    assert [r.run_id for r in signups] == [runs[3].run_id, runs[1].run_id]
    older = await store.list_feature_runs(
        FeatureRunFilter("shop", "dev"), after=(runs[2].created_at, runs[2].run_id), limit=10
    )
    assert [r.run_id for r in older] == [runs[1].run_id, runs[0].run_id]
    end = FeatureRunChange(runs[0].run_id, FeatureRunStatus.COMPLETED, ended_at=NOW, expires_at=NOW)
    await store.write_features("a", FeatureWrites((), (call(runs[0], "e", StepStatus.COMPLETED),), (end,)))
    done = await store.list_feature_runs(FeatureRunFilter("shop", "dev", status=2), after=None, limit=10)
    assert [r.run_id for r in done] == [runs[0].run_id]
    await store.purge_expired(NOW + timedelta(seconds=1))
    assert await store.get_feature_run(runs[0].run_id) is None and await store.feature_steps(runs[0].run_id) == []
    assert await store.get_feature_run(runs[1].run_id) is not None
    assert await store.release_feature_runs("a", NOW) == 3
    assert await store.next_feature_moment() == NOW
