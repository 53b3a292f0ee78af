#!/usr/bin/env python
"""Jobs: JobService.Schedule throughput, triggers (occurrences run) per second, and lateness, on PostgreSQL with one
and with two processor processes sharing the store.

    python bench/bench_jobs.py [--duration 3] [--processes 1 2] [--triggers 4000] [--rate 200] [--json FILE]

Each processor is `ductape-processor serve` on a fresh PostgreSQL schema (`PROCESSOR_STORE`, default the local
`postgresql://postgres@127.0.0.1:5432/test`; `--dsn` to change it) with a product whose jobs publish to an in-process
(`memory`) topic: a target that costs next to nothing, so the figures are the scheduler's and the store's.

- schedules/s: 32 coroutines call Schedule (one-off jobs due in a day) back to back for `--duration` seconds, spread
  over the processes; side by side with a bare grpc.aio server answering the same ScheduleResponse bytes (the
  floor: gRPC and the client alone).
- triggers/s: `--triggers` one-off jobs per process, all due at one moment after the whole batch is scheduled; the
  figure is how many runs ended per second from that moment until the last one ended (read from the store).
- lateness: jobs due at `--rate` per second for 10 s, the first after the whole batch is scheduled; the start - due
  of each run (from the store), p50 and p99.

The due moments of both batches are set by the client once it is connected (its own start-up, which a loaded
machine can stretch to seconds, does not eat the lead), with a lead of twice the time the batch takes at the measured
Schedule rate; a job stored after its due moment (the lead was too short after all) is counted and reported, as its
lateness would be the bench's, not the scheduler's.
- CPU: the processor processes' CPU time (from /proc) per Schedule call (warm-up included) and per triggered run
  (from the batch's last Schedule until its last run ended): the figure a loaded machine disturbs least.

Goals (issue "Jobs"): >= 1,000 schedules/s and >= 5,000 triggers/s per process, lateness p99 <= 50 ms at 200 due
jobs/s. For reference, Dapr v1.17's scheduler is quoted at 600 schedules/s and 12,700 triggers/s on a cluster.
Processes are not pinned: PostgreSQL takes a share of the same two CPUs, and that share is part of the figure.

Internal sub-commands (the script runs itself with them): `_bare-server`, `_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import (
    CALL_TIMEOUT_S,
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
    parse_bench_args,
    percentile,
    processor_command,
    run_and_report,
    serve_canned_command,
    timed_load,
    verdict,
    wait_ready,
)

SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.JobService"
DSN = "postgresql://postgres@127.0.0.1:5432/test"
PRODUCT, ENV, TOPIC = "bench", "dev", "events:ticks"
CONCURRENCY = 32
LATENESS_SECONDS = 10

SCHEDULE_GOAL = 1000.0  # schedules/s per process
TRIGGER_GOAL = 5000.0  # triggers/s per process
LATENESS_P99_GOAL_MS = 50.0


def manifest() -> dict[str, Any]:
    broker = {"tag": "events", "envs": {ENV: {"type": "memory"}}, "topics": [{"tag": "ticks", "name": "ticks"}]}
    return {"product": PRODUCT, "environments": [{"slug": ENV}], "brokers": [broker]}


def schedule_request(name: str, due: float) -> Any:
    from ductape.processor.v1 import job_pb2

    request = job_pb2.JobServiceScheduleRequest(
        product=PRODUCT,
        env=ENV,
        name=name,
        target=job_pb2.JobTarget(kind=job_pb2.TARGET_KIND_PUBLISH, address=TOPIC),
    )
    request.target.input.update({"message": {"n": name}})
    request.start_at.FromNanoseconds(int(due * 1e9))
    return request


# -- the client subprocess -------------------------------------------------------------------------------------------


async def schedule_load(targets: list[str], duration: float, warmup: float) -> LoadResult:
    """CONCURRENCY coroutines calling Schedule back to back, spread over `targets`."""
    import grpc
    from ductape.processor.v1 import job_pb2_grpc

    channels = [grpc.aio.insecure_channel(target) for target in targets]
    stubs = [job_pb2_grpc.JobServiceStub(channel) for channel in channels]
    due = time.time() + 86400
    counter = iter(range(10**9))

    def caller(stub: Any) -> Any:
        return lambda: stub.Schedule(schedule_request(f"s-{next(counter)}", due), timeout=CALL_TIMEOUT_S)

    try:
        calls = [caller(stub) for stub in stubs]
        return await timed_load(calls, CONCURRENCY, duration, warmup, grpc.aio.AioRpcError, lambda e: e.code().name)
    finally:
        for channel in channels:
            await channel.close()


async def schedule_batch(targets: list[str], prefix: str, count: int, lead: float, rate: float) -> dict[str, float]:
    """Schedule `count` jobs (CONCURRENCY at a time, as fast as the processes take them): the first due `lead` seconds
    after the channels are ready, then `rate` per second (0: all at that moment)."""
    import grpc
    from ductape.processor.v1 import job_pb2_grpc

    channels = [grpc.aio.insecure_channel(target) for target in targets]
    stubs = [job_pb2_grpc.JobServiceStub(channel) for channel in channels]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
    started = time.monotonic()
    first = time.time() + lead
    queue = iter(enumerate(first + (n / rate if rate else 0.0) for n in range(count)))

    async def worker() -> None:
        for n, due in queue:
            await stubs[n % len(stubs)].Schedule(schedule_request(f"{prefix}-{n}", due), timeout=CALL_TIMEOUT_S)

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        for channel in channels:
            await channel.close()
    return {"seconds": time.monotonic() - started, "first_due": first}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_jobs.py _client")
    parser.add_argument("mode", choices=["load", "batch"])
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--prefix", default="b")
    parser.add_argument("--count", type=int, default=0, help="the batch's jobs")
    parser.add_argument("--lead", type=float, default=0.0, help="seconds from the client's start to the first due")
    parser.add_argument("--rate", type=float, default=0.0, help="due jobs per second (0: all due at once)")
    args = parser.parse_args(argv)
    if args.mode == "load":
        return emit(asyncio.run(schedule_load(args.targets, args.duration, args.warmup)))
    batch = schedule_batch(args.targets, args.prefix, args.count, args.lead, args.rate)
    print(json.dumps(asyncio.run(batch)))
    return 0


# -- the store's view ------------------------------------------------------------------------------------------------


@dataclass
class Runs:
    ended: int
    first_due: float
    last_end: float
    lateness_ms: list[float]
    stored_late: int
    """Jobs of the batch stored after their due moment: their lateness is the bench's, not the scheduler's."""


async def read_runs(dsn: str, schema: str, prefix: str) -> Runs:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"""SELECT EXTRACT(EPOCH FROM r.due_at) AS due, EXTRACT(EPOCH FROM r.ended_at) AS ended,
                       EXTRACT(EPOCH FROM r.started_at - r.due_at) * 1000 AS late,
                       j.created_at > r.due_at AS late_stored
                FROM "{schema}".job_runs r JOIN "{schema}".jobs j ON j.job_id = r.job_id
                WHERE j.name LIKE $1 AND r.status = 4""",
            f"{prefix}-%",
        )
    finally:
        await conn.close()
    if not rows:
        return Runs(0, 0.0, 0.0, [], 0)
    return Runs(
        len(rows),
        min(float(row["due"]) for row in rows),
        max(float(row["ended"]) for row in rows),
        sorted(float(row["late"]) for row in rows),
        sum(1 for row in rows if row["late_stored"]),
    )


async def wait_for_runs(dsn: str, schema: str, prefix: str, count: int, within: float) -> Runs:
    deadline = time.monotonic() + within
    while True:
        runs = await read_runs(dsn, schema, prefix)
        if runs.ended >= count or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.25)


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# -- the run ---------------------------------------------------------------------------------------------------------


def start_processors(procs: Processes, work: Path, count: int, dsn: str, schema: str) -> list[Server]:
    path = work / "bench.json"
    path.write_text(json.dumps(manifest()))
    servers = []
    for n in range(count):
        port = free_port()
        env = {**child_env(work / f"data-{count}-{n}"), "PROCESSOR_STORE": dsn, "PROCESSOR_STORE_SCHEMA": schema}
        command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(path)]
        servers.append(procs.start_server(f"processor-{count}-{n}", command, f"{HOST}:{port}", env))
    for server in servers:
        wait_ready(server)
    return servers


def batch(
    procs: Processes, targets: list[str], prefix: str, count: int, lead: float, rate: float
) -> tuple[float, float]:
    """Schedule the batch; how long it took, and the first due moment (Unix seconds)."""
    options = ["--prefix", prefix, "--count", str(count), "--lead", str(lead), "--rate", str(rate)]
    answer = procs.run_client(["batch", "--targets", *targets, *options])
    return float(answer["seconds"]), float(answer["first_due"])


def measure_processes(procs: Processes, work: Path, args: argparse.Namespace, count: int) -> dict[str, Any]:
    schema = f"bench_jobs_{secrets.token_hex(4)}"
    try:
        servers = start_processors(procs, work, count, args.dsn, schema)
        targets = [server.target for server in servers]

        def server_cpu() -> float:
            return sum(cpu_seconds(server.popen.pid) for server in servers)

        cpu_before = server_cpu()
        load = procs.run_client(
            ["load", "--targets", *targets, "--duration", str(args.duration), "--warmup", str(args.warmup)]
        )
        schedules = float(load["qps"])
        schedule_cpu_us = (server_cpu() - cpu_before) / max(int(load["total_calls"]), 1) * 1e6
        # triggers: all due at one moment, after the whole batch is scheduled
        total = args.triggers * count
        lead = total / max(schedules, 100.0) * 2 + 1.0
        took, moment = batch(procs, targets, "t", total, lead, 0.0)
        if took > lead:
            raise RuntimeError(f"scheduling {total} jobs took {took:.1f} s, past their due time ({lead:.1f} s)")
        cpu_before = server_cpu()
        runs = asyncio.run(wait_for_runs(args.dsn, schema, "t", total, lead + 120))
        trigger_cpu_us = (server_cpu() - cpu_before) / max(runs.ended, 1) * 1e6
        triggers = runs.ended / max(runs.last_end - moment, 1e-3)
        # lateness: due at args.rate per second for LATENESS_SECONDS, from after the whole batch is scheduled
        spread = args.rate * LATENESS_SECONDS
        batch(procs, targets, "l", spread, spread / max(schedules, 100.0) * 2 + 1.0, args.rate)
        lateness = asyncio.run(wait_for_runs(args.dsn, schema, "l", spread, LATENESS_SECONDS + 120))
        late = lateness.lateness_ms
        for server in servers:
            server.popen.terminate()
        return {
            "processes": count,
            "schedules_per_s": schedules,
            "schedule_p99_ms": float(load["p99_ms"]),
            "schedule_server_cpu_us": schedule_cpu_us,
            "trigger_server_cpu_us": trigger_cpu_us,
            "triggers": total,
            "triggers_ended": runs.ended,
            "triggers_per_s": triggers,
            "lateness_runs": len(late),
            "lateness_stored_late": lateness.stored_late,
            "load_average": os.getloadavg()[0],
            "lateness_p50_ms": percentile(late, 0.5) if late else float("nan"),
            "lateness_p99_ms": percentile(late, 0.99) if late else float("nan"),
        }
    finally:
        asyncio.run(drop_schema(args.dsn, schema))


def bare_schedule(procs: Processes, work: Path, args: argparse.Namespace) -> float:
    from ductape.processor.v1 import job_pb2

    reply = job_pb2.JobServiceScheduleResponse(job_id="0" * 32, status=job_pb2.JOB_STATUS_SCHEDULED)
    reply.next_run_at.GetCurrentTime()
    server = procs.start_canned(work, reply.SerializeToString())
    wait_ready(server)
    load = procs.run_client(
        ["load", "--targets", server.target, "--duration", str(args.duration), "--warmup", str(args.warmup)]
    )
    server.popen.terminate()
    return float(load["qps"])


def run(procs: Processes, work: Path, args: argparse.Namespace) -> Report:
    bare = bare_schedule(procs, work, args)
    results = [measure_processes(procs, work, args, count) for count in args.processes]
    lines = [
        "Jobs on PostgreSQL (publish to an in-process topic as the target; processes not pinned)",
        f"bare grpc.aio Schedule (canned reply), c={CONCURRENCY}: {bare:,.0f} calls/s",
        "",
        f"{'processes':>9} {'schedules/s':>12} {'x bare':>7} {'triggers/s':>11} "
        f"{'late p50 ms':>12} {'late p99 ms':>12} {'CPU us/sched':>13} {'CPU us/trig':>12} {'load':>5}",
    ]
    for r in results:
        lines.append(
            f"{r['processes']:>9} {r['schedules_per_s']:>12,.0f} {r['schedules_per_s'] / bare:>7.2f} "
            f"{r['triggers_per_s']:>11,.0f} {r['lateness_p50_ms']:>12.1f} {r['lateness_p99_ms']:>12.1f} "
            f"{r['schedule_server_cpu_us']:>13,.0f} {r['trigger_server_cpu_us']:>12,.0f} {r['load_average']:>5.1f}"
        )
    lines.append("(load: the machine's 1-minute load average when the processes' measures ended)")
    lines.append("")
    for r in results:
        n = r["processes"]
        lines += [
            f"goal schedules/s per process >= {SCHEDULE_GOAL:,.0f} ({n} proc): "
            f"{r['schedules_per_s'] / n:,.0f} {verdict(r['schedules_per_s'] / n >= SCHEDULE_GOAL)}",
            f"goal triggers/s per process >= {TRIGGER_GOAL:,.0f} ({n} proc): "
            f"{r['triggers_per_s'] / n:,.0f} {verdict(r['triggers_per_s'] / n >= TRIGGER_GOAL)}",
            f"goal lateness p99 <= {LATENESS_P99_GOAL_MS:.0f} ms at {args.rate}/s ({n} proc): "
            f"{r['lateness_p99_ms']:.1f} ms {verdict(r['lateness_p99_ms'] <= LATENESS_P99_GOAL_MS)}",
        ]
        if r["triggers_ended"] < r["triggers"]:
            lines.append(f"  ({r['triggers'] - r['triggers_ended']} of {r['triggers']} runs had not ended in time)")
        if r["lateness_stored_late"]:
            lines.append(
                f"  ({r['lateness_stored_late']} of {r['lateness_runs']} lateness jobs were stored after their due "
                "moment: the lead was too short, and the lateness figure is the bench's, not the scheduler's)"
            )
    return lines, {"bare_schedules_per_s": bare, "results": results, "rate": args.rate}


def main(argv: list[str]) -> int:
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    if argv[:1] == ["_bare-server"]:
        return serve_canned_command(argv[1:], SERVICE, "Schedule")
    parser = bench_parser(__doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="processor counts (default 1 2)")
    parser.add_argument("--triggers", type=int, default=4000, help="jobs due at once, per process (default 4000)")
    parser.add_argument("--rate", type=int, default=200, help="due jobs per second for the lateness run (200)")
    parser.add_argument("--dsn", default=DSN, help=f"PostgreSQL to use (default {DSN})")
    args = parse_bench_args(parser, argv)
    return run_and_report(SCRIPT, False, lambda procs, work: run(procs, work, args), args.json)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
