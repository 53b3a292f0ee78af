"""The process's threads but the event loop's run at `helper_thread_nice`: read from /proc of a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_cli import COMMAND
from tests.test_server import health_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _nice_values(pid: int) -> dict[int, int]:
    values: dict[int, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue  # the thread ended
        values[int(task)] = int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19: nice
    return values


def test_lower_helper_threads_lowers_every_thread_but_the_callers_and_never_raises_one() -> None:
    script = textwrap.dedent(
        """
        import os, threading
        from ductape_processor.threads import lower_helper_threads
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait)
        lower = threading.Thread(target=stop.wait)
        helper.start(); lower.start()
        os.setpriority(os.PRIO_PROCESS, lower.native_id, 15)
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        changed = lower_helper_threads(base + 5)
        print(changed, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - base,
              os.getpriority(os.PRIO_PROCESS, helper.native_id) - base,
              os.getpriority(os.PRIO_PROCESS, lower.native_id))
        print(lower_helper_threads(0))
        stop.set()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    first, second = out.stdout.splitlines()
    changed, own, helper, lower = (int(v) for v in first.split())
    assert (own, helper) == (0, 5)  # the caller keeps its priority, the helper is lowered by 5
    assert lower == max(15, os.getpriority(os.PRIO_PROCESS, 0) + 5)  # one already lower is left lower
    assert changed >= 1
    assert second == "0"  # 0: nothing changed


async def _serving(tmp_path: Path, nice: str) -> tuple[asyncio.subprocess.Process, list[dict[str, object]]]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--address",
        "127.0.0.1:0",
        env={**os.environ, "PROCESSOR_DATA_DIR": str(tmp_path), "PROCESSOR_HELPER_THREAD_NICE": nice},
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stderr is not None
    logs: list[dict[str, object]] = []
    while not logs or logs[-1]["message"] != "serving":
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"the server exited early: {logs}"
        logs.append(json.loads(line))
    return process, logs


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.communicate(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("nice", ["7", "0"])
async def test_a_server_runs_its_other_threads_below_the_event_loop(tmp_path: Path, nice: str) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    process, logs = await _serving(tmp_path, nice)
    try:
        assert await health_status(f"127.0.0.1:{logs[-1]['port']}") == 1  # serving, its signal handlers set
        expected = max(own, int(nice))
        for _ in range(100):  # lowered right after start-up, just after "serving" is logged
            values = _nice_values(process.pid)
            helpers = {tid: value for tid, value in values.items() if tid != process.pid}
            if helpers and all(value == expected for value in helpers.values()):
                break
            await asyncio.sleep(0.05)
        assert values[process.pid] == own  # the event loop's thread (the main one) keeps its priority
        assert len(helpers) >= 2  # gRPC's poller and event engine, SQLite's writer
        assert set(helpers.values()) == {expected}
    finally:
        await _stop(process)
    assert process.returncode == 0
