"""The `docker run` examples of docs/deployment.md start a serving processor, run without Docker.

Each fenced block marked `docker-example` is run by bash as written, with `docker` defined as a function that only
records its arguments. The recorded `docker run` is then turned into what the image would run: the Dockerfile's
final-stage `ENV`, `ENTRYPOINT` and `CMD`, the `-e` variables and the `-v` mounts (container paths mapped to host
folders). Only the bind address changes, to a free loopback port; the documented address is checked separately
against the exposure rules through the CLI's own settings parser. The process must report SERVING and stop with
status 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ductape_processor import cli
from tests.conftest import ROOT

DEPLOYMENT = ROOT / "docs" / "deployment.md"
DOCKERFILE = ROOT / "Dockerfile"
BIN = ROOT / ".venv" / "bin"
MARK = "docker-example"


def examples() -> list[str]:
    """The marked fenced blocks of deployment.md, in order."""
    return re.findall(rf"^```sh {MARK}\n(.*?)^```$", DEPLOYMENT.read_text(), flags=re.S | re.M)


def dockerfile_image() -> tuple[dict[str, str], list[str], list[str]]:
    """The final stage's ENV, ENTRYPOINT and CMD."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", final, flags=re.M):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.*)$", final, flags=re.M)[-1])
    command = json.loads(re.findall(r"^CMD (.*)$", final, flags=re.M)[-1])
    return env, entrypoint, command


@dataclass
class DockerRun:
    """A `docker run` command line, as the processor's image would execute it."""

    env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> source (host path or volume name)
    argv: list[str] = field(default_factory=list)


def parse_docker_run(args: list[str]) -> DockerRun:
    assert args[0] == "run", args
    image_env, entrypoint, command = dockerfile_image()
    run = DockerRun(env=dict(image_env))
    rest = args[1:]
    with_value = {"--name", "-p", "--publish", "--stop-timeout", "-v", "--volume", "-e", "--env"}
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        value = rest.pop(0) if option in with_value else ""
        if option in ("-e", "--env"):
            key, has_value, text = value.partition("=")
            run.env[key] = text if has_value else os.environ[key]
        elif option in ("-v", "--volume"):
            source, target = value.split(":")[:2]
            run.mounts[target] = source
        else:
            assert option in with_value | {"-d", "--rm", "--detach"}, f"the test does not know docker's {option}"
    image, *arguments = rest
    assert image == "ductape-processor"
    run.argv = entrypoint + (arguments or command)
    return run


def _self_signed(directory: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir()
    (directory / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def record_docker_runs(block: str, workdir: Path) -> list[list[str]]:
    """Run the block in bash from `workdir`; `docker` records its arguments instead of running anything."""
    records = workdir / "docker-calls"
    records.mkdir()
    # One file per call, arguments NUL-separated: exactly the words bash passed, whatever they contain.
    shim = f'docker() {{ printf "%s\\0" "$@" > {shlex.quote(str(records))}/$((++docker_calls)); }}\n'
    env = {**os.environ, "API_KEY": "the-api-key", "PWD": str(workdir)}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "docker_calls=0\n" + shim + block],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    calls = sorted(records.iterdir(), key=lambda path: int(path.name))
    return [path.read_text().split("\0")[:-1] for path in calls]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def host_path(run: DockerRun, value: str, volumes: Path) -> str:
    """A container path in `value` mapped to where its mount lives on this machine."""
    for target, source in sorted(run.mounts.items(), key=lambda item: -len(item[0])):
        if value == target or value.startswith(target + "/"):
            base = source if source.startswith("/") else str(volumes / source)
            return base + value[len(target) :]
    return value


async def health(address: str, credentials: grpc.ChannelCredentials | None, server_name: str) -> int:
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
        )
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return -1
        return int(response.status)


def test_the_deployment_doc_marks_both_docker_examples() -> None:
    blocks = examples()
    assert len(blocks) == 2
    assert all("docker run" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(examples())))
async def test_a_documented_docker_run_serves_and_stops_cleanly(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "examples").symlink_to(ROOT / "examples")
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    _self_signed(workdir / "tls", "processor.example.internal")
    [args] = record_docker_runs(examples()[index], workdir)
    run = parse_docker_run(args)
    volumes = tmp_path / "volumes"
    for source in run.mounts.values():
        if not source.startswith("/"):  # a named volume
            (volumes / source).mkdir(parents=True, exist_ok=True)
    env = {key: host_path(run, value, volumes) for key, value in run.env.items()}
    argv = [host_path(run, arg, volumes) for arg in run.argv]

    # The documented address, exactly as given, passes the exposure rules (the CLI's own parsing).
    for key in [k for k in os.environ if k.startswith("PROCESSOR_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    documented = cli.settings_from_args(cli._parser().parse_args(argv[1:]))
    assert documented.exposure_problems() == [], documented.address

    port = free_port()
    env["PROCESSOR_ADDRESS"] = f"127.0.0.1:{port}"
    env.setdefault("PROCESSOR_WEBHOOK_HTTP_ADDRESS", "127.0.0.1:0")  # a container's own loopback: any free port here
    process = await asyncio.create_subprocess_exec(
        str(BIN / argv[0]),
        *argv[1:],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        stderr=asyncio.subprocess.PIPE,
    )
    credentials = None
    if "PROCESSOR_TLS_CERT" in env:
        credentials = grpc.ssl_channel_credentials(Path(env["PROCESSOR_TLS_CERT"]).read_bytes())
    server_name = env.get("DUCTAPE_HEALTHCHECK_SERVER_NAME", "127.0.0.1")
    try:
        status = -1
        for _ in range(100):
            if process.returncode is not None:
                break
            status = await health(f"127.0.0.1:{port}", credentials, server_name)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING, f"exit status {process.returncode}"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
    assert "refusing" not in log and '"stopped"' in log, log
