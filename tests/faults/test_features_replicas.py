"""Feature runs on real processes sharing one PostgreSQL store: a process killed (kill -9) mid-run leaves its runs to
the others, which finish them from what was recorded once the leases end. Counted at the upstream: no completed call
is made twice, an in-flight call is made again only when the event is safe to repeat, and one that is not fails its
run with FEATURE_STEP_OUTCOME_UNKNOWN (rolled back) instead of risking a second effect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ductape.processor import ProcessorError
from ductape.processor.features import FeatureRun

from tests.faults.harness import CountingUpstream, product
from tests.faults.replicas import Replica, serve
from tests.upstream import Upstream

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

LEASE_S = 3.0
FAST = {"PROCESSOR_FEATURE_LEASE_S": str(LEASE_S), "PROCESSOR_FEATURE_POLL_S": "0.5"}
RUNS = 200
STEPS = ("a", "b", "c")


def create(tag: str, suffix: str, **fields: Any) -> dict[str, Any]:
    return {
        "tag": tag,
        "type": "action",
        "event": "api:create",
        "input": {"body": {"name": f"$Input{{name}}-{suffix}"}},
        **fields,
    }


def chain(tag: str, *, safe_b: bool) -> dict[str, Any]:
    """a, then b, then c, each a POST named `<input name>-<step>`; a's compensation posts `<name>-undo`."""
    undo = {"type": "action", "event": "api:create", "input": {"body": {"name": "$Input{name}-undo"}}}
    return {
        "tag": tag,
        "input": {"name": {"type": "string", "required": True}},
        "sequence": [
            {"tag": "a", "events": [create("a", "a", rollback=undo)]},
            {"tag": "b", "parents": ["a"], "events": [create("b", "b", idempotent=safe_b)]},
            {"tag": "c", "parents": ["b"], "events": [create("c", "c")]},
        ],
    }


async def _start(count: int, upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]) -> None:
    manifest = tmp_path / "features.json"
    document = json.loads(product(upstream.url))
    document["features"] = [chain("safe", safe_b=True), chain("unsafe", safe_b=False)]
    manifest.write_text(json.dumps(document))
    for _ in range(count):
        replicas.append(await serve(manifest, pg_schema, tmp_path / f"r{len(replicas)}", FAST))


async def _ended(replica: Replica, process_id: str, budget_s: float) -> FeatureRun:
    async with asyncio.timeout(budget_s):
        while True:
            run = await replica.client.feature.get(product="faults", env="dev", process_id=process_id)
            if run.status not in ("running", "rolling_back"):
                return run
            await asyncio.sleep(0.1)


async def test_kill_9_mid_run_another_process_finishes_it_without_repeating_a_completed_step(
    upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    counting = CountingUpstream(upstream, slow={"one-b": 2.0, "two-b": 2.0})
    counting.install()
    await _start(1, upstream, pg_schema, tmp_path, replicas)
    [a] = replicas
    safe = await a.client.feature.run(product="faults", env="dev", feature="safe", input={"name": "one"})
    unsafe = await a.client.feature.run(product="faults", env="dev", feature="unsafe", input={"name": "two"})
    await asyncio.wait_for(asyncio.gather(counting.arrival("one-b").wait(), counting.arrival("two-b").wait()), 10)
    a.process.kill()  # SIGKILL: both runs' b calls are in flight, their leases left to run out
    await a.process.wait()
    killed_at = time.monotonic()
    await _start(2, upstream, pg_schema, tmp_path, replicas)
    b = replicas[1]
    finished = await _ended(b, safe.process_id, LEASE_S + 15)
    refused = await _ended(b, unsafe.process_id, LEASE_S + 15)
    taken_over_s = time.monotonic() - killed_at
    await asyncio.sleep(1.0)  # a second take-over's calls would have arrived by now
    print(
        f"\nFAULT kill -9 mid-run: safe={finished.status} takeovers={finished.takeovers} "
        f"unsafe={refused.status} ({refused.error_reason}) calls={dict(sorted(counting.received.items()))} "
        f"finished_after_kill_s={taken_over_s:.2f}"
    )
    assert finished.status == "completed" and finished.takeovers == 1
    assert counting.received["one-a"] == 1 and counting.received["one-c"] == 1, "completed steps are not repeated"
    assert counting.received["one-b"] == 2, "the in-flight step is declared idempotent: made again"
    assert refused.status == "rolled_back" and refused.failed_step == "b.b"
    assert refused.error_reason == "FEATURE_STEP_OUTCOME_UNKNOWN"
    assert counting.received["two-b"] == 1 and counting.received["two-c"] == 0, "an unsafe in-flight call is not"
    assert counting.received["two-undo"] == 1 and counting.received["two-a"] == 1
    assert taken_over_s < LEASE_S + 12


async def test_kill_9_of_one_of_three_processes_leaves_every_run_finished_and_no_call_made_twice(
    upstream: Upstream, pg_schema: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    counting = CountingUpstream(upstream, delay_s=0.02)
    counting.install()
    await _start(3, upstream, pg_schema, tmp_path, replicas)
    a, b, c = replicas
    started: list[FeatureRun] = []

    async def start() -> None:  # one run every 10 ms: when the process dies, runs are at every stage
        for n in range(RUNS):
            started.append(
                await a.client.feature.run(product="faults", env="dev", feature="unsafe", input={"name": f"r{n}"})
            )
            await asyncio.sleep(0.01)

    starting = asyncio.ensure_future(start())
    async with asyncio.timeout(30):
        while sum(counting.received.values()) < RUNS * len(STEPS) // 2:  # about half of the calls made
            await asyncio.sleep(0.01)
    a.process.kill()
    await a.process.wait()
    made_at_kill = sum(counting.received.values())
    with contextlib.suppress(ProcessorError):  # the starts still on their way when the process died
        await starting
    ended = await asyncio.gather(
        *(_ended((b, c)[n % 2], run.process_id, LEASE_S + 60) for n, run in enumerate(started))
    )
    names = {run.process_id: run.input["name"] for run in started}
    await asyncio.sleep(1.0)
    statuses = Counter(run.status for run in ended)
    repeated = {name: count for name, count in counting.received.items() if count > 1}
    unknown = [run for run in ended if run.error_reason == "FEATURE_STEP_OUTCOME_UNKNOWN"]
    print(
        f"\nFAULT kill -9 of 1 of 3 processes: runs={len(started)} calls_at_kill={made_at_kill} "
        f"statuses={dict(statuses)} "
        f"outcome_unknown={len(unknown)} taken_over={sum(1 for run in ended if run.takeovers)} repeated={repeated}"
    )
    assert repeated == {}, "no call made twice"
    assert statuses["running"] == 0 and statuses["rolling_back"] == 0, "every run ended"
    for run in ended:
        name = names[run.process_id]
        made = [step for step in STEPS if counting.received[f"{name}-{step}"]]
        if run.status == "completed":
            assert made == list(STEPS)
        else:
            # Only a call in flight when the process died is left unknown; nothing after it ran, and what completed
            # before it was rolled back (a run that failed at its first step has nothing to roll back).
            assert run.error_reason == "FEATURE_STEP_OUTCOME_UNKNOWN", run
            failed = run.failed_step.split(".")[0]
            assert made in (list(STEPS[: STEPS.index(failed) + 1]), list(STEPS[: STEPS.index(failed)]))
            rolled = failed != "a"
            assert run.status == ("rolled_back" if rolled else "failed")
            assert counting.received[f"{name}-undo"] == int(rolled)
    assert statuses["completed"] + len(unknown) == len(started), "a run fails only for a call it had in flight"
    assert statuses["completed"] and unknown, "the process died with runs completed and runs mid-way"
