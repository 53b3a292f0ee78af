#!/usr/bin/env python
"""Webhooks: deliveries/s from WebhookService.Emit to a local endpoint with one and with two processor processes,
and the latency from a signed POST on the webhook listener to a Receive stream's subscriber.

    python bench/bench_webhooks.py [--duration 3] [--rounds 3] [--fanout 10] [--json FILE]

The endpoint is an aiohttp server on loopback (started by the script, unpinned) that answers every delivery 204 and
notes when each arrived. The processors (`ductape-processor serve`, no API key, no OTLP) serve a manifest whose
`orders:paid` event goes to `--fanout` endpoints (paths of that server), so one Emit makes `--fanout` deliveries and
the deliveries, not the emits, are what saturates the processor. A client emits back to back (concurrency 16) for
warm-up + duration; deliveries/s is what reached the endpoint within the measured window (a processor that cannot
keep up builds a backlog and the figure is its throughput). Configurations: one process on the embedded SQLite
store, one on PostgreSQL, two sharing one PostgreSQL schema (each emit goes to one of them in turn; each delivery is
claimed by one). Goal: >= 1,000 deliveries/s per process. Beside it, the processors' CPU time per delivery over each
round (emits, claims and store writes included): a figure the machine's other load moves less than throughput.

Receive: one processor (SQLite, memory broker), a Receive stream open on the webhook `payments`; the client POSTs
Standard-Webhooks-signed bodies one after another (each waits for the previous to reach the stream) and measures
POST start -> arrival on the stream. Goal: p99 <= 20 ms.

The processors are pinned to CPU 0 and the clients to CPU 1 (`--no-pin`: none; with two processors both share
CPU 0); PostgreSQL and the endpoint are not pinned. Without a reachable PostgreSQL (PROCESSOR_TEST_POSTGRES_DSN,
default the local `test` database) the PostgreSQL configurations are skipped with a note.

Internal sub-commands (the script runs itself with them): `_client`, `_endpoint`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    LoadResult,
    Processes,
    Report,
    Server,
    bench_parser,
    child_env,
    cpu_seconds,
    emit,
    free_port,
    load_result,
    parse_bench_args,
    pinnable,
    processor_command,
    run_and_report,
    verdict,
    wait_ready,
)

SCRIPT = str(Path(__file__).resolve())
PRODUCT, ENV = "bench", "dev"
SECRET = "whsec_" + base64.b64encode(b"bench webhook secret, 32 bytes!!").decode()
DELIVERIES_GOAL = 1000.0
P99_GOAL_MS = 20.0
EMIT_CONCURRENCY = 16
POSTGRES_DSN = os.environ.get("PROCESSOR_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    fanout: int
    pin: bool


def manifest(endpoint_port: int, fanout: int) -> dict[str, Any]:
    endpoints = [
        {"url": f"http://{HOST}:{endpoint_port}/hook/{n}", "secret": "$Secret{BENCH_HOOK}"} for n in range(fanout)
    ]
    return {
        "product": PRODUCT,
        "environments": [{"slug": ENV, "allow_private_endpoints": True}],
        "brokers": [{"tag": "events", "envs": {ENV: {"type": "memory"}}, "topics": [{"tag": "paid", "name": "paid"}]}],
        "webhooks": [
            {"tag": "orders", "events": [{"tag": "paid"}], "endpoints": {ENV: endpoints}},
            {
                "tag": "payments",
                "receive": {
                    ENV: {"path": "/payments", "secret": "$Secret{BENCH_HOOK}", "dispatch": {"publish": "events:paid"}}
                },
            },
        ],
    }


# -- the endpoint ---------------------------------------------------------------------------------------------------


async def serve_endpoint(port: int) -> None:
    """Answers deliveries 204; GET /arrivals?since=&until= counts those that arrived in that window (epoch s)."""
    from aiohttp import web

    arrivals: list[float] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        arrivals.append(time.time())
        return web.Response(status=204)

    async def count(request: web.Request) -> web.Response:
        since, until = float(request.query["since"]), float(request.query["until"])
        return web.json_response({"count": sum(1 for t in arrivals if since <= t <= until), "total": len(arrivals)})

    app = web.Application()
    app.router.add_post("/hook/{n}", hook)
    app.router.add_get("/arrivals", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    await asyncio.Event().wait()


# -- the clients ----------------------------------------------------------------------------------------------------


async def load_emits(targets: list[str], endpoint_port: int, duration: float, warmup: float) -> dict[str, Any]:
    """Emit back to back for warmup + duration; the deliveries that reached the endpoint in the measured window."""
    import aiohttp
    import grpc
    from ductape.processor.v1 import webhook_pb2, webhook_pb2_grpc
    from google.protobuf import struct_pb2

    channels = [grpc.aio.insecure_channel(target) for target in targets]
    stubs = [webhook_pb2_grpc.WebhookServiceStub(channel) for channel in channels]
    payload = struct_pb2.Value()
    payload.struct_value.update({"orderId": "o-1", "amount": 42})
    emitted = 0
    begin = time.time()
    window = (begin + warmup, begin + warmup + duration)

    async def worker(index: int) -> None:
        nonlocal emitted
        stub = stubs[index % len(stubs)]
        request = webhook_pb2.EmitRequest(product=PRODUCT, env=ENV, event="orders:paid", payload=payload)
        while time.time() < window[1]:
            await stub.Emit(request, timeout=30)
            emitted += 1

    await asyncio.gather(*(worker(i) for i in range(EMIT_CONCURRENCY)))
    await asyncio.sleep(max(0.0, window[1] + 0.5 - time.time()))
    async with aiohttp.ClientSession() as http:
        url = f"http://{HOST}:{endpoint_port}/arrivals?since={window[0]}&until={window[1]}"
        async with http.get(url) as response:
            counted = await response.json()
    for channel in channels:
        await channel.close()
    return {"deliveries_per_s": counted["count"] / duration, "emits": emitted, "delivered_total": counted["total"]}


def signed(body: bytes, msg_id: str) -> dict[str, str]:
    stamp = str(int(time.time()))
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/json",
    }


async def load_receive(target: str, listener: str, duration: float, warmup: float) -> LoadResult:
    """POST signed webhooks one at a time; each one's latency from POST start to its arrival on a Receive stream."""
    import aiohttp
    from ductape.processor import Processor

    processor = Processor(target, timeout=30)
    stream = processor.webhook.receive(product=PRODUCT, env=ENV, webhook="payments", group="bench", max_wait=0)
    arrivals = aiter(stream)
    first = asyncio.ensure_future(anext(arrivals))
    await asyncio.sleep(0.5)  # the group exists before the first webhook is published
    latencies: list[float] = []
    errors: dict[str, int] = {}
    total = 0
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + duration)
    pending: asyncio.Future[Any] | None = first
    async with aiohttp.ClientSession() as http:
        while time.perf_counter() < window[1]:
            body = json.dumps({"n": total}).encode()
            started = time.perf_counter()
            async with http.post(listener, data=body, headers=signed(body, f"evt_{secrets.token_hex(8)}")) as answer:
                if answer.status != 200:
                    errors[str(answer.status)] = errors.get(str(answer.status), 0) + 1
                    continue
            received = await asyncio.wait_for(pending if pending is not None else anext(arrivals), 10)
            pending = None
            finished = time.perf_counter()
            await received.ack()
            total += 1
            if window[0] <= finished <= window[1]:
                latencies.append(finished - started)
    await stream.close()
    await processor.close()
    return load_result(latencies, errors, 1, duration, total, 0.0, time.perf_counter() - begin)


# -- the run --------------------------------------------------------------------------------------------------------


def postgres_reachable() -> bool:
    import asyncpg

    async def check() -> bool:
        try:
            conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(check())


def start_processors(
    procs: Processes, work: Path, manifest_path: Path, name: str, count: int, store: str
) -> list[tuple[Server, str]]:
    """`count` processors on `store` (each one's server and webhook listener URL), SERVING."""
    secrets_path = work / "secrets.env"
    secrets_path.write_text(f"BENCH_HOOK={SECRET}\n")
    schema = f"bench_{secrets.token_hex(4)}"
    started = []
    for n in range(count):
        data_dir = work / f"data-{name}-{n}"
        data_dir.mkdir()
        port, http_port = free_port(), free_port()
        command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
        command += ["--secrets-file", str(secrets_path), "--webhook-http-address", f"{HOST}:{http_port}"]
        command += ["--store", store, "--store-schema", schema] if store != "sqlite" else []
        server = procs.start_server(f"{name}-{n}", command, f"{HOST}:{port}", child_env(data_dir))
        wait_ready(server)
        started.append((server, f"http://{HOST}:{http_port}/webhooks/{PRODUCT}/{ENV}/payments"))
    return started


def run_all(procs: Processes, config: Config, work: Path) -> tuple[dict[str, list[dict[str, Any]]], list[LoadResult]]:
    endpoint_port = free_port()
    endpoint = procs.start_server(
        "endpoint",
        [sys.executable, SCRIPT, "_endpoint", "--port", str(endpoint_port)],
        f"{HOST}:{endpoint_port}",
        child_env(),
    )
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(endpoint_port, config.fanout), indent=2))
    setups = [("1 process, SQLite", 1, "sqlite")]
    if postgres_reachable():
        setups += [("1 process, PostgreSQL", 1, POSTGRES_DSN), ("2 processes, PostgreSQL", 2, POSTGRES_DSN)]
    else:
        print(f"  PostgreSQL at {POSTGRES_DSN} is not reachable: its configurations are skipped", file=sys.stderr)
    deliveries: dict[str, list[dict[str, Any]]] = {}
    delivered = 0  # the endpoint's count of every delivery so far (it serves every configuration)
    for index, (name, count, store) in enumerate(setups):
        processors = start_processors(procs, work, manifest_path, f"setup{index}", count, store)
        targets = ",".join(server.target for server, _ in processors)
        deliveries[name] = []
        for round_no in range(config.rounds):
            endpoint.check_alive()
            arguments = ["--mode", "emit", "--targets", targets, "--endpoint-port", str(endpoint_port)]
            arguments += ["--duration", str(config.duration), "--warmup", str(config.warmup)]
            cpu_before = sum(cpu_seconds(server.pid) for server, _ in processors)
            run = procs.run_client(arguments)
            # The processors' CPU over the whole round (warm-up and tail included) per delivery made in it.
            cpu = sum(cpu_seconds(server.pid) for server, _ in processors) - cpu_before
            run["cpu_ms_per_delivery"] = 1000 * cpu / max(1, run["delivered_total"] - delivered)
            delivered = run["delivered_total"]
            deliveries[name].append(run)
            print(
                f"  round {round_no + 1}/{config.rounds}  {name:<24} {run['deliveries_per_s']:8.0f} deliveries/s"
                f"  ({run['emits']} emits x {config.fanout}; {run['cpu_ms_per_delivery']:.3f} CPU ms a delivery)",
                file=sys.stderr,
                flush=True,
            )
    server, listener = start_processors(procs, work, manifest_path, "receive", 1, "sqlite")[0]
    target = server.target
    receives = []
    for round_no in range(config.rounds):
        arguments = ["--mode", "receive", "--targets", target, "--listener", listener]
        arguments += ["--duration", str(config.duration), "--warmup", str(config.warmup)]
        run = LoadResult(**procs.run_client(arguments))
        receives.append(run)
        print(
            f"  round {round_no + 1}/{config.rounds}  receive -> stream  p50 {run.p50_ms:6.2f} ms"
            f"  p99 {run.p99_ms:6.2f} ms  ({run.calls} webhooks)",
            file=sys.stderr,
            flush=True,
        )
    return deliveries, receives


def report(runs: tuple[dict[str, list[dict[str, Any]]], list[LoadResult]], config: Config) -> Report:
    deliveries, receives = runs
    pinning = "processors on CPU 0, clients on CPU 1" if config.pin else "no CPU pinning"
    lines = [
        "",
        f"WebhookService.Emit -> deliveries to a local endpoint (fan-out {config.fanout}, emit concurrency"
        f" {EMIT_CONCURRENCY}); median of {config.rounds} round(s) of {config.duration:g} s after {config.warmup:g} s"
        f" warm-up; {pinning}",
        "",
        f"{'configuration':<26} {'deliveries/s':>12} {'per process':>12} {'CPU ms/delivery':>16}",
    ]
    figures: dict[str, Any] = {}
    verdicts = []
    for name, setup_runs in deliveries.items():
        rate = statistics.median(r["deliveries_per_s"] for r in setup_runs)
        per_process = rate / (2 if name.startswith("2") else 1)
        cpu_ms = statistics.median(r["cpu_ms_per_delivery"] for r in setup_runs)
        figures[name] = {"deliveries_per_s": rate, "per_process": per_process, "cpu_ms_per_delivery": cpu_ms}
        lines.append(f"{name:<26} {rate:>12.0f} {per_process:>12.0f} {cpu_ms:>16.3f}")
        verdicts.append(
            f"{verdict(per_process >= DELIVERIES_GOAL)}  {name}: {per_process:.0f} deliveries/s per process"
            f" (goal >= {DELIVERIES_GOAL:.0f})"
        )
    p50 = statistics.median(r.p50_ms for r in receives)
    p99 = statistics.median(r.p99_ms for r in receives)
    figures["receive"] = {"p50_ms": p50, "p99_ms": p99, "errors": sum(r.errors for r in receives)}
    lines += [
        "",
        f"signed POST -> Receive stream: p50 {p50:.2f} ms, p99 {p99:.2f} ms (one webhook at a time)",
        "",
        *verdicts,
        f"{verdict(p99 <= P99_GOAL_MS)}  receive -> subscriber p99 {p99:.2f} ms (goal <= {P99_GOAL_MS:.0f} ms)",
    ]
    data = {
        "config": asdict(config),
        "figures": figures,
        "runs": {"deliveries": deliveries, "receive": [asdict(r) for r in receives]},
    }
    return lines, data


# -- command line ---------------------------------------------------------------------------------------------------


def _internal(command: str, rest: list[str]) -> int:
    sub = argparse.ArgumentParser(prog=command)
    if command == "_endpoint":
        sub.add_argument("--port", type=int, required=True)
        asyncio.run(serve_endpoint(sub.parse_args(rest).port))
        return 0
    sub.add_argument("--mode", choices=("emit", "receive"), required=True)
    sub.add_argument("--targets", required=True)
    sub.add_argument("--endpoint-port", type=int, default=0)
    sub.add_argument("--listener", default="")
    for name in ("duration", "warmup"):
        sub.add_argument(f"--{name}", type=float, required=True)
    args = sub.parse_args(rest)
    if args.mode == "emit":
        result = asyncio.run(load_emits(args.targets.split(","), args.endpoint_port, args.duration, args.warmup))
        print(json.dumps(result))
        return 0
    return emit(asyncio.run(load_receive(args.targets, args.listener, args.duration, args.warmup)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_client"], ["_endpoint"]):
        return _internal(argv[0], argv[1:])
    parser = bench_parser(__doc__)
    parser.add_argument("--fanout", type=int, default=10, help="endpoints each emit goes to (default 10)")
    args = parse_bench_args(parser, argv)
    config = Config(args.duration, args.warmup, args.rounds, args.fanout, pinnable(args.pin))
    return run_and_report(
        SCRIPT, config.pin, lambda procs, work: report(run_all(procs, config, work), config), args.json
    )


if __name__ == "__main__":
    sys.exit(main())
