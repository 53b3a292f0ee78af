"""Callers in Java and Go, built from the protos alone (clients/smoke), against a processor serving the example.

Each builds with clients/smoke/build.sh (protoc and the toolchains Debian packages; nothing is downloaded) and makes
the README's first calls: an action run with Struct input, a Subscribe stream (init, ready, batch, ack, half-close),
and a missing product's error with its google.rpc.ErrorInfo decoded from the status details. Without a toolchain this
skips; under CI=true it fails (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests import test_example
from tests.conftest import EXAMPLE, ROOT, ServerFactory, _missing

BUILD = ROOT / "clients" / "smoke" / "build.sh"
mailer_stub = test_example.mailer_stub  # the example's mailer API, which the action calls

TOOLCHAINS = {
    "java": (["protoc", "javac", "java"], ["/usr/bin/grpc_java_plugin", "/usr/share/java/grpc-netty.jar"]),
    "go": (
        ["protoc", "go", "protoc-gen-go", "protoc-gen-go-grpc"],
        ["/usr/share/gocode/src/google.golang.org/grpc", "/usr/share/gocode/src/google.golang.org/protobuf"],
    ),
}
EXPECTED = {
    "java": ["run 202 msg-1", 'message {"userId":"u-1"} 1', "error NOT_FOUND PRODUCT_NOT_FOUND blog"],
    "go": ["run 202 msg-1", 'message {"userId":"u-1"} 1', "error NotFound PRODUCT_NOT_FOUND blog"],
}


def toolchain(language: str) -> None:
    commands, paths = TOOLCHAINS[language]
    absent = [name for name in commands if shutil.which(name) is None] + [p for p in paths if not Path(p).exists()]
    if absent:
        _missing(f"the {language} smoke caller needs {', '.join(absent)} (see clients/smoke/build.sh for the packages)")


async def command(*args: str, timeout: float = 600) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, env=os.environ.copy(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(args)} failed ({process.returncode}):\n{text}"
    return text


@pytest.mark.parametrize("language", ["java", "go"])
async def test_a_caller_built_from_the_protos_alone_makes_the_first_calls(
    language: str, start_server: ServerFactory, mailer_stub: None, tmp_path: Path
) -> None:
    toolchain(language)
    out = tmp_path / language
    await command("bash", str(BUILD), language, str(out))
    running = await start_server(manifests=[EXAMPLE], secrets_file=ROOT / "examples" / "secrets.env")
    if language == "java":
        classpath = (out / "classpath").read_text().strip()
        output = await command("java", "-cp", classpath, "Smoke", running.address, timeout=120)
    else:
        output = await command(str(out / "smoke"), running.address, timeout=120)
    lines = [line for line in output.splitlines() if line.startswith(("run ", "message ", "error "))]
    assert lines == EXPECTED[language], output
