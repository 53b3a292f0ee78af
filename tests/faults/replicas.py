"""Real `ductape-processor serve` processes on one PostgreSQL schema, for the fault tests that kill or count them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ductape.processor import Processor

from tests.conftest import POSTGRES_DSN, ROOT


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    client: Processor
    drain: asyncio.Task[None]


async def serve(manifest: Path, schema: str, data_dir: Path, env: Mapping[str, str] | None = None) -> Replica:
    """Start `ductape-processor serve` on a free loopback port and wait until it says it is serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ductape_processor.cli",
        "serve",
        "--address",
        "127.0.0.1:0",
        "--manifest",
        str(manifest),
        env={
            **os.environ,
            "PROCESSOR_STORE": POSTGRES_DSN,
            "PROCESSOR_STORE_SCHEMA": schema,
            "PROCESSOR_DATA_DIR": str(data_dir),
            **(env or {}),
        },
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stderr is not None
    port = 0
    while not port:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, "the replica exited before serving"
        entry = json.loads(line)
        if entry.get("message") == "serving":
            port = int(entry["port"])

    async def drain() -> None:  # keep the pipe from filling up
        assert process.stderr is not None
        while await process.stderr.readline():
            pass

    return Replica(process, Processor(f"127.0.0.1:{port}", timeout=10), asyncio.create_task(drain()))
