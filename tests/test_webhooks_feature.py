"""A received webhook's dispatch to a feature (`dispatch.feature`), on both stores: a real signed POST to the webhook
listener starts one run of the feature with the JSON body as its input, seen through FeatureService; a dispatch made
again after its run started (the replica that started it died before recording the dispatch) finds that run and
starts no other; the run's own failure is the run's, not the dispatch's; a body the feature's contract refuses fails
the dispatch at once; a feature the product does not declare is refused when the manifest is applied. A dispatch to a
job (`dispatch.job`) made again after its job was scheduled finds that job, here too, even with the job's settings
changed by a newer version since."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from ductape.processor.errors import InvalidArgumentError
from ductape.processor.features import FeatureRun
from ductape.processor.jobs import Job
from ductape.processor.v1 import webhook_pb2

from ductape_processor.store import Store
from ductape_processor.store.webhook_records import DispatchEnd
from tests.conftest import Running, ServerFactory
from tests.features_harness import Ops, manifest, op, step
from tests.test_webhooks_dispatch import SECRET, signed

DISPATCHED = webhook_pb2.DISPATCH_STATUS_DISPATCHED
FAILED = webhook_pb2.DISPATCH_STATUS_FAILED
RUN = {"product": "shop", "env": "dev"}
T = TypeVar("T")

PAID = {
    "tag": "paid",
    "input": {"type": {"type": "string", "required": True}, "amount": {"type": "number", "required": True}},
    "sequence": [step("record", op("record", body={"type": "$Input{type}", "amount": "$Input{amount}"}))],
    "output": {"recorded": "$Sequence{record}{record}{n}"},
}


def product(ops: Ops, feature: str = "paid", description: str = "") -> bytes:
    """The harness's product with the feature `paid` (its `description`) and the webhook `payments`, whose receive
    starts `feature`."""
    receive = {"path": "/payments", "secret": "$Secret{PAY}", "dispatch": {"feature": feature}}
    paid = {**PAID, "description": description}
    return manifest(ops.url, paid, webhooks=[{"tag": "payments", "receive": {"dev": receive}}])


async def eventually(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float = 20.0
) -> T:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await read()
        if done(value):
            return value
        assert loop.time() < end, f"{what}: {value}"
        await asyncio.sleep(0.05)


class Replica:
    """A started processor with the product applied, and its webhook listener's URL."""

    def __init__(self, running: Running, base: str) -> None:
        self.running, self.base = running, base

    async def post(self, http: aiohttp.ClientSession, body: bytes, msg_id: str) -> str:
        async with http.post(f"{self.base}/payments", data=body, headers=signed(body, msg_id)) as answer:
            assert answer.status == 200, await answer.text()
            return str((await answer.json())["id"])

    async def dispatch_of(self, received_id: str) -> webhook_pb2.ReceivedDispatch:
        listed = await self.running.client.webhook.list_received(**RUN)
        return next(r.dispatch for r in listed.received if r.id == received_id)

    async def settled(
        self, received_id: str, done: Callable[[webhook_pb2.ReceivedDispatch], bool]
    ) -> webhook_pb2.ReceivedDispatch:
        return await eventually(lambda: self.dispatch_of(received_id), done, "the dispatch did not settle")

    async def runs(self) -> list[FeatureRun]:
        return (await self.running.client.feature.list(**RUN, feature="paid")).runs

    async def jobs(self) -> list[Job]:
        return (await self.running.client.job.list(**RUN)).jobs

    async def ended(self, process_id: str) -> FeatureRun:
        read = lambda: self.running.client.feature.get(**RUN, process_id=process_id)  # noqa: E731
        return await eventually(read, lambda run: run.status not in ("running", "rolling_back"), "the run goes on")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def start(
    start_server: ServerFactory, store_factory: Callable[[], Awaitable[Store]], ops: Ops, tmp_path: Path
) -> Callable[..., Awaitable[Replica]]:
    """Start a replica on the test's store (each on its own connection to one database), the product applied."""
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"PAY={SECRET}\n")

    async def replica(store: Store | None = None, source: bytes | None = None, **settings: Any) -> Replica:
        store = store if store is not None else await store_factory()
        running = await start_server(store=store, secrets_file=secrets_file, **settings)
        await running.client.product.apply(source if source is not None else product(ops))
        listener = running.app.components.webhook_http
        assert listener is not None
        await listener.ensure()
        return Replica(running, f"http://127.0.0.1:{listener.port}/webhooks/shop/dev")

    return replica


async def test_a_signed_webhook_starts_one_run_of_the_feature_with_its_body_as_input(
    start: Callable[..., Awaitable[Replica]], http: aiohttp.ClientSession, ops: Ops
) -> None:
    replica = await start()
    body = b'{"type":"payment.succeeded","amount":12.5}'
    received_id = await replica.post(http, body, "evt_1")
    dispatch = await replica.settled(received_id, lambda d: d.status == DISPATCHED)
    assert dispatch.process_id and dispatch.attempts == 1 and not dispatch.job_id and not dispatch.error
    run = await replica.ended(dispatch.process_id)
    assert (run.feature, run.status, run.input) == ("paid", "completed", {"type": "payment.succeeded", "amount": 12.5})
    assert run.output == {"recorded": 1}
    assert ops.bodies["record"] == [{"type": "payment.succeeded", "amount": 12.5}]
    assert [r.process_id for r in await replica.runs()] == [dispatch.process_id]


async def dying_replica(
    start: Callable[..., Awaitable[Replica]],
    store_factory: Callable[[], Awaitable[Store]],
    monkeypatch: pytest.MonkeyPatch,
    source: bytes,
) -> tuple[Replica, list[DispatchEnd]]:
    """A replica (on its own store) that dies after each dispatch and before its end is written: its ends are lost
    (into the list returned), so the store holds the dispatch pending under a lease (1 s) that runs out, and it is
    made again (by this replica's own claims while it lives, then by another's)."""
    first_store = await store_factory()
    lost: list[DispatchEnd] = []

    async def die_before_recording(ends: list[DispatchEnd]) -> None:
        lost.extend(ends)

    monkeypatch.setattr(first_store, "end_dispatches", die_before_recording)
    return await start(first_store, source=source, webhook_dispatch_lease_s=1.0), lost


async def stop_once_made_again(replica: Replica, lost: list[DispatchEnd], received_id: str) -> None:
    """Wait for the dying replica to lose the first attempt's end and a repeat's (it claimed the dispatch once its
    lease ran out), see the dispatch still pending with nothing made, and stop the replica."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 20
    while len(lost) < 2:
        assert loop.time() < give_up, "the dispatch was not made again"
        await asyncio.sleep(0.05)
    pending = await replica.dispatch_of(received_id)
    assert pending.status == webhook_pb2.DISPATCH_STATUS_PENDING and not pending.process_id and not pending.job_id
    await replica.running.app.stop(grace=0)


async def test_a_dispatch_made_again_after_its_run_started_finds_that_run_and_starts_no_other(
    start: Callable[..., Awaitable[Replica]],
    store_factory: Callable[[], Awaitable[Store]],
    http: aiohttp.ClientSession,
    ops: Ops,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first replica starts the run and dies before its dispatch's end is written, twice.
    first, lost = await dying_replica(start, store_factory, monkeypatch, product(ops))
    body = b'{"type":"payment.succeeded","amount":3}'
    received_id = await first.post(http, body, "evt_again")
    [run] = await eventually(first.runs, lambda runs: len(runs) == 1, "no run started")
    await first.ended(run.process_id)
    await stop_once_made_again(first, lost, received_id)

    # The second replica applies a newer version: the run's request (its version) is not the one the key started,
    # and the dispatch still answers the run the key started.
    second = await start(source=product(ops, description="version 2"), webhook_dispatch_lease_s=1.0)
    dispatch = await second.settled(received_id, lambda d: d.status == DISPATCHED)
    assert dispatch.process_id == run.process_id and dispatch.attempts >= 3
    assert [(r.process_id, r.version) for r in await second.runs()] == [(run.process_id, 1)], "one run, version 1"
    assert ops.count["record"] == 1
    assert all(json.loads(end.result) == {"process_id": run.process_id} for end in lost)


def job_product(ops: Ops, retries: int) -> bytes:
    """The harness's product whose `payments` receive schedules a job calling `hooks:record` (POST /op/hook with the
    body), its failed run retried `retries` times."""
    receive = {
        "path": "/payments",
        "secret": "$Secret{PAY}",
        "dispatch": {"job": {"event": "hooks:record", "retry": {"max_retries": retries}}},
    }
    document = json.loads(manifest(ops.url, PAID, webhooks=[{"tag": "payments", "receive": {"dev": receive}}]))
    record = {"tag": "record", "method": "POST", "path": "/op/hook", "body": "$Input{body}"}
    document["apps"].append({"tag": "hooks", "envs": {"dev": {"base_url": ops.url}}, "actions": [record]})
    return json.dumps(document).encode()


async def test_a_job_dispatch_made_again_with_the_jobs_settings_changed_since_finds_the_job_scheduled_first(
    start: Callable[..., Awaitable[Replica]],
    store_factory: Callable[[], Awaitable[Store]],
    http: aiohttp.ClientSession,
    ops: Ops,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first replica schedules the job and dies before its dispatch's end is written, twice.
    first, lost = await dying_replica(start, store_factory, monkeypatch, job_product(ops, retries=0))
    received_id = await first.post(http, b'{"type":"invoice.paid","amount":7}', "evt_job_again")
    [job] = await eventually(first.jobs, lambda jobs: len(jobs) == 1, "no job scheduled")

    async def hook_calls() -> int:
        return ops.count["hook"]

    await eventually(hook_calls, lambda calls: calls == 1, "the job did not run")
    await stop_once_made_again(first, lost, received_id)

    # The second replica applies a newer version whose receive retries the job: the Schedule request is not the one
    # the key made (IDEMPOTENCY_KEY_REUSED), and the dispatch still answers the job the key scheduled.
    second = await start(source=job_product(ops, retries=3), webhook_dispatch_lease_s=1.0)
    dispatch = await second.settled(received_id, lambda d: d.status == DISPATCHED)
    assert (dispatch.job_id, dispatch.error) == (job.job_id, "") and dispatch.attempts >= 3
    assert [j.job_id for j in await second.jobs()] == [job.job_id], "one job"
    assert ops.count["hook"] == 1 and ops.bodies["hook"] == [{"type": "invoice.paid", "amount": 7}]
    assert all(json.loads(end.result) == {"job_id": job.job_id} for end in lost)


async def test_a_run_that_fails_leaves_its_dispatch_dispatched_and_is_not_started_again(
    start: Callable[..., Awaitable[Replica]], http: aiohttp.ClientSession, ops: Ops
) -> None:
    ops.failures["record"] = 1000
    replica = await start()
    received_id = await replica.post(http, b'{"type":"payment.failed","amount":1}', "evt_fails")
    dispatch = await replica.settled(received_id, lambda d: d.status == DISPATCHED)
    run = await replica.ended(dispatch.process_id)
    assert run.status == "failed" and run.failed_step == "record.record"
    await asyncio.sleep(1.5)  # a dispatch retried would be due 1 s after its failure
    again = await replica.dispatch_of(received_id)
    assert (again.status, again.attempts, again.process_id) == (DISPATCHED, 1, run.process_id)
    assert len(await replica.runs()) == 1 and ops.count["record"] == 1


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"type":"payment.succeeded"}', "amount"),
        (b"[1, 2]", "not a JSON object, which a feature takes"),
        (b'{"type":"x","amount":1,"deep":' + b"[" * 32 + b"]" * 32 + b"}", "nests deeper than 32 levels"),
        (b'{"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a JSON object"),  # past the parser's recursion
    ],
)
async def test_a_body_the_feature_cannot_take_fails_the_dispatch_at_once(
    start: Callable[..., Awaitable[Replica]], http: aiohttp.ClientSession, ops: Ops, body: bytes, says: str
) -> None:
    replica = await start()
    received_id = await replica.post(http, body, "evt_bad")
    failed = await replica.settled(received_id, lambda d: d.status == FAILED)
    assert failed.attempts == 1 and says in failed.error and not failed.process_id
    assert await replica.runs() == [] and ops.count["record"] == 0


async def test_a_body_as_deep_as_a_run_input_may_be_starts_a_run_that_reads_back(
    start: Callable[..., Awaitable[Replica]], http: aiohttp.ClientSession
) -> None:
    replica = await start()
    deep: Any = {}
    for _ in range(31):  # with the body's object, 32 levels
        deep = {"d": deep}
    body = json.dumps({"type": "deep", "amount": 2, "deep": deep["d"]}).encode()
    received_id = await replica.post(http, body, "evt_deep")
    dispatch = await replica.settled(received_id, lambda d: d.status == DISPATCHED)
    run = await replica.ended(dispatch.process_id)
    assert run.status == "completed" and run.input == json.loads(body)
    assert [r.input for r in await replica.runs()] == [json.loads(body)]


async def test_a_feature_the_product_does_not_declare_is_refused_at_apply(
    start: Callable[..., Awaitable[Replica]], ops: Ops
) -> None:
    replica = await start()
    with pytest.raises(InvalidArgumentError) as caught:
        await replica.running.client.product.apply(product(ops, feature="onboarding"))
    assert caught.value.reason == "INVALID_MANIFEST"
    fields = {v.field: v.description for v in caught.value.field_violations}
    assert "'onboarding' is not a feature of the product" in fields["webhooks[0].receive.dev.dispatch.feature"]
