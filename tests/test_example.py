"""The example product as `make run` serves it: its action reaches the example mailer stub."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from collections.abc import AsyncIterator
from types import ModuleType

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import EXAMPLE, ROOT, ServerFactory


def _stub_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailer_stub", ROOT / "examples" / "mailer_stub.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def mailer_stub() -> AsyncIterator[None]:
    server = TestServer(_stub_module().make_app(), host="127.0.0.1", port=8025)
    try:
        await server.start_server()
    except OSError as exc:
        pytest.skip(f"port 8025, which the example manifest names, is taken: {exc}")
    yield
    await server.close()


async def test_the_example_action_runs_through_the_processor(start_server: ServerFactory, mailer_stub: None) -> None:
    running = await start_server(manifests=[EXAMPLE], secrets_file=ROOT / "examples" / "secrets.env")
    result = await running.client.action.run(
        product="shop",
        env="development",
        app="mailer",
        event="send_welcome",
        input={"params": {"template": "welcome"}, "body": {"email": "ada@example.com", "userId": "u-1"}},
    )
    assert result.status_code == 202
    assert result.body["to"] == "ada@example.com" and result.body["template"] == "welcome"
    assert result.body["queued"] is True


async def test_the_example_heartbeat_job_publishes_to_its_topic(start_server: ServerFactory) -> None:
    running = await start_server(manifests=[EXAMPLE], secrets_file=ROOT / "examples" / "secrets.env")
    job = await running.client.job.get(product="shop", env="dev", name="heartbeat")
    assert (job.declared, job.kind, job.event) == (True, "publish", "events:heartbeat")
    for _ in range(200):  # `every` with no start: the first occurrence is due when the job is declared
        runs = (await running.client.job.list_runs(product="shop", env="dev", job_id=job.job_id)).runs
        if runs and runs[0].status == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert runs[0].status == "succeeded", runs
    assert runs[0].result["message_id"], "the run's result is the published message's id"
    following = (await running.client.job.get(product="shop", env="dev", job_id=job.job_id)).next_run_at
    assert following is not None and (following - runs[0].due_at).total_seconds() == 60, "then every minute"


async def test_the_readme_first_calls_work(start_server: ServerFactory, mailer_stub: None) -> None:
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    running = await start_server(manifests=[EXAMPLE], secrets_file=ROOT / "examples" / "secrets.env")
    listener = running.app.components.webhook_http
    assert listener is not None and listener.port, "the example declares a receive path: the listener serves"
    code = code.replace("127.0.0.1:50051", running.address).replace("asyncio.run(main())", "")
    code = code.replace("127.0.0.1:8090", f"127.0.0.1:{listener.port}")
    code = code.replace('"examples/shop.yaml"', repr(str(EXAMPLE)))
    printed: list[tuple[object, ...]] = []
    namespace: dict[str, object] = {"print": lambda *values: printed.append(values)}
    exec(compile(code, "README.md", "exec"), namespace)
    await namespace["main"]()  # type: ignore[operator]
    version, checksum = printed[0]
    assert version == 1 and isinstance(checksum, str) and re.fullmatch(r"[0-9a-f]{64}", checksum), printed[0]
    assert printed[1][:2] == (202, "msg-1") and isinstance(printed[1][2], str) and printed[1][2], printed[1]
    assert printed[2] == ({"userId": "u-1"}, 1)
    assert printed[3] == (13, "text/plain")
    assert printed[4] == (["notes/hello.txt"],)
    assert printed[5] == (b"Hello, files!", "text/plain")
    assert printed[6] == (1, "Ada"), "the user added to the example's SQLite database is found"
    assert printed[7] == ([("email", True, "log"), ("sms", True, "log")],), "the welcome notification is sent"
    assert printed[8] == ("succeeded", 202), "the one-off job ran the action"
    assert printed[9] == ("cancelled", None), "the repeating job is cancelled"
    assert printed[10] == (True, "scheduled", "publish"), "the example declares a repeating job"
    assert printed[11] == (204, 1), "the emitted webhook was delivered, signed, to the stub's endpoint"
    assert printed[12] == ("evt_1", {"id": "pay_1"}), "the signed POST arrived on the Receive stream"
    assert printed[13] == ("completed", "u-7"), "the signup feature ran, waited for"
    assert printed[14] == ("completed", ["completed"] * 4), "the second run, watched to its end"
    assert printed[15] == (False, 1), "applying the same manifest again creates no version"
    assert printed[16] == ("PRODUCT_NOT_FOUND", {"product": "blog"})
    assert len(printed) == 17
    # What the README says each print shows (its trailing comment, `...` standing for the rest) is what it shows.
    promised = re.findall(r"^\s*print\(.*\)  # (.+)$", code, re.MULTILINE)
    lines = [" ".join(str(value) for value in values) for values in printed]
    assert len(promised) == 15, promised
    for comment in promised:
        assert any(_shows(line, comment) for line in lines), (comment, lines)


def _shows(line: str, comment: str) -> bool:
    """True when `line` is what `comment` promises: `...` stands for anything, a trailing `(…)` is prose."""
    promise = re.sub(r"\s*\([^)]*\)$", "", comment)
    return re.fullmatch(".*".join(re.escape(part) for part in promise.split("...")), line) is not None
