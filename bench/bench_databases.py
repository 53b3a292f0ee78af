#!/usr/bin/env python
"""Database actions: DatabaseService.Execute of a primary-key read through the processor, side by side with the
same read made by the driver directly, on PostgreSQL (asyncpg) and MariaDB (asyncmy).

    python bench/bench_databases.py [--duration 3] [--rounds 3] [--systems postgresql mysql] [--json FILE]

The local servers are used (PostgreSQL 127.0.0.1:5432 database `test`, MariaDB 127.0.0.1:3306 database `test`); a
table `bench_db_<random>` with one row is created in each and dropped at the end. The processor
(`ductape-processor serve`, SQLite store, no API key, no OTLP) serves a manifest with one database per system whose
action `by_id` is `SELECT id, email, name FROM <table> WHERE id = :id` (`single: true`), pool of 10 connections.
The direct client uses a pool of the same size and runs the same SQL with the driver's placeholder.

What is measured, in one run, for each system, `--rounds` times interleaved (the median of the rounds is shown):

1. QPS at concurrency 32: Execute through the processor vs the driver directly. Goal: processor >= 0.6x direct.
2. Added latency at concurrency 1: p50 through the processor minus p50 direct. Goal: <= +1.0 ms.

The processor is pinned to CPU 0 and the clients to CPU 1 (`--no-pin`: none); the database servers are not pinned
(they are the machine's own services), so their CPU is shared with both: the figures compare the two paths on
the same machine, they are not the database's capacity.

Internal sub-command (the script runs itself with it): `_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
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
PRODUCT, ENV, ACTION = "bench", "dev", "by_id"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "database": "test"}
MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
POOL = 10
QPS_RATIO_GOAL = 0.6
P50_ADDED_GOAL_MS = 1.0
GOAL_CONCURRENCY = 32


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    systems: list[str]
    pin: bool


# -- the tables -----------------------------------------------------------------------------------------------------


async def _postgres(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _mysql(sql: str) -> None:
    import asyncmy

    conn = await asyncmy.connect(**MYSQL, autocommit=True)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql)
    finally:
        conn.close()


def create_tables(table: str, systems: list[str]) -> None:
    ddl = f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, email VARCHAR(100), name VARCHAR(100))"
    row = f"INSERT INTO {table} VALUES (1, 'ada@example.com', 'Ada Lovelace')"
    for system in systems:
        run = _postgres if system == "postgresql" else _mysql
        asyncio.run(run(ddl))
        asyncio.run(run(row))


def drop_tables(table: str, systems: list[str]) -> None:
    for system in systems:
        run = _postgres if system == "postgresql" else _mysql
        try:
            asyncio.run(run(f"DROP TABLE IF EXISTS {table}"))
        except Exception as exc:  # the benchmark's answer matters more than the clean-up
            print(f"could not drop {table} on {system}: {exc}", file=sys.stderr)


def manifest(table: str, systems: list[str]) -> dict[str, Any]:
    envs = {
        "postgresql": {"type": "postgresql", "url": POSTGRES_DSN, "pool": {"min": POOL, "max": POOL}},
        "mysql": {"type": "mysql", "url": MYSQL_URL, "pool": {"min": 0, "max": POOL}},
    }
    action = {
        "tag": ACTION,
        "type": "read",
        "single": True,
        "query": f"SELECT id, email, name FROM {table} WHERE id = :id",
        "params": {"id": "$Input{filter}{id}"},
    }
    databases = [{"tag": system, "envs": {ENV: envs[system]}, "actions": [action]} for system in systems]
    return {"product": PRODUCT, "environments": [{"slug": ENV}], "databases": databases}


# -- the load generators (subprocesses) -----------------------------------------------------------------------------


async def load_processor(target: str, database: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    import grpc
    from ductape.processor.v1 import database_pb2, database_pb2_grpc

    request = database_pb2.ExecuteRequest(product=PRODUCT, env=ENV, database=database, action=ACTION)
    request.input.filter.update({"id": 1})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = database_pb2_grpc.DatabaseServiceStub(channel)
        reply = await stub.Execute(request, timeout=CALL_TIMEOUT_S)
        if len(reply.rows) != 1 or reply.rows[0]["email"] != "ada@example.com":
            raise RuntimeError(f"the processor answered {reply}")
        return await timed_load(
            [lambda: stub.Execute(request, timeout=CALL_TIMEOUT_S)],
            concurrency,
            duration,
            warmup,
            grpc.aio.AioRpcError,
            lambda exc: exc.code().name,
        )


async def load_direct(table: str, system: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    if system == "postgresql":
        import asyncpg

        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=POOL, max_size=POOL)
        sql = f"SELECT id, email, name FROM {table} WHERE id = $1"

        async def read() -> object:
            return await pool.fetchrow(sql, 1, timeout=CALL_TIMEOUT_S)

        try:
            await read()
            return await timed_load([read], concurrency, duration, warmup, asyncpg.PostgresError, type)
        finally:
            await pool.close()
    import asyncmy

    my_pool = await asyncmy.create_pool(**MYSQL, minsize=POOL, maxsize=POOL, autocommit=True)
    my_sql = f"SELECT id, email, name FROM {table} WHERE id = %s"

    async def my_read() -> object:
        async with my_pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(my_sql, (1,))
            return await cursor.fetchall()

    try:
        await my_read()
        return await timed_load([my_read], concurrency, duration, warmup, asyncmy.errors.MySQLError, type)
    finally:
        my_pool.close()
        await my_pool.wait_closed()


# -- orchestration --------------------------------------------------------------------------------------------------


def run_all(procs: Processes, config: Config, work: Path, table: str) -> dict[str, dict[str, list[LoadResult]]]:
    """(system -> path -> runs), the processor and direct runs interleaved, rounds alternating which goes first."""
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(table, config.systems), indent=2))
    data_dir = work / "data-processor"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    processor = procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(processor)
    runs: dict[str, dict[str, list[LoadResult]]] = {s: {"processor": [], "direct": []} for s in config.systems}
    for round_no in range(config.rounds):
        for system in config.systems:
            for concurrency in (1, GOAL_CONCURRENCY):
                paths = ["processor", "direct"] if round_no % 2 == 0 else ["direct", "processor"]
                for path in paths:
                    arguments = ["--path", path, "--system", system, "--table", table, "--target", processor.target]
                    arguments += ["--concurrency", str(concurrency), "--duration", str(config.duration)]
                    arguments += ["--warmup", str(config.warmup)]
                    processor.check_alive()
                    run = LoadResult(**procs.run_client(arguments))
                    runs[system][path].append(run)
                    errors = f", {run.errors} errors {run.error_codes}" if run.errors else ""
                    print(
                        f"  round {round_no + 1}/{config.rounds}  {system:<10} {path:<9} c={concurrency:<3}"
                        f" {run.qps:8.1f} QPS  p50 {run.p50_ms:6.3f} ms  p99 {run.p99_ms:6.3f} ms{errors}",
                        file=sys.stderr,
                        flush=True,
                    )
    return runs


def _median(runs: list[LoadResult], concurrency: int, field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs if r.concurrency == concurrency)


def report(runs: dict[str, dict[str, list[LoadResult]]], config: Config) -> Report:
    pinning = "processor on CPU 0, clients on CPU 1" if config.pin else "no CPU pinning"
    lines = [
        "",
        f"DatabaseService.Execute of a primary-key read (single row) vs the driver directly; median of {config.rounds}"
        f" round(s) of {config.duration:g} s after {config.warmup:g} s warm-up; pools of {POOL}; {pinning}",
        f"goals: QPS >= {QPS_RATIO_GOAL:.1f}x direct at concurrency {GOAL_CONCURRENCY}; p50 <= +{P50_ADDED_GOAL_MS:g}"
        " ms at concurrency 1",
        "",
        f"{'system':<10} {'path':<9} {'c=32 QPS':>9} {'p50 ms c=1':>10} {'p99 ms c=1':>10}",
    ]
    data: dict[str, Any] = {"config": asdict(config), "systems": {}}
    verdicts: list[str] = []
    for system, by_path in runs.items():
        figures = {
            path: {
                "qps": _median(path_runs, GOAL_CONCURRENCY, "qps"),
                "p50_ms": _median(path_runs, 1, "p50_ms"),
                "p99_ms": _median(path_runs, 1, "p99_ms"),
                "errors": sum(r.errors for r in path_runs),
            }
            for path, path_runs in by_path.items()
        }
        for path, f in figures.items():
            lines.append(f"{system:<10} {path:<9} {f['qps']:>9.0f} {f['p50_ms']:>10.3f} {f['p99_ms']:>10.3f}")
        ratio = figures["processor"]["qps"] / max(figures["direct"]["qps"], 1e-9)
        added = figures["processor"]["p50_ms"] - figures["direct"]["p50_ms"]
        verdicts += [
            f"{verdict(ratio >= QPS_RATIO_GOAL)}  {system}: QPS {ratio:.3f}x direct at concurrency {GOAL_CONCURRENCY}"
            f" (goal >= {QPS_RATIO_GOAL:.1f}x)",
            f"{verdict(added <= P50_ADDED_GOAL_MS)}  {system}: p50 {added:+.3f} ms over direct at concurrency 1"
            f" (goal <= +{P50_ADDED_GOAL_MS:g} ms)",
        ]
        errors = sum(f["errors"] for f in figures.values())
        if errors:
            verdicts.append(f"ERROR: {system}: {errors} failed calls (see --json)")
        data["systems"][system] = {
            "figures": figures,
            "qps_ratio": ratio,
            "p50_added_ms": added,
            "runs": {path: [asdict(r) for r in path_runs] for path, path_runs in by_path.items()},
        }
    lines += ["", *verdicts]
    return lines, data


def run_benchmark(config: Config, json_path: Path | None) -> int:
    table = f"bench_db_{secrets.token_hex(4)}"

    def measure_all(procs: Processes, work: Path) -> Report:
        print(f"creating {table} and starting the processor ...", file=sys.stderr, flush=True)
        create_tables(table, config.systems)
        return report(run_all(procs, config, work, table), config)

    return run_and_report(SCRIPT, config.pin, measure_all, json_path, after=lambda: drop_tables(table, config.systems))


# -- command line ---------------------------------------------------------------------------------------------------


def _internal(rest: list[str]) -> int:
    sub = argparse.ArgumentParser(prog="_client")
    for name, kind in (("path", str), ("system", str), ("table", str), ("target", str)):
        sub.add_argument(f"--{name}", type=kind, required=True)
    for name, number in (("concurrency", int), ("duration", float), ("warmup", float)):
        sub.add_argument(f"--{name}", type=number, required=True)
    args = sub.parse_args(rest)
    if args.path == "processor":
        load = load_processor(args.target, args.system, args.concurrency, args.duration, args.warmup)
    else:
        load = load_direct(args.table, args.system, args.concurrency, args.duration, args.warmup)
    return emit(asyncio.run(load))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return _internal(argv[1:])
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--systems", nargs="+", choices=["postgresql", "mysql"], default=["postgresql", "mysql"], help="(default both)"
    )
    args = parse_bench_args(parser, argv)
    config = Config(args.duration, args.warmup, args.rounds, list(dict.fromkeys(args.systems)), pinnable(args.pin))
    return run_benchmark(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
