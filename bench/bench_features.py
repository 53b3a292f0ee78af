#!/usr/bin/env python
"""Features: runs/s of a three-step feature at concurrency 32 on the embedded SQLite store and on PostgreSQL, and the
overhead of a feature's step over making the same three calls directly, in one run.

    python bench/bench_features.py [--duration 3] [--rounds 3] [--concurrency 32] [--json FILE]

The feature `three` is a chain of three steps, each of one event: an action (GET on a local upstream, an aiohttp
server started by the script, unpinned, answering a small JSON body), a database read (a SQLite database of the
product, one row by key) and a publish (the in-process broker). A client process runs `FeatureService.Run` with
`wait` back to back from `--concurrency` coroutines for warm-up + duration; runs/s counts the runs that ended
(completed) within the measured window. Every run's steps are recorded in the processor's store (SQLite file, or a
PostgreSQL schema), which is what the two configurations differ in.

Per-step overhead, at concurrency 1 on the SQLite store: the p50 latency of one Run (wait) against the p50 of the
same three calls made directly one after the other (ActionService.Run, DatabaseService.Execute, BrokerService.Publish,
the inputs the feature's templates render), divided by 3; and the processor's CPU per run against its CPU per three
direct calls, divided by 3 (the feature saves two client round trips, so the CPU figure is the fairer one).
Goals: >= 300 runs/s on each store; per-step overhead <= 1 ms.

The processor is pinned to CPU 0 and the client to CPU 1 (`--no-pin`: none); PostgreSQL and the upstream are not.
Without a reachable PostgreSQL (PROCESSOR_TEST_POSTGRES_DSN, default the local `test` database) its configuration is
skipped with a note.

Internal sub-commands (the script runs itself with them): `_client`, `_upstream`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import (
    HOST,
    LoadResult,
    Processes,
    Report,
    bench_parser,
    child_env,
    cpu_seconds,
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
PRODUCT, ENV = "bench", "dev"
RUNS_GOAL = 300.0
STEP_OVERHEAD_GOAL_MS = 1.0
POSTGRES_DSN = os.environ.get("PROCESSOR_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ITEM = {"id": "item-1", "sku": "sku-1", "price": 12}


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    concurrency: int
    pin: bool


def manifest(upstream_port: int) -> dict[str, Any]:
    return {
        "product": PRODUCT,
        "environments": [{"slug": ENV}],
        "apps": [
            {
                "tag": "shop",
                "envs": {ENV: {"base_url": f"http://{HOST}:{upstream_port}"}},
                "retry": {"max": 0},
                "actions": [
                    {
                        "tag": "item",
                        "method": "GET",
                        "path": "/items/:id",
                        "input": {"params": {"id": {"type": "string", "required": True}}},
                    }
                ],
            }
        ],
        "databases": [
            {
                "tag": "main",
                "envs": {ENV: {"type": "sqlite", "path": "bench.db"}},
                "migrations": [
                    {
                        "tag": "stock",
                        "up": [
                            "CREATE TABLE stock (sku TEXT PRIMARY KEY, count INTEGER NOT NULL)",
                            "INSERT INTO stock (sku, count) VALUES ('sku-1', 7)",
                        ],
                    }
                ],
                "actions": [
                    {"tag": "stock", "type": "read", "query": "SELECT sku, count FROM stock WHERE sku = {{sku}}"}
                ],
            }
        ],
        "brokers": [{"tag": "events", "envs": {ENV: {"type": "memory"}}, "topics": [{"tag": "sold", "name": "sold"}]}],
        "features": [
            {
                "tag": "three",
                "input": {"id": {"type": "string", "required": True}},
                "sequence": [
                    {
                        "tag": "fetch",
                        "events": [
                            {
                                "tag": "item",
                                "type": "action",
                                "event": "shop:item",
                                "input": {"params": {"id": "$Input{id}"}},
                            }
                        ],
                    },
                    {
                        "tag": "check",
                        "parents": ["fetch"],
                        "events": [
                            {
                                "tag": "stock",
                                "type": "database_action",
                                "event": "main:stock",
                                "input": {"filter": {"sku": "$Sequence{fetch}{item}{sku}"}},
                            }
                        ],
                    },
                    {
                        "tag": "tell",
                        "parents": ["check"],
                        "events": [
                            {
                                "tag": "sold",
                                "type": "publish",
                                "event": "events:sold",
                                "input": {
                                    "message": {
                                        "sku": "$Sequence{fetch}{item}{sku}",
                                        "left": "$Sequence{check}{stock}{rows}{[0]}{count}",
                                    }
                                },
                            }
                        ],
                    },
                ],
                "output": {"left": "$Sequence{check}{stock}{rows}{[0]}{count}"},
            }
        ],
    }


# -- the upstream ---------------------------------------------------------------------------------------------------


async def serve_upstream(port: int) -> None:
    from aiohttp import web

    body = json.dumps(ITEM).encode()

    async def item(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/items/{id}", item)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    await asyncio.Event().wait()


# -- the clients ----------------------------------------------------------------------------------------------------


async def load(target: str, mode: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    """`features`: Run (wait) back to back; `direct`: the three calls one after the other, as one unit."""
    import grpc
    from ductape.processor.v1 import (
        action_pb2,
        action_pb2_grpc,
        broker_pb2,
        broker_pb2_grpc,
        database_pb2,
        database_pb2_grpc,
        feature_pb2,
        feature_pb2_grpc,
    )
    from google.protobuf import json_format, struct_pb2

    channel = grpc.aio.insecure_channel(target)
    features = feature_pb2_grpc.FeatureServiceStub(channel)
    actions = action_pb2_grpc.ActionServiceStub(channel)
    databases = database_pb2_grpc.DatabaseServiceStub(channel)
    brokers = broker_pb2_grpc.BrokerServiceStub(channel)
    given = struct_pb2.Struct()
    given.update({"id": "item-1"})
    run = feature_pb2.FeatureServiceRunRequest(product=PRODUCT, env=ENV, feature="three", input=given, wait=True)
    params = struct_pb2.Struct()
    params.update({"id": "item-1"})
    item = action_pb2.RunRequest(
        product=PRODUCT, env=ENV, app="shop", event="item", input=action_pb2.ActionInput(params=params)
    )
    where = struct_pb2.Struct()
    where.update({"sku": "sku-1"})
    stock = database_pb2.ExecuteRequest(
        product=PRODUCT, env=ENV, database="main", action="stock", input=database_pb2.DatabaseInput(filter=where)
    )

    async def feature() -> None:
        response = await features.Run(run, timeout=30)
        if response.run.status != feature_pb2.FEATURE_RUN_STATUS_COMPLETED:
            raise RuntimeError(f"the run ended {response.run.status}: {response.run.error_message}")

    async def direct() -> None:
        # What the feature's templates do between its calls: read the item's sku, then the stock's count.
        answer = await actions.Run(item, timeout=30)
        sku = json_format.MessageToDict(answer.json)["sku"]
        read = await databases.Execute(stock, timeout=30)
        message = struct_pb2.Value()
        message.struct_value.update({"sku": sku, "left": read.rows[0]["count"]})
        publish = broker_pb2.PublishRequest(
            product=PRODUCT, env=ENV, event="events:sold", message=broker_pb2.OutgoingMessage(json=message)
        )
        await brokers.Publish(publish, timeout=30)

    result = await timed_load(
        [feature if mode == "features" else direct],
        concurrency,
        duration,
        warmup,
        (grpc.aio.AioRpcError, RuntimeError),
        lambda exc: exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)[:80],
    )
    await channel.close()
    return result


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


def migrate(target: str) -> None:
    from ductape.processor import Processor

    async def run() -> None:
        async with Processor(target, timeout=30) as processor:
            await processor.migration.run(product=PRODUCT, env=ENV, database="main")

    asyncio.run(run())


def start_processor(procs: Processes, work: Path, manifest_path: Path, name: str, store: str) -> Any:
    data_dir = work / f"data-{name}"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    command += ["--store", store, "--store-schema", f"bench_{secrets.token_hex(4)}"] if store != "sqlite" else []
    server = procs.start_server(name, command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(server)
    migrate(server.target)
    return server


def measured(procs: Processes, server: Any, mode: str, concurrency: int, config: Config) -> LoadResult:
    server.check_alive()
    before = cpu_seconds(server.pid)
    arguments = ["--target", server.target, "--mode", mode, "--concurrency", str(concurrency)]
    arguments += ["--duration", str(config.duration), "--warmup", str(config.warmup)]
    run = LoadResult(**procs.run_client(arguments))
    run.server_cpu_s = cpu_seconds(server.pid) - before
    return run


def run_all(procs: Processes, config: Config, work: Path) -> dict[str, list[LoadResult]]:
    upstream_port = free_port()
    procs.start_server(
        "upstream",
        [sys.executable, SCRIPT, "_upstream", "--port", str(upstream_port)],
        f"{HOST}:{upstream_port}",
        child_env(),
    )
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(upstream_port), indent=2))
    stores = [("SQLite", "sqlite")]
    if postgres_reachable():
        stores.append(("PostgreSQL", POSTGRES_DSN))
    else:
        print(f"  PostgreSQL at {POSTGRES_DSN} is not reachable: its configuration is skipped", file=sys.stderr)
    servers = {label: start_processor(procs, work, manifest_path, label.lower(), store) for label, store in stores}
    runs: dict[str, list[LoadResult]] = {}
    for round_no in range(config.rounds):
        plan = [(f"runs {label}", servers[label], "features", config.concurrency) for label, _ in stores]
        plan += [
            ("one run (c=1)", servers["SQLite"], "features", 1),
            ("three calls (c=1)", servers["SQLite"], "direct", 1),
        ]
        for name, server, mode, concurrency in plan:
            run = measured(procs, server, mode, concurrency, config)
            runs.setdefault(name, []).append(run)
            print(
                f"  round {round_no + 1}/{config.rounds}  {name:<22} {run.qps:8.1f}/s  p50 {run.p50_ms:6.2f} ms"
                f"  cpu {run.server_cpu_s * 1e6 / max(1, run.total_calls):7.0f} us each  errors {run.errors}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def _median(runs: list[LoadResult], value: Any) -> float:
    return statistics.median(value(run) for run in runs)


def report(runs: dict[str, list[LoadResult]], config: Config) -> Report:
    pinning = "processor on CPU 0, client on CPU 1" if config.pin else "no CPU pinning"
    load = os.getloadavg()
    lines = [
        "",
        f"FeatureService.Run (wait) of a three-step feature (action, database read, publish); median of"
        f" {config.rounds} round(s) of {config.duration:g} s after {config.warmup:g} s warm-up; {pinning};"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "",
        f"{'measure':<22} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us':>14} {'errors':>7}",
    ]
    figures: dict[str, Any] = {}
    for name, named in runs.items():
        rate = _median(named, lambda r: r.qps)
        p50, p99 = _median(named, lambda r: r.p50_ms), _median(named, lambda r: r.p99_ms)
        cpu = _median(named, lambda r: r.server_cpu_s * 1e6 / max(1, r.total_calls))
        errors = sum(r.errors for r in named)
        figures[name] = {"per_s": rate, "p50_ms": p50, "p99_ms": p99, "server_cpu_us": cpu, "errors": errors}
        lines.append(f"{name:<22} {rate:>9.1f} {p50:>8.2f} {p99:>8.2f} {cpu:>14.0f} {errors:>7}")
    one, three = figures["one run (c=1)"], figures["three calls (c=1)"]
    latency_ms = (one["p50_ms"] - three["p50_ms"]) / 3
    cpu_ms = (one["server_cpu_us"] - three["server_cpu_us"]) / 3 / 1000
    figures["per_step_overhead"] = {"latency_ms": latency_ms, "server_cpu_ms": cpu_ms}
    lines += [
        "",
        f"per-step overhead over the direct calls: latency {latency_ms:+.3f} ms (p50, one run vs three calls),"
        f" server CPU {cpu_ms:+.3f} ms",
        "",
    ]
    for label in ("SQLite", "PostgreSQL"):
        name = f"runs {label}"
        if name in figures:
            rate = figures[name]["per_s"]
            lines.append(
                f"{verdict(rate >= RUNS_GOAL and not figures[name]['errors'])}  {label}: {rate:.0f} runs/s at"
                f" concurrency {config.concurrency} (goal >= {RUNS_GOAL:.0f})"
            )
    worst = max(latency_ms, cpu_ms)
    lines.append(
        f"{verdict(worst <= STEP_OVERHEAD_GOAL_MS)}  per-step overhead {worst:.3f} ms, the larger of latency and CPU"
        f" (goal <= {STEP_OVERHEAD_GOAL_MS:g} ms)"
    )
    data = {
        "config": asdict(config),
        "load_average": load,
        "figures": figures,
        "runs": {name: [asdict(r) for r in named] for name, named in runs.items()},
    }
    return lines, data


# -- command line ---------------------------------------------------------------------------------------------------


def _internal(command: str, rest: list[str]) -> int:
    sub = argparse.ArgumentParser(prog=command)
    if command == "_upstream":
        sub.add_argument("--port", type=int, required=True)
        asyncio.run(serve_upstream(sub.parse_args(rest).port))
        return 0
    sub.add_argument("--target", required=True)
    sub.add_argument("--mode", choices=("features", "direct"), required=True)
    sub.add_argument("--concurrency", type=int, required=True)
    for name in ("duration", "warmup"):
        sub.add_argument(f"--{name}", type=float, required=True)
    args = sub.parse_args(rest)
    return emit(asyncio.run(load(args.target, args.mode, args.concurrency, args.duration, args.warmup)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_client"], ["_upstream"]):
        return _internal(argv[0], argv[1:])
    parser = bench_parser(__doc__)
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight (default 32)")
    args = parse_bench_args(parser, argv)
    config = Config(args.duration, args.warmup, args.rounds, args.concurrency, pinnable(args.pin))
    return run_and_report(
        SCRIPT, config.pin, lambda procs, work: report(run_all(procs, config, work), config), args.json
    )


if __name__ == "__main__":
    sys.exit(main())
