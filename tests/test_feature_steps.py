"""Every step type of a feature runs its resource through that kind's own runtime: a database action, an action, a
notification, a storage save, a publish, a job, a webhook emit and another feature, in one run, with what each
answered piped into the run's output."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from tests.conftest import ServerFactory
from tests.features_harness import Ops, manifest, op, step

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes, ok?!!").decode()


def event(tag: str, kind: str, address: str, input: Any, **fields: Any) -> dict[str, Any]:
    return {"tag": tag, "type": kind, "event": address, "input": input, **fields}


def resources(ops: Ops) -> dict[str, Any]:
    return {
        "databases": [
            {
                "tag": "main",
                "envs": {"dev": {"type": "sqlite", "path": "features.db"}},
                "migrations": [{"tag": "users", "up": ["CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT)"]}],
                "actions": [
                    {
                        "tag": "add",
                        "type": "create",
                        "query": "INSERT INTO users (id, email) VALUES (:id, :email)",
                        "params": {"id": "$Input{data}{id}", "email": "$Input{data}{email}"},
                    },
                    {"tag": "find", "type": "read", "query": "SELECT id, email FROM users WHERE email = {{email}}"},
                ],
            }
        ],
        "notifications": [
            {
                "tag": "users",
                "envs": {"dev": {"email": {"provider": "log"}}},
                "messages": [{"tag": "welcome", "email": {"subject": "Hi {{name}}", "text": "Hello {{name}}"}}],
            }
        ],
        "storage": [{"tag": "files", "envs": {"dev": {"provider": "fs"}}}],
        "webhooks": [
            {
                "tag": "orders",
                "events": [{"tag": "paid", "schema": {"orderId": {"type": "string", "required": True}}}],
                "endpoints": {"dev": [{"url": f"{ops.url}/op/hook", "secret": "$Secret{ORDERS_SECRET}"}]},
            }
        ],
    }


async def test_one_run_calls_every_kind_of_resource_and_pipes_their_answers(
    start_server: ServerFactory, ops: Ops, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"ORDERS_SECRET={SECRET}\n")
    running = await start_server(secrets_file=secrets)
    child = {"tag": "child", "sequence": [step("c", op("nested", body="$Input"))], "output": "$Sequence{c}{nested}"}
    everything = {
        "tag": "everything",
        "input": {"id": {"type": "string", "required": True}, "email": {"type": "email", "required": True}},
        "sequence": [
            step(
                "db",
                event("add", "database_action", "main:add", {"data": {"id": "$Input{id}", "email": "$Input{email}"}}),
            ),
            step(
                "after",
                event("find", "database_action", "main:find", {"filter": {"email": "$Input{email}"}}),
                op("mail-api", body={"to": "$Input{email}"}),
                event(
                    "mail",
                    "notification",
                    "users:welcome",
                    {"email": {"to": ["$Input{email}"], "variables": {"name": "$Input{id}"}}},
                ),
                event(
                    "save",
                    "storage",
                    "files",
                    {"file_name": "users/$Input{id}.txt", "content_type": "text/plain", "text": "hello $Input{id}"},
                ),
                event("pub", "publish", "events:done", {"message": {"id": "$Input{id}"}}),
                event("job", "job", "publish:events:done", {"input": {"message": {"later": True}}, "delay": 0}),
                event("hook", "webhook", "orders:paid", {"orderId": "$Input{id}"}),
                event("child", "feature", "child", {"id": "$Input{id}"}),
                parents=["db"],
            ),
        ],
        "output": {
            "found": "$Sequence{after}{find}{rows}{[0]}{email}",
            "child": "$Sequence{after}{child}",
            "file": "$Sequence{after}{save}{file_name}",
            "job": "$Sequence{after}{job}{job_id}",
        },
    }
    await running.client.product.apply(manifest(ops.url, everything, child, **resources(ops)))
    await running.client.migration.run(product="shop", env="dev", database="main")
    done = await running.client.feature.run(
        product="shop", env="dev", feature="everything", input={"id": "u1", "email": "ada@example.com"}, wait=True
    )
    assert done.status == "completed", (done.error_reason, done.error_message)
    assert done.output["found"] == "ada@example.com"
    assert done.output["child"] == {"name": "nested", "n": 1}
    assert done.output["file"] == "users/u1.txt"
    calls = {step.event: step.call.output for step in done.steps if step.call is not None}
    assert calls["add"]["affected_rows"] == 1
    assert calls["mail"]["channels"] == [{"channel": "email", "success": True, "error_reason": ""}]
    assert calls["pub"]["message_id"] and calls["hook"]["message_id"].startswith("msg_")
    assert ops.bodies["nested"] == [{"id": "u1"}] and ops.bodies["mail-api"] == [{"to": "ada@example.com"}]
    saved = await running.client.storage.read(product="shop", env="dev", event="files", file_name="users/u1.txt")
    assert saved.data == b"hello u1"
    job = await running.client.job.get(product="shop", env="dev", job_id=done.output["job"])
    assert job.kind == "publish" and job.input == {"message": {"later": True}}
    async with asyncio.timeout(10):
        while not ops.count["hook"]:
            await asyncio.sleep(0.05)
    assert json.loads(json.dumps(ops.bodies["hook"][0]))["data"] == {"orderId": "u1"}
    children = [r async for r in running.client.feature.runs(product="shop", env="dev", feature="child")]
    assert [r.parent_process_id for r in children] == [done.process_id]


async def test_a_job_runs_a_feature_and_waits_for_its_end(start_server: ServerFactory, ops: Ops) -> None:
    ops.failures["broken"] = 99
    running = await start_server()
    works = {"tag": "works", "sequence": [step("a", op("hello", body="$Input"))], "output": "$Sequence{a}{hello}{n}"}
    fails = {"tag": "fails", "sequence": [step("a", op("broken"))]}
    declared = {"tag": "nightly", "target": {"kind": "feature", "event": "works"}, "repeat": {"cron": "0 3 * * *"}}
    await running.client.product.apply(manifest(ops.url, works, fails, jobs=[declared]))
    ok = await running.client.job.schedule(product="shop", env="dev", kind="feature", event="works", input={"n": 7})
    bad = await running.client.job.schedule(product="shop", env="dev", kind="feature", event="fails")

    async def ended(job_id: str) -> Any:
        async with asyncio.timeout(10):
            while True:
                runs = (await running.client.job.list_runs(product="shop", env="dev", job_id=job_id)).runs
                if runs and runs[0].status in ("succeeded", "failed"):
                    return runs[0]
                await asyncio.sleep(0.05)

    done, failed = await ended(ok.job_id), await ended(bad.job_id)
    assert done.status == "succeeded" and done.result["status"] == "completed" and done.result["output"] == 1
    run = await running.client.feature.get(product="shop", env="dev", process_id=done.result["process_id"])
    assert run.feature == "works" and run.input == {"n": 7} and ops.bodies["hello"] == [{"n": 7}]
    assert failed.status == "failed" and failed.error_reason == "FEATURE_RUN_FAILED"
    nightly = await running.client.job.get(product="shop", env="dev", name="nightly")
    assert (nightly.kind, nightly.event, nightly.declared) == ("feature", "works", True)
