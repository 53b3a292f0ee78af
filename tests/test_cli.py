"""The console script as an operator runs it: a real process, real signals, real exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from ductape.processor import Processor

from tests.conftest import EXAMPLE, ROOT
from tests.test_server import health_status

COMMAND = [sys.executable, "-m", "ductape_processor.cli"]


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_serve_applies_manifests_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--address",
        "127.0.0.1:0",
        "--manifest",
        str(EXAMPLE.parent),
        env={**os.environ, "PROCESSOR_DATA_DIR": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stderr is not None
    logs: list[dict[str, object]] = []
    try:
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"the server exited early: {logs}"
            logs.append(json.loads(line))
            if logs[-1]["message"] == "serving":
                break
        port = logs[-1]["port"]
        assert logs[-1]["store"] == "sqlite"
        assert any(entry["message"] == "manifest applied" and entry["product"] == "shop" for entry in logs)
        address = f"127.0.0.1:{port}"
        assert await health_status(address) == 1
        async with Processor(address) as client:
            assert (await client.product.get("shop", env="production")).version.version == 1
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 30)
        messages = [json.loads(line)["message"] for line in rest.decode().splitlines() if line.startswith("{")]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert messages[:3] == ["shutdown requested", "draining", "stopped"]
    assert (tmp_path / "processor.db").exists()


async def test_serve_refuses_an_exposed_bind_with_a_clear_message(tmp_path: Path) -> None:
    code, _, err = await run("serve", "--address", "0.0.0.0:50999", env={"PROCESSOR_DATA_DIR": str(tmp_path)})
    assert code == 2
    assert "refusing to serve" in err and "--insecure" in err
    assert "Traceback" not in err


async def test_serve_reports_invalid_configuration(tmp_path: Path) -> None:
    code, _, err = await run("serve", env={"PROCESSOR_MAX_MESSAGE_BYTES": "lots", "PROCESSOR_DATA_DIR": str(tmp_path)})
    assert code != 0
    assert "invalid configuration" in err and "max_message_bytes" in err
    assert "Traceback" not in err


async def test_serve_refuses_an_invalid_manifest_listing_its_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("product: shop\nenvironments: [{slug: dev}]\nqueues: []\n")
    code, _, err = await run(
        "serve", "--address", "127.0.0.1:0", "--manifest", str(bad), env={"PROCESSOR_DATA_DIR": str(tmp_path)}
    )
    assert code == 2
    assert "queues: unknown field" in err
    assert "Traceback" not in err


async def test_validate_and_hash_key_commands(tmp_path: Path) -> None:
    code, out, _ = await run("validate", str(EXAMPLE))
    assert code == 0 and "valid (product shop" in out
    bad = tmp_path / "bad.json"
    bad.write_text('{"product": "shop", "environments": []}')
    code, out, _ = await run("validate", str(bad))
    assert code == 1 and "environments:" in out
    process = await asyncio.create_subprocess_exec(
        *COMMAND, "hash-key", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out_bytes, _ = await process.communicate(b"s3cret\n")
    assert out_bytes.decode().strip() == hashlib.sha256(b"s3cret").hexdigest()
