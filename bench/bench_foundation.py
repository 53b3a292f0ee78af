#!/usr/bin/env python
"""Foundation benchmark: the processor's full gRPC stack against a bare grpc.aio server, side by side.

    python bench/bench_foundation.py [--duration 3] [--warmup 0.5] [--rounds 3] [--concurrency 1 32] [--json FILE]

Three servers run, each in its own subprocess, listening on 127.0.0.1 only:

- `bare`: a grpc.aio server with one generic unary-unary handler (identity serializers, no interceptors) that answers
  ProductService.Get with the pre-serialized bytes of the response the processor gives, so both servers put the
  same bytes on the wire and the client does exactly the same work against each;
- `full`: `ductape-processor serve --manifest examples/` (SQLite store in a temp data dir, its interceptor as in
  production, no OTLP endpoint), ProductService.Get(product="shop", env="dev") served from memory;
- `full+auth`: the same with an API key configured, so the interceptor also checks the key.

Each measurement is a fresh client process (generated stubs, one asyncio loop, GC off while measuring) running N
coroutines back to back for `--warmup` + `--duration` seconds; it reports the calls completed in the measured window
and their latencies. The client sends `authorization: Bearer <key>` to all three servers. Measurements of the three
servers are interleaved, `--rounds` times, and the median of the rounds is reported. With two or more CPUs the
servers are pinned to CPU 0 and the client to CPU 1 (`--no-pin` to turn that off). The CPU time taken meanwhile by
other processes and by the hypervisor (steal) is shown, with a warning when it makes the figures noisy.
Subprocesses are stopped on exit, Ctrl-C, SIGTERM or error (and die with this script if it is killed).

Internal sub-commands (the script runs itself with them): `_bare-server`, `_client`. What the benchmarks share
(the pinned-subprocess launcher, the load loop, the /proc readings) is in `_harness.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    CALL_TIMEOUT_S,
    CLIENT_BOUND,
    CLIENT_CPU,
    HOST,
    NOISE_LIMIT,
    SERVER_CPU,
    LoadResult,
    Processes,
    Report,
    Server,
    Summary,
    bench_parser,
    child_env,
    emit,
    free_port,
    parse_bench_args,
    pinnable,
    processor_command,
    rss_mb,
    rss_parts_mb,
    run_and_report,
    serve_canned_command,
    timed_load,
    verdict,
    wait_ready,
)
from _harness import measure as measure_client

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.ProductService"

QPS_RATIO_GOAL = 0.85  # full QPS / bare QPS, at least
P50_DIFF_GOAL_MS = 0.2  # full p50 - bare p50, at most
IDLE_RSS_GOAL_MB = 80.0  # full server's RSS after start-up, at most


# -- results -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerResult:
    """One server: its memory and its runs."""

    name: str
    idle_rss_mb: float = 0.0
    idle_anon_mb: float = 0.0
    """Of the idle RSS, the process's own memory (RssAnon); the rest is mapped files' pages (RssFile)."""
    loaded_rss_mb: float = 0.0
    runs: list[LoadResult] = field(default_factory=list)

    def summary(self, concurrency: int) -> Summary:
        return Summary.of([r for r in self.runs if r.concurrency == concurrency])


# -- the canned reply (in this process, synchronous gRPC) ---------------------------------------------------------


def fetch_reply(target: str, metadata: Sequence[tuple[str, str]]) -> bytes:
    """One Get through the generated stub; returns the serialized response (the bare server's canned reply)."""
    import grpc
    from ductape.processor.v1 import product_pb2, product_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = product_pb2_grpc.ProductServiceStub(channel)
        reply = stub.Get(
            product_pb2.GetRequest(product="shop", env="dev"), metadata=tuple(metadata), timeout=CALL_TIMEOUT_S
        )
    return bytes(reply.SerializeToString())


# -- the load generator (a subprocess) ------------------------------------------------------------------------------


async def load(
    target: str, concurrency: int, duration: float, warmup: float, channels: int, api_key: str
) -> LoadResult:
    """`concurrency` coroutines calling Get back to back for warmup + duration seconds."""
    import grpc
    from ductape.processor.v1 import product_pb2, product_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),)
    request = product_pb2.GetRequest(product="shop", env="dev")
    opened = [grpc.aio.insecure_channel(target) for _ in range(max(1, min(channels, concurrency)))]
    stubs = [product_pb2_grpc.ProductServiceStub(channel) for channel in opened]
    for stub in stubs:  # connect, and fail fast if the call does not work at all
        await stub.Get(request, metadata=metadata, timeout=CALL_TIMEOUT_S)

    result = await timed_load(
        [lambda stub=stub: stub.Get(request, metadata=metadata, timeout=CALL_TIMEOUT_S) for stub in stubs],
        concurrency,
        duration,
        warmup,
        grpc.aio.AioRpcError,
        lambda exc: exc.code().name,
    )
    for channel in opened:
        await channel.close()
    return result


# -- orchestration --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    concurrency: list[int]
    channels: int
    idle: float
    pin: bool
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))


def start_processor(procs: Processes, name: str, work: Path, api_key: str | None) -> Server:
    """`ductape-processor serve` on a free loopback port, its own data dir, the example manifest."""
    data_dir = work / f"data-{name.replace('+', '-')}"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(ROOT / "examples")]
    # The example product receives webhooks: each server's listener on a port of its own (the default, 8090, is one
    # port for all of them).
    command += ["--shutdown-grace-s", "2", "--webhook-http-address", f"{HOST}:0"]
    if api_key is not None:
        command += ["--api-key-hash", hashlib.sha256(api_key.encode()).hexdigest()]
    return procs.start_server(name, command, f"{HOST}:{port}", child_env(data_dir))


def measure(procs: Processes, server: Server, concurrency: int, config: Config) -> LoadResult:
    """One client process against one server; CPU time of the server and of everything else is read around it."""
    run, _ = measure_client(
        procs,
        server,
        [
            *("--target", server.target, "--concurrency", str(concurrency), "--channels", str(config.channels)),
            *("--duration", str(config.duration), "--warmup", str(config.warmup), "--api-key", config.api_key),
        ],
    )
    return run


def run_all(procs: Processes, config: Config, work: Path) -> tuple[list[ServerResult], int]:
    """Start the three servers, read their idle RSS, run the interleaved rounds, read their RSS after load."""
    full = start_processor(procs, "full", work, None)
    full_auth = start_processor(procs, "full+auth", work, config.api_key)
    for server in (full, full_auth):
        wait_ready(server)
    time.sleep(config.idle)
    idle = {s.name: rss_parts_mb(s.pid) for s in (full, full_auth)}
    reply = fetch_reply(full.target, (("authorization", f"Bearer {config.api_key}"),))
    bare = procs.start_canned(work, reply)
    wait_ready(bare)
    time.sleep(config.idle)
    idle[bare.name] = rss_parts_mb(bare.pid)

    servers = [bare, full, full_auth]
    results = {
        s.name: ServerResult(s.name, idle_rss_mb=idle[s.name]["VmRSS"], idle_anon_mb=idle[s.name].get("RssAnon", 0.0))
        for s in servers
    }
    for round_no in range(config.rounds):
        order = servers[round_no % 3 :] + servers[: round_no % 3]  # rotate, so no server always goes first
        for concurrency in config.concurrency:
            for server in order:
                run = measure(procs, server, concurrency, config)
                results[server.name].runs.append(run)
                errors = f", {run.errors} errors {run.error_codes}" if run.errors else ""
                print(
                    f"  round {round_no + 1}/{config.rounds}  {server.name:<9}  c={concurrency:<3} {run.qps:8.1f} QPS"
                    f"  p50 {run.p50_ms:6.3f} ms  p99 {run.p99_ms:6.3f} ms{errors}",
                    file=sys.stderr,
                    flush=True,
                )
    for server in servers:
        results[server.name].loaded_rss_mb = rss_mb(server.pid)
    return [results[s.name] for s in servers], len(reply)


def report(results: list[ServerResult], config: Config, reply_size: int) -> tuple[list[str], dict[str, Any]]:
    """The table as lines, and everything as data (for --json)."""
    bare = results[0]
    pinning = f"servers on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if config.pin else "no CPU pinning"
    lines = [
        "",
        f"ProductService.Get(product='shop', env='dev') -> {reply_size} B; median of {config.rounds} round(s) of "
        f"{config.duration:g} s after {config.warmup:g} s warm-up; {config.channels} channel(s); {pinning}",
        f"goals: full QPS >= {QPS_RATIO_GOAL:.2f}x bare, full p50 <= bare p50 + {P50_DIFF_GOAL_MS:.2f} ms, "
        f"full idle RSS <= {IDLE_RSS_GOAL_MB:.0f} MB",
        "",
        f"{'conc':>4}  {'server':<9} {'QPS':>8} {'min-max':>11} {'ratio':>7} {'':4}  {'p50 ms':>7} "
        f"{'Δp50 ms':>8} {'':4}  {'p99 ms':>7} {'Δp99 ms':>8}  {'CPU µs/call srv cli':>19}  "
        f"{'others':>6} {'steal':>5} {'rounds':>6}",
    ]
    comparisons: list[dict[str, Any]] = []
    summaries: dict[str, dict[int, Summary]] = {s.name: {} for s in results}
    client_bound = False
    noisy = 0.0
    errors: list[str] = []
    for concurrency in config.concurrency:
        base = bare.summary(concurrency)
        for server in results:
            s = server.summary(concurrency)
            summaries[server.name][concurrency] = s
            ratio_txt = ratio_ok = diff_txt = diff_ok = diff99_txt = ""
            if server is not bare:
                ratio = s.qps / base.qps if base.qps else 0.0
                diff, diff99 = s.p50_ms - base.p50_ms, s.p99_ms - base.p99_ms
                ratio_txt, ratio_ok = f"{ratio:.3f}x", verdict(ratio >= QPS_RATIO_GOAL)
                diff_txt, diff_ok, diff99_txt = f"{diff:+.3f}", verdict(diff <= P50_DIFF_GOAL_MS), f"{diff99:+.3f}"
                comparisons.append(
                    {
                        "server": server.name,
                        "concurrency": concurrency,
                        "qps_ratio": ratio,
                        "qps_ratio_pass": ratio >= QPS_RATIO_GOAL,
                        "p50_diff_ms": diff,
                        "p50_diff_pass": diff <= P50_DIFF_GOAL_MS,
                        "p99_diff_ms": diff99,
                    }
                )
            mark = "*" if s.client_busy >= CLIENT_BOUND else " "
            client_bound |= mark == "*"
            noisy = max(noisy, s.other_cpus + s.steal_cpus)
            if s.errors:
                errors.append(f"{server.name} at concurrency {concurrency}: {s.errors} failed calls (see --json)")
            lines.append(
                f"{concurrency:>4}  {server.name:<9} {s.qps:>8.1f} {f'{s.qps_min:.0f}-{s.qps_max:.0f}':>11} "
                f"{ratio_txt:>7} {ratio_ok:<4}  {s.p50_ms:>7.3f} {diff_txt:>8} {diff_ok:<4}  "
                f"{s.p99_ms:>7.3f} {diff99_txt:>8}  {s.server_cpu_us_per_call:>9.0f} {s.client_cpu_us_per_call:>7.0f}"
                f"{mark}  {s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} {f'{s.rounds_used}/{s.rounds}':>6}"
            )
        lines.append("")
    lines += [
        "CPU µs/call: CPU time of the server / of the client process per call (warm-up included)",
        "others, steal: CPU used meanwhile by other processes / taken by the hypervisor, in % of one CPU (highest)",
        f"rounds: rounds used / run; a round where others + steal reached {NOISE_LIMIT:.0%} is left out if any is not",
    ]
    if client_bound:
        lines.append(f"* the client's CPU was >= {CLIENT_BOUND:.0%} busy: QPS may be limited by the client")
    if noisy >= NOISE_LIMIT:
        lines.append(f"WARNING: others + steal reached {noisy:.0%} of a CPU in rounds used: the figures are noisy")
    lines += [f"ERROR: {e}" for e in errors]
    lines.append("")
    lines.append(f"{'server':<9} {'idle RSS MB':>11} {'':4}  {'anon + file':>13}  {'RSS after load MB':>17}")
    memory: list[dict[str, Any]] = []
    for server in results:
        ok = None if server is bare else server.idle_rss_mb <= IDLE_RSS_GOAL_MB
        lines.append(
            f"{server.name:<9} {server.idle_rss_mb:>11.1f} {'' if ok is None else verdict(ok):<4}  "
            f"{server.idle_anon_mb:>6.1f} + {server.idle_rss_mb - server.idle_anon_mb:>4.1f}  "
            f"{server.loaded_rss_mb:>17.1f}"
        )
        memory.append(
            {
                "server": server.name,
                "idle_rss_mb": server.idle_rss_mb,
                "idle_anon_mb": server.idle_anon_mb,
                "loaded_rss_mb": server.loaded_rss_mb,
                "idle_rss_pass": ok,
            }
        )
    data = {
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "reply_bytes": reply_size,
        "goals": {
            "qps_ratio_min": QPS_RATIO_GOAL,
            "p50_diff_ms_max": P50_DIFF_GOAL_MS,
            "idle_rss_mb_max": IDLE_RSS_GOAL_MB,
        },
        "summary": {name: {str(c): asdict(s) for c, s in by_c.items()} for name, by_c in summaries.items()},
        "comparisons": comparisons,
        "memory": memory,
        "runs": {server.name: [asdict(r) for r in server.runs] for server in results},
    }
    return lines, data


def run_benchmark(config: Config, json_path: Path | None) -> int:
    def measure_all(procs: Processes, work: Path) -> Report:
        print("starting the servers ...", file=sys.stderr, flush=True)
        results, reply_size = run_all(procs, config, work)
        return report(results, config, reply_size)

    return run_and_report(SCRIPT, config.pin, measure_all, json_path)


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent calls per run (default 1 32)"
    )
    parser.add_argument("--channels", type=int, default=1, help="client channels the calls spread over (default 1)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading the idle RSS (default 2)")
    return parser


def _internal(argv: list[str]) -> int:
    """The sub-commands the script runs itself with."""
    command, rest = argv[0], argv[1:]
    sub = argparse.ArgumentParser(prog=command)
    if command == "_bare-server":
        return serve_canned_command(rest, SERVICE, "Get")
    for name, kind in (("target", str), ("concurrency", int), ("duration", float), ("warmup", float)):
        sub.add_argument(f"--{name}", type=kind, required=True)
    sub.add_argument("--channels", type=int, required=True)
    sub.add_argument("--api-key", required=True)
    args = sub.parse_args(rest)
    result = asyncio.run(load(args.target, args.concurrency, args.duration, args.warmup, args.channels, args.api_key))
    return emit(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_bare-server"], ["_client"]):
        return _internal(argv)
    parser = _parser()
    args = parse_bench_args(parser, argv)
    if args.channels < 1 or min(args.concurrency) < 1:
        parser.error("--channels and --concurrency must be >= 1")
    config = Config(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        concurrency=sorted(set(args.concurrency)),
        channels=args.channels,
        idle=args.idle,
        pin=pinnable(args.pin),
    )
    return run_benchmark(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
