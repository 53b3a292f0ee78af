"""Features end to end: a real processor runs them against a loopback upstream that records when each call arrived
and ended. DAG order and concurrency, `$Sequence` piping, conditions and loops, allow_fail, retries, rollback order
and strategies, cancel, watch, resume, replay, version pinning across a promote, idempotent starts, the input
contract; on both stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ductape.processor.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnauthenticatedError
from ductape.processor.features import FeatureRun

from ductape_processor.store import Store
from tests.conftest import Running, ServerFactory
from tests.features_harness import Ops, manifest, op, step

RUN = {"product": "shop", "env": "dev"}


@pytest.fixture
def start_server(start_server: ServerFactory, store_factory: Callable[[], Awaitable[Store]]) -> ServerFactory:
    """Every test runs on both stores."""

    async def start(**settings: Any) -> Running:
        return await start_server(store=await store_factory(), **settings)

    return start


async def serve(start_server: ServerFactory, ops: Ops, *features: dict[str, Any], **extra: Any) -> Running:
    running = await start_server()
    await running.client.product.apply(manifest(ops.url, *features, **extra))
    return running


def feature(*steps: dict[str, Any], tag: str = "flow", **fields: Any) -> dict[str, Any]:
    return {"tag": tag, "sequence": list(steps), **fields}


async def run(running: Running, input: dict[str, Any] | None = None, **fields: Any) -> FeatureRun:
    fields.setdefault("feature", "flow")
    fields.setdefault("wait", True)
    return await running.client.feature.run(**RUN, input=input or {}, **fields)


async def test_steps_start_when_their_parents_are_done_and_events_of_a_step_run_concurrently(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.delay.update({"a1": 0.3, "a2": 0.3, "c1": 0.3})
    running = await serve(
        start_server,
        ops,
        feature(
            step("a", op("a1"), op("a2")),
            step("b", op("b1"), parents=["a"]),
            step("c", op("c1")),
        ),
    )
    done = await run(running)
    assert done.status == "completed", done.error_message
    first, second, other = ops.arrived["a1"][0], ops.arrived["a2"][0], ops.arrived["c1"][0]
    assert max(first, second) < min(ops.ended["a1"][0], ops.ended["a2"][0]), "a1 and a2 overlap"
    assert other < ops.ended["a1"][0], "c has no parents: it starts with a"
    assert ops.arrived["b1"][0] >= max(ops.ended["a1"][0], ops.ended["a2"][0]), "b waits for all of a"
    assert ops.count == {"a1": 1, "a2": 1, "b1": 1, "c1": 1}
    assert [(s.sequence, s.event, s.call and s.call.status) for s in done.steps] == [
        ("a", "a1", "completed"),
        ("a", "a2", "completed"),
        ("b", "b1", "completed"),
        ("c", "c1", "completed"),
    ]


async def test_a_step_reads_earlier_outputs_through_sequence_and_the_output_is_built_from_them(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.answers["create"] = {"id": "u-7", "tags": ["x", "y"], "zero": 0}
    running = await serve(
        start_server,
        ops,
        feature(
            step("make", op("create", body={"email": "$Input{email}"})),
            step(
                "use",
                op("use", body={"id": "$Sequence{make}{create}{id}", "tag": "$Sequence{make}{create}{tags}{[1]}"}),
                parents=["make"],
            ),
            input={"email": {"type": "email", "required": True}},
            output={
                "id": "$Sequence{make}{create}{id}",
                "zero": "$Sequence{make}{create}{zero}",
                "n": "$Sequence{use}{use}{n}",
            },
        ),
    )
    done = await run(running, {"email": "ada@example.com"})
    assert done.status == "completed"
    assert ops.bodies["create"] == [{"email": "ada@example.com"}]
    assert ops.bodies["use"] == [{"id": "u-7", "tag": "y"}]
    assert done.output == {"id": "u-7", "zero": 0, "n": 1}
    assert done.step("make", "create").call.output == {"id": "u-7", "tags": ["x", "y"], "zero": 0}


async def test_conditions_skip_events_and_zero_false_and_empty_input_are_values(
    start_server: ServerFactory, ops: Ops
) -> None:
    running = await serve(
        start_server,
        ops,
        feature(
            step(
                "s",
                op("count-is-zero", condition={"left": "$Input{count}", "op": "==", "right": 0}),
                op("flag-is-true", condition={"left": "$Input{flag}"}),
                op(
                    "name-is-empty",
                    condition=[
                        {"left": "$Input{name}", "op": "==", "right": ""},
                        {"left": "$Input{flag}", "op": "!=", "right": True},
                    ],
                ),
                op("count-above-five", condition={"left": "$Input{count}", "op": ">", "right": 5}),
            ),
            input={
                "count": {"type": "integer", "required": True},
                "flag": {"type": "boolean", "required": True},
                "name": {"type": "string", "required": True},
            },
        ),
    )
    done = await run(running, {"count": 0, "flag": False, "name": ""})
    assert done.status == "completed", done.error_message
    assert ops.count == {"count-is-zero": 1, "name-is-empty": 1}
    statuses = {s.event: s.call.status for s in done.steps if s.call}
    assert statuses == {
        "count-is-zero": "completed",
        "flag-is-true": "skipped",
        "name-is-empty": "completed",
        "count-above-five": "skipped",
    }


async def test_a_do_while_loop_runs_until_its_condition_fails_and_never_past_its_max(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.answers["poll"] = lambda n: {"done": n >= 3, "n": n}
    ops.answers["spin"] = lambda n: {"done": False, "n": n}
    loop = {"left": "$Sequence{s}{poll}{done}", "op": "!=", "right": True}
    spin = {"left": "$Sequence{s}{spin}{done}", "op": "!=", "right": True}
    running = await serve(
        start_server,
        ops,
        feature(
            step(
                "s",
                op("poll", method="GET", do_while={"condition": loop, "max": 10}),
                op("spin", method="GET", do_while={"condition": spin, "max": 4}),
            ),
            output="$Sequence{s}{poll}{n}",
        ),
    )
    done = await run(running)
    assert done.status == "completed"
    assert ops.count == {"poll": 3, "spin": 4}
    assert done.output == 3
    assert done.step("s", "poll").iterations == 3 and done.step("s", "spin").iterations == 4


async def test_allow_fail_records_the_failure_and_the_run_goes_on(start_server: ServerFactory, ops: Ops) -> None:
    ops.failures["flaky"] = 99
    running = await serve(
        start_server,
        ops,
        feature(step("s", op("flaky", allow_fail=True), op("fine")), step("after", op("next"), parents=["s"])),
    )
    done = await run(running)
    assert done.status == "completed"
    flaky = done.step("s", "flaky").call
    assert flaky is not None and flaky.status == "failed" and flaky.error_reason == "UPSTREAM_STATUS"
    assert ops.count["next"] == 1


async def test_retries_repeat_a_failed_call_and_a_run_fails_when_they_are_used_up(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.failures.update({"twice": 2, "thrice": 3})
    running = await serve(
        start_server,
        ops,
        feature(step("s", op("twice", retries=2))),
        feature(step("s", op("thrice", retries=2)), step("t", op("never"), parents=["s"]), tag="hopeless"),
    )
    done = await run(running)
    assert done.status == "completed" and done.step("s", "twice").call.attempts == 3
    failed = await run(running, feature="hopeless")
    assert failed.status == "failed" and not failed.ok
    assert (failed.error_reason, failed.failed_step) == ("UPSTREAM_STATUS", "s.thrice")
    assert failed.step("s", "thrice").call.attempts == 3
    assert ops.count["thrice"] == 3 and "never" not in ops.count


def _undoable(tag: str, **fields: Any) -> dict[str, Any]:
    """An event whose compensation posts `undo-<tag>` with the event's own output."""
    rollback = {
        "type": "action",
        "event": "api:post",
        "input": {
            "params": {"name": f"undo-{tag}"},
            "body": {"undoing": f"$Sequence{{{fields.pop('seq')}}}{{{tag}}}{{name}}"},
        },
    }
    return op(tag, rollback=rollback, **fields)


async def test_a_failure_rolls_completed_events_back_in_reverse_order_of_completion(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.delay.update({"b2": 0.3})
    ops.failures["c1"] = 1
    running = await serve(
        start_server,
        ops,
        feature(
            step("a", _undoable("a1", seq="a")),
            step("b", _undoable("b1", seq="b"), _undoable("b2", seq="b"), op("b3"), parents=["a"]),
            step("c", op("c1"), parents=["b"]),
        ),
    )
    done = await run(running)
    assert done.status == "rolled_back"
    assert (done.error_reason, done.failed_step) == ("UPSTREAM_STATUS", "c.c1")
    undone = [name for name in ops.order if name.startswith("undo-")]
    assert undone == ["undo-b2", "undo-b1", "undo-a1"], "the last completed first"
    assert ops.bodies["undo-a1"] == [{"undoing": "a1"}], "a compensation reads its event's output"
    assert done.step("a", "a1").rollback.status == "completed"
    assert done.step("b", "b3").rollback is None, "no compensation declared"


async def test_critical_only_undoes_the_critical_events_and_none_undoes_nothing(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.failures.update({"fail-1": 1, "fail-2": 1})
    steps = (step("a", _undoable("x", seq="a", critical=True), _undoable("y", seq="a")),)
    running = await serve(
        start_server,
        ops,
        feature(*steps, step("b", op("fail-1"), parents=["a"]), tag="critical", rollback_strategy="critical_only"),
        feature(*steps, step("b", op("fail-2"), parents=["a"]), tag="nothing", rollback_strategy="none"),
    )
    critical = await run(running, feature="critical")
    assert critical.status == "rolled_back"
    assert [name for name in ops.order if name.startswith("undo-")] == ["undo-x"]
    nothing = await run(running, feature="nothing")
    assert nothing.status == "failed" and nothing.error_reason == "UPSTREAM_STATUS"
    assert [name for name in ops.order if name.startswith("undo-")] == ["undo-x"], "none: nothing more undone"


async def test_a_compensation_that_fails_ends_the_run_failed_and_the_others_still_run(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.failures.update({"boom": 1, "undo-b": 5})
    running = await serve(
        start_server,
        ops,
        feature(
            step("a", _undoable("a", seq="a")),
            step("b", _undoable("b", seq="b"), parents=["a"]),
            step("c", op("boom"), parents=["b"]),
        ),
    )
    done = await run(running)
    assert done.status == "failed" and done.error_reason == "FEATURE_ROLLBACK_FAILED"
    assert "b.b (rollback)" in done.error_message and done.failed_step == "c.boom"
    assert done.step("b", "b").rollback.status == "failed"
    assert done.step("a", "a").rollback.status == "completed"


async def test_cancel_stops_a_run_before_its_next_step(start_server: ServerFactory, ops: Ops) -> None:
    ops.delay["slow"] = 0.5
    running = await serve(start_server, ops, feature(step("a", op("slow")), step("b", op("next"), parents=["a"])))
    started = await run(running, wait=False)
    assert started.status == "running"
    await asyncio.wait_for(ops.arrival("slow").wait(), 5)
    cancelled = await running.client.feature.cancel(**RUN, process_id=started.process_id)
    assert cancelled.status == "cancelled"
    await asyncio.sleep(0.8)
    assert "next" not in ops.count
    with pytest.raises(FailedPreconditionError) as again:
        await running.client.feature.cancel(**RUN, process_id=started.process_id)
    assert again.value.reason == "FEATURE_RUN_NOT_RUNNING"
    assert (await running.client.feature.get(**RUN, process_id=started.process_id)).status == "cancelled"


async def test_watch_streams_each_change_until_the_run_ends(start_server: ServerFactory, ops: Ops) -> None:
    ops.delay.update({"one": 0.2, "two": 0.2})
    running = await serve(
        start_server, ops, feature(step("a", op("one")), step("b", op("two", method="GET"), parents=["a"]))
    )
    started = await run(running, wait=False)
    seen: list[tuple[str, str, str]] = []
    last = None
    async for event in running.client.feature.watch(**RUN, process_id=started.process_id, timeout=10):
        if event.step is not None and event.step.call is not None:
            seen.append((event.step.sequence, event.step.event, event.step.call.status))
        last = event
    assert last is not None and last.run is not None and last.status == "completed"
    assert seen == [
        ("a", "one", "running"),
        ("a", "one", "completed"),
        ("b", "two", "running"),
        ("b", "two", "completed"),
    ]
    # A run that has ended answers what it recorded, then its end.
    replayed = [event async for event in running.client.feature.watch(**RUN, process_id=started.process_id)]
    assert [e.step.event for e in replayed if e.step] == ["one", "two"] and replayed[-1].run is not None


async def test_resume_goes_on_from_the_failed_step_without_repeating_completed_ones(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.failures["broken"] = 1
    running = await serve(
        start_server,
        ops,
        feature(step("a", op("first")), step("b", op("broken"), parents=["a"]), step("c", op("last"), parents=["b"])),
    )
    failed = await run(running)
    assert failed.status == "failed" and failed.failed_step == "b.broken"
    resumed = await running.client.feature.resume(**RUN, process_id=failed.process_id, wait=True)
    assert resumed.status == "completed", resumed.error_message
    assert ops.count == {"first": 1, "broken": 2, "last": 1}
    with pytest.raises(FailedPreconditionError) as again:
        await running.client.feature.resume(**RUN, process_id=failed.process_id)
    assert again.value.reason == "FEATURE_RUN_NOT_RESUMABLE"


async def test_replay_starts_a_new_run_with_the_same_input(start_server: ServerFactory, ops: Ops) -> None:
    running = await serve(start_server, ops, feature(step("a", op("echo", body="$Input"))))
    first = await run(running, {"n": 1})
    again = await running.client.feature.replay(**RUN, process_id=first.process_id, wait=True)
    assert again.status == "completed" and again.process_id != first.process_id
    assert again.replay_of == first.process_id and again.input == {"n": 1}
    assert ops.bodies["echo"] == [{"n": 1}, {"n": 1}]


async def test_a_run_keeps_the_version_it_started_with_across_a_promote(start_server: ServerFactory, ops: Ops) -> None:
    ops.delay["slow"] = 0.6
    running = await serve(
        start_server, ops, feature(step("a", op("slow")), step("b", op("then", name="v1"), parents=["a"]))
    )
    started = await run(running, wait=False)
    await asyncio.wait_for(ops.arrival("slow").wait(), 5)
    v2 = await running.client.product.apply(
        manifest(ops.url, feature(step("a", op("slow")), step("b", op("then", name="v2"), parents=["a"])))
    )
    await running.client.product.promote("shop", env="dev", version=v2.version.version)
    ended = await running.client.feature.get(**RUN, process_id=started.process_id)
    while ended.status == "running":
        await asyncio.sleep(0.05)
        ended = await running.client.feature.get(**RUN, process_id=started.process_id)
    assert ended.status == "completed" and ended.version == 1
    assert "v1" in ops.count and "v2" not in ops.count
    fresh = await run(running)
    assert fresh.version == v2.version.version and ops.count["v2"] == 1
    replayed = await running.client.feature.replay(
        **RUN, process_id=started.process_id, version=v2.version.version, wait=True
    )
    assert replayed.version == v2.version.version and ops.count["v2"] == 2


async def test_an_idempotency_key_starts_one_run_and_refuses_another_request(
    start_server: ServerFactory, ops: Ops
) -> None:
    running = await serve(start_server, ops, feature(step("a", op("once"))))
    first = await run(running, {"n": 1}, idempotency_key="k-1")
    second = await run(running, {"n": 1}, idempotency_key="k-1")
    assert first.process_id == second.process_id and second.status == "completed"
    assert ops.count["once"] == 1
    with pytest.raises(FailedPreconditionError) as other:
        await run(running, {"n": 2}, idempotency_key="k-1")
    assert other.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_bad_input_unknown_features_and_runs_are_clear_errors(start_server: ServerFactory, ops: Ops) -> None:
    running = await serve(
        start_server, ops, feature(step("a", op("x")), input={"email": {"type": "email", "required": True}})
    )
    with pytest.raises(InvalidArgumentError) as bad:
        await run(running, {"email": "not an address"})
    assert bad.value.reason == "INVALID_INPUT" and bad.value.field_violations[0].field == "input.email"
    with pytest.raises(NotFoundError) as missing:
        await run(running, feature="nope")
    assert missing.value.reason == "FEATURE_NOT_FOUND"
    with pytest.raises(NotFoundError) as unknown:
        await running.client.feature.get(**RUN, process_id="nope")
    assert unknown.value.reason == "FEATURE_RUN_NOT_FOUND"
    assert "x" not in ops.count


async def test_list_pages_runs_newest_first_by_feature_and_status(start_server: ServerFactory, ops: Ops) -> None:
    ops.failures["bad"] = 99
    running = await serve(start_server, ops, feature(step("a", op("ok"))), feature(step("a", op("bad")), tag="broken"))
    made = [await run(running) for _ in range(3)]
    broken = await run(running, feature="broken")
    page = await running.client.feature.list(**RUN, feature="flow", page_size=2)
    assert [r.process_id for r in page.runs] == [made[2].process_id, made[1].process_id] and page.next_page_token
    everything = [r.process_id async for r in running.client.feature.runs(**RUN)]
    assert everything == [broken.process_id, *(r.process_id for r in reversed(made))]
    failed = await running.client.feature.list(**RUN, status="failed")
    assert [r.process_id for r in failed.runs] == [broken.process_id] and failed.runs[0].steps == []


async def test_a_waiting_run_answers_as_it_stands_when_its_deadline_comes(
    start_server: ServerFactory, ops: Ops
) -> None:
    ops.delay["slow"] = 2.0
    running = await serve(start_server, ops, feature(step("a", op("slow"))))
    pending = await running.client.feature.run(**RUN, feature="flow", wait=True, timeout=0.8)
    assert pending.status == "running"
    ended = await running.client.feature.run(**RUN, feature="flow", wait=False)
    assert ended.status == "running"
    assert json.loads(json.dumps(pending.input)) == {}


async def test_a_run_reads_its_session_and_its_steps_present_it(start_server: ServerFactory, ops: Ops) -> None:
    session_type = {
        "tag": "user",
        "schema": {"userId": {"type": "string", "required": True}},
        "selector": "$Session{userId}",
    }
    with_session = {
        "tag": "api",
        "envs": {"dev": {"base_url": ops.url}},
        "retry": {"max": 0},
        "actions": [{"tag": "me", "method": "POST", "path": "/op/me", "body": {"from_action": "$Session{userId}"}}],
    }
    running = await serve(
        start_server,
        ops,
        feature(
            step("a", op("who", body={"user": "$Session{userId}"})),
            step("b", {"tag": "me", "type": "action", "event": "api2:me"}, parents=["a"]),
            output="$Session{userId}",
        ),
        sessions=[session_type],
        apps=[json.loads(manifest(ops.url))["apps"][0], {**with_session, "tag": "api2"}],
    )
    tokens = await running.client.session.start(product="shop", env="dev", tag="user", data={"userId": "u-42"})
    done = await run(running, session={"tag": "user", "token": tokens.token})
    assert done.status == "completed" and done.output == "u-42"
    assert ops.bodies["who"] == [{"user": "u-42"}], "the feature's template reads the session"
    assert ops.bodies["me"] == [{"from_action": "u-42"}], "the action's own template reads the session it is given"
    with pytest.raises(UnauthenticatedError):
        await run(running, session={"tag": "user", "token": "not-a-token"})


async def test_an_events_cache_serves_the_second_runs_call(start_server: ServerFactory, ops: Ops) -> None:
    running = await serve(
        start_server,
        ops,
        feature(step("a", op("cached", method="GET", cache="short")), output="$Sequence{a}{cached}{n}"),
        caches=[{"tag": "short", "ttl": "1m"}],
    )
    first, second = await run(running), await run(running)
    assert (first.output, second.output) == (1, 1), "the second run's call is answered from the cache"
    assert ops.count["cached"] == 1
