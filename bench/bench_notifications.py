#!/usr/bin/env python
"""Notifications: emails/s sent through NotificationService.Send to a local SMTP server, side by side with the same
emails sent by aiosmtplib directly, with the same number of SMTP connections, in one run.

    python bench/bench_notifications.py [--duration 3] [--rounds 3] [--connections 4] [--json FILE]

The SMTP server is aiosmtpd on loopback (no TLS, no login), accepting every message, started by the script. The
processor (`ductape-processor serve`, SQLite store, no API key, no OTLP) serves a manifest whose `users:welcome`
message has a subject, an HTML and a text part with one `{{name}}` placeholder, sent through `smtp` with
`pool_size: --connections`. The direct client keeps the same number of aiosmtplib connections and builds each
email with the processor's own MIME code (`adapters/notify/smtp.py`), so both paths pay the same for it.

What is measured, `--rounds` times interleaved (the median of the rounds is shown): emails/s at concurrency 32,
through the processor and directly. Goal: processor >= 0.7x direct.

The processor is pinned to CPU 0 and the clients to CPU 1 (`--no-pin`: none); the SMTP server is not pinned, so on
a two-CPU machine it shares both: the figures compare the two paths on the same machine.

Internal sub-commands (the script runs itself with them): `_client`, `_smtp-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import (
    CALL_TIMEOUT_S,
    HOST,
    LoadResult,
    Processes,
    Report,
    bench_parser,
    child_env,
    emit,
    free_port,
    parse_bench_args,
    pinnable,
    processor_command,
    run_and_report,
    timed_load,
    verdict,
    wait_ready,
)

SCRIPT = str(Path(__file__).resolve())
PRODUCT, ENV, EVENT = "bench", "dev", "users:welcome"
SENDER, RECIPIENT = "Shop <shop@example.com>", "Ada <ada@example.com>"
SUBJECT, HTML, TEXT = "Welcome, {{name}}", "<p>Hello {{name}}, your account is ready.</p>", "Hello {{name}}."
RATIO_GOAL = 0.7
CONCURRENCY = 32


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    connections: int
    pin: bool


def manifest(smtp_port: int, connections: int) -> dict[str, Any]:
    email = {"host": HOST, "port": smtp_port, "tls": "none", "sender": SENDER, "pool_size": connections}
    message = {"tag": "welcome", "email": {"subject": SUBJECT, "html": HTML, "text": TEXT}}
    notification = {"tag": "users", "envs": {ENV: {"email": email}}, "messages": [message]}
    return {"product": PRODUCT, "environments": [{"slug": ENV}], "notifications": [notification]}


# -- the SMTP server (a subprocess) ---------------------------------------------------------------------------------


async def serve_smtp(port: int) -> None:
    from aiosmtpd.smtp import SMTP as SmtpServer

    class Accept:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SmtpServer(Accept(), hostname="bench"), HOST, port)
    async with server:
        await server.serve_forever()


# -- the load generators (subprocesses) -----------------------------------------------------------------------------


async def load_processor(target: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    import grpc
    from ductape.processor.v1 import notification_pb2, notification_pb2_grpc

    request = notification_pb2.SendRequest(product=PRODUCT, env=ENV, event=EVENT, retries=0)
    request.email.to.append(RECIPIENT)
    request.email.variables.update({"name": "Ada"})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = notification_pb2_grpc.NotificationServiceStub(channel)

        async def send() -> object:
            reply = await stub.Send(request, timeout=CALL_TIMEOUT_S)
            if not reply.results[0].success:
                raise RuntimeError(reply.results[0].error_reason)
            return reply

        await send()
        return await timed_load(
            [send], concurrency, duration, warmup, (grpc.aio.AioRpcError, RuntimeError), lambda e: str(e)[:40]
        )


def build(name: str) -> bytes:
    """The email the processor sends, built by the processor's own MIME code (the direct path pays the same)."""
    from email.headerregistry import Address

    from ductape_processor.adapters.notify.base import OutgoingEmail
    from ductape_processor.adapters.notify.smtp import build_message

    to = (Address("Ada", "ada", "example.com"),)
    subject, html, text = (t.replace("{{name}}", name) for t in (SUBJECT, HTML, TEXT))
    return build_message(
        OutgoingEmail(to, (), (), subject, html, text, (), "bench"), Address("Shop", "shop", "example.com")
    )


async def load_direct(smtp_port: int, connections: int, concurrency: int, duration: float, warmup: float) -> LoadResult:
    import aiosmtplib

    idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
    for _ in range(connections):
        client = aiosmtplib.SMTP(hostname=HOST, port=smtp_port, start_tls=False, timeout=CALL_TIMEOUT_S)
        await client.connect()
        idle.put_nowait(client)

    async def send() -> object:
        client = await idle.get()
        try:
            return await client.sendmail("shop@example.com", ["ada@example.com"], build("Ada"))
        finally:
            idle.put_nowait(client)

    try:
        await send()
        return await timed_load([send], concurrency, duration, warmup, aiosmtplib.SMTPException, type)
    finally:
        while not idle.empty():
            idle.get_nowait().close()


# -- orchestration --------------------------------------------------------------------------------------------------


def run_all(procs: Processes, config: Config, work: Path) -> dict[str, list[LoadResult]]:
    smtp_port = free_port()
    smtp = procs.start_server(
        "smtp", [sys.executable, SCRIPT, "_smtp-server", "--port", str(smtp_port)], f"{HOST}:{smtp_port}", child_env()
    )
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(smtp_port, config.connections), indent=2))
    data_dir = work / "data-processor"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    processor = procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(processor)
    runs: dict[str, list[LoadResult]] = {"processor": [], "direct": []}
    for round_no in range(config.rounds):
        for path in ["processor", "direct"] if round_no % 2 == 0 else ["direct", "processor"]:
            arguments = ["--path", path, "--target", processor.target, "--smtp-port", str(smtp_port)]
            arguments += ["--connections", str(config.connections), "--concurrency", str(CONCURRENCY)]
            arguments += ["--duration", str(config.duration), "--warmup", str(config.warmup)]
            processor.check_alive()
            smtp.check_alive()
            run = LoadResult(**procs.run_client(arguments))
            runs[path].append(run)
            errors = f", {run.errors} errors {run.error_codes}" if run.errors else ""
            print(
                f"  round {round_no + 1}/{config.rounds}  {path:<9} c={CONCURRENCY} {run.qps:8.1f} emails/s"
                f"  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms{errors}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def report(runs: dict[str, list[LoadResult]], config: Config) -> Report:
    pinning = "processor on CPU 0, clients on CPU 1, SMTP server unpinned" if config.pin else "no CPU pinning"
    figures = {
        path: {
            "emails_per_s": statistics.median(r.qps for r in path_runs),
            "p50_ms": statistics.median(r.p50_ms for r in path_runs),
            "p99_ms": statistics.median(r.p99_ms for r in path_runs),
            "errors": sum(r.errors for r in path_runs),
        }
        for path, path_runs in runs.items()
    }
    ratio = figures["processor"]["emails_per_s"] / max(figures["direct"]["emails_per_s"], 1e-9)
    lines = [
        "",
        f"NotificationService.Send (one email over SMTP) vs aiosmtplib directly, {config.connections} connections each,"
        f" concurrency {CONCURRENCY}; median of {config.rounds} round(s) of {config.duration:g} s after"
        f" {config.warmup:g} s warm-up; {pinning}",
        "",
        f"{'path':<9} {'emails/s':>9} {'p50 ms':>8} {'p99 ms':>8}",
        *(
            f"{path:<9} {f['emails_per_s']:>9.0f} {f['p50_ms']:>8.2f} {f['p99_ms']:>8.2f}"
            for path, f in figures.items()
        ),
        "",
        f"{verdict(ratio >= RATIO_GOAL)}  emails/s {ratio:.3f}x direct (goal >= {RATIO_GOAL:.1f}x)",
    ]
    errors = sum(f["errors"] for f in figures.values())
    if errors:
        lines.append(f"ERROR: {errors} failed sends (see --json)")
    data = {
        "config": asdict(config),
        "figures": figures,
        "ratio": ratio,
        "runs": {path: [asdict(r) for r in path_runs] for path, path_runs in runs.items()},
    }
    return lines, data


# -- command line ---------------------------------------------------------------------------------------------------


def _internal(command: str, rest: list[str]) -> int:
    sub = argparse.ArgumentParser(prog=command)
    if command == "_smtp-server":
        sub.add_argument("--port", type=int, required=True)
        asyncio.run(serve_smtp(sub.parse_args(rest).port))
        return 0
    sub.add_argument("--path", required=True)
    sub.add_argument("--target", required=True)
    for name in ("smtp-port", "connections", "concurrency"):
        sub.add_argument(f"--{name}", type=int, required=True)
    for name in ("duration", "warmup"):
        sub.add_argument(f"--{name}", type=float, required=True)
    args = sub.parse_args(rest)
    if args.path == "processor":
        load = load_processor(args.target, args.concurrency, args.duration, args.warmup)
    else:
        load = load_direct(args.smtp_port, args.connections, args.concurrency, args.duration, args.warmup)
    return emit(asyncio.run(load))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_client"], ["_smtp-server"]):
        return _internal(argv[0], argv[1:])
    parser = bench_parser(__doc__)
    parser.add_argument("--connections", type=int, default=4, help="SMTP connections of each path (default 4)")
    args = parse_bench_args(parser, argv)
    config = Config(args.duration, args.warmup, args.rounds, args.connections, pinnable(args.pin))
    return run_and_report(
        SCRIPT, config.pin, lambda procs, work: report(run_all(procs, config, work), config), args.json
    )


if __name__ == "__main__":
    sys.exit(main())
