#!/usr/bin/env python
"""Sessions: SessionService.Verify through the processor, side by side with a bare grpc.aio server.

    python bench/bench_sessions.py [--duration 3] [--warmup 0.5] [--rounds 3] [--concurrency 1 32] [--json FILE]

Two servers run, each in its own subprocess, listening on 127.0.0.1 only:

- `processor`: `ductape-processor serve --manifest <tmp>/bench.json --session-key <key>` (SQLite store in a temp
  data dir, its interceptor as in production, no OTLP endpoint, no API key). The manifest has one product, `bench`,
  with one environment, `dev`, and one session type, `user`; the key comes from `ductape-processor new-session-key`.
  One session is started (SessionService.Start) before anything is measured, and every call verifies its token;
- `bare`: a grpc.aio server with one generic SessionService.Verify handler (identity serializers, no interceptors)
  answering the pre-serialized bytes of the processor's own VerifyResponse for that token, so both servers put the
  same bytes on the wire and the client does exactly the same work against each.

Each measurement is a fresh client process (generated stubs, one channel, GC off while measuring) running N
coroutines that call Verify back to back for `--warmup` + `--duration` seconds. The two servers are measured in
turn, `--rounds` times, and the median of the rounds is reported, leaving out the rounds in which other processes
or the hypervisor made either server's run noisy. Goal: processor QPS >= 0.8x bare at concurrency 32. With two or
more CPUs the servers are pinned to CPU 0 and the client to CPU 1 (`--no-pin`: none). The machinery is shared with
bench_foundation.py and bench_actions.py, in `_harness.py`.

Internal sub-commands (the script runs itself with them): `_bare-server`, `_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
    measure,
    parse_bench_args,
    pinnable,
    processor_command,
    rss_mb,
    run_and_report,
    serve_canned_command,
    timed_load,
    verdict,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.SessionService"
PRODUCT, ENV, TAG = "bench", "dev", "user"

QPS_RATIO_GOAL = 0.8  # processor Verify QPS / bare QPS, at least ...
GOAL_CONCURRENCY = 32  # ... at this concurrency

# The session type and the data of the one session every call verifies: a typical user session.
SCHEMA: dict[str, Any] = {
    "userId": {"type": "string", "required": True},
    "email": {"type": "email"},
    "roles": {"type": "array", "max_length": 5},
    "admin": {"type": "boolean"},
    "prefs": {"type": "object"},
}
DATA: dict[str, Any] = {
    "userId": "u-1",
    "email": "ada@example.com",
    "roles": ["author", "editor"],
    "admin": False,
    "prefs": {"theme": "dark", "lang": "en"},
}


def manifest() -> dict[str, Any]:
    """One product, one environment, one session type (tokens live 1 h: longer than any run)."""
    session = {"tag": TAG, "schema": SCHEMA, "selector": "$Session{userId}", "expiry": "1h", "refresh_expiry": "1d"}
    return {"product": PRODUCT, "environments": [{"slug": ENV}], "sessions": [session]}


# -- the session and the canned reply (in this process, synchronous gRPC) -------------------------------------------


def new_session_key() -> str:
    """A root key from `ductape-processor new-session-key` (`kid:base64url`)."""
    done = subprocess.run(
        [*processor_command(), "new-session-key", "--id", "bench"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=child_env(),
        timeout=60,
    )
    return done.stdout.strip()


def start_session(target: str) -> tuple[str, bytes]:
    """Start one session, verify its token once; return the token and the serialized VerifyResponse."""
    import grpc
    from ductape.processor.v1 import session_pb2, session_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        start = session_pb2.StartRequest(product=PRODUCT, env=ENV, tag=TAG)
        start.data.update(DATA)
        token = stub.Start(start, timeout=CALL_TIMEOUT_S).tokens.token
        reply = stub.Verify(verify_request(token), timeout=CALL_TIMEOUT_S)
    if reply.identifier != DATA["userId"] or reply.data["email"] != DATA["email"]:
        raise RuntimeError(f"Verify answered {reply!r}, not the session started")
    return token, bytes(reply.SerializeToString())


def verify_request(token: str) -> Any:
    from ductape.processor.v1 import session_pb2

    return session_pb2.VerifyRequest(product=PRODUCT, env=ENV, tag=TAG, token=token)


# -- the load generator (a subprocess) ------------------------------------------------------------------------------


async def load(target: str, token: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    """`concurrency` coroutines calling Verify back to back on one channel."""
    import grpc
    from ductape.processor.v1 import session_pb2_grpc

    request = verify_request(token)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        first = await stub.Verify(request, timeout=CALL_TIMEOUT_S)  # connect; fail fast if the call does not work
        if first.identifier != DATA["userId"]:
            raise RuntimeError(f"Verify answered {first!r}")
        return await timed_load(
            [lambda: stub.Verify(request, timeout=CALL_TIMEOUT_S)],
            concurrency,
            duration,
            warmup,
            grpc.aio.AioRpcError,
            lambda exc: exc.code().name,
        )


# -- orchestration --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    concurrency: list[int]
    idle: float
    pin: bool


@dataclass(slots=True)
class ServerResult:
    """One server: its memory and its runs."""

    name: str
    idle_rss_mb: float = 0.0
    loaded_rss_mb: float = 0.0
    runs: list[LoadResult] = field(default_factory=list)


def paired_rounds(bare: ServerResult, processor: ServerResult, concurrency: int) -> list[tuple[LoadResult, ...]]:
    """The (bare, processor) runs of each round at `concurrency`: the rounds where neither was noisy, or every round
    when none was clean. Both servers are thus judged on the same rounds, and the ratio is taken within a round."""
    pairs = list(
        zip(
            [r for r in bare.runs if r.concurrency == concurrency],
            [r for r in processor.runs if r.concurrency == concurrency],
            strict=True,
        )
    )
    clean = [pair for pair in pairs if all(r.other_cpus + r.steal_cpus < NOISE_LIMIT for r in pair)]
    return clean or pairs


def summarize(runs: list[LoadResult]) -> Summary:
    """`Summary.of` over exactly these runs: `paired_rounds` has already chosen them, for both servers alike."""
    summary = Summary.of([replace(r, other_cpus=0.0, steal_cpus=0.0) for r in runs])  # so it leaves none out
    return replace(summary, other_cpus=max(r.other_cpus for r in runs), steal_cpus=max(r.steal_cpus for r in runs))


def start_servers(procs: Processes, work: Path) -> tuple[Server, Server, str, int]:
    """The processor (with a fresh session key), one session started on it, then the bare server answering with
    the processor's own VerifyResponse. Returns bare, processor, the token and the reply's size."""
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(), indent=2))
    data_dir = work / "data-processor"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    command += ["--session-key", new_session_key(), "--shutdown-grace-s", "2"]
    processor = procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(processor)
    token, reply = start_session(processor.target)

    bare = procs.start_canned(work, reply)
    wait_ready(bare)
    return bare, processor, token, len(reply)


def run_all(procs: Processes, config: Config, work: Path) -> tuple[list[ServerResult], int, int]:
    """Start the servers, read their idle RSS, run the interleaved rounds, read their RSS after load."""
    bare, processor, token, reply_size = start_servers(procs, work)
    time.sleep(config.idle)
    servers = [bare, processor]
    results = {s.name: ServerResult(s.name, idle_rss_mb=rss_mb(s.pid)) for s in servers}
    for round_no in range(config.rounds):
        order = servers[round_no % 2 :] + servers[: round_no % 2]  # alternate, so neither always goes first
        for concurrency in config.concurrency:
            for server in order:
                arguments = ["--target", server.target, "--token", token, "--concurrency", str(concurrency)]
                arguments += ["--duration", str(config.duration), "--warmup", str(config.warmup)]
                run, _ = measure(procs, server, arguments)
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
    return [results[s.name] for s in servers], reply_size, len(token)


def report(
    results: list[ServerResult], config: Config, reply_size: int, token_size: int
) -> tuple[list[str], dict[str, Any]]:
    """The table as lines, and everything as data (for --json)."""
    bare, processor = results
    pinning = f"servers on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if config.pin else "no CPU pinning"
    lines = [
        "",
        f"SessionService.Verify(product='{PRODUCT}', env='{ENV}', tag='{TAG}', token: {token_size} chars) -> "
        f"{reply_size} B; median of {config.rounds} round(s) of {config.duration:g} s after {config.warmup:g} s "
        f"warm-up; 1 channel; {pinning}",
        f"goal: processor QPS >= {QPS_RATIO_GOAL:.2f}x bare at concurrency {GOAL_CONCURRENCY}",
        "",
        f"{'conc':>4}  {'server':<9} {'QPS':>8} {'min-max':>11} {'ratio':>7} {'':4}  {'p50 ms':>7} {'Δp50 ms':>8}  "
        f"{'p99 ms':>7} {'Δp99 ms':>8}  {'CPU µs/call srv cli':>19}  {'others':>6} {'steal':>5} {'rounds':>6}",
    ]
    comparisons: list[dict[str, Any]] = []
    summaries: dict[str, dict[int, Summary]] = {s.name: {} for s in results}
    goal: bool | None = None
    client_bound = False
    noisy = 0.0
    errors: list[str] = []
    for concurrency in config.concurrency:
        used = paired_rounds(bare, processor, concurrency)
        rounds = len([r for r in bare.runs if r.concurrency == concurrency])
        base = summarize([b for b, _ in used])
        for index, server in enumerate(results):
            s = summarize([pair[index] for pair in used])
            summaries[server.name][concurrency] = s
            ratio_txt = ratio_ok = diff_txt = diff99_txt = ""
            if server is processor:
                ratio = statistics.median(p.qps / b.qps if b.qps else 0.0 for b, p in used)
                diff, diff99 = s.p50_ms - base.p50_ms, s.p99_ms - base.p99_ms
                ratio_txt, diff_txt, diff99_txt = f"{ratio:.3f}x", f"{diff:+.3f}", f"{diff99:+.3f}"
                if concurrency == GOAL_CONCURRENCY:
                    goal = ratio >= QPS_RATIO_GOAL
                    ratio_ok = verdict(goal)
                comparisons.append(
                    {
                        "concurrency": concurrency,
                        "qps_ratio": ratio,
                        "qps_ratio_pass": goal if concurrency == GOAL_CONCURRENCY else None,
                        "p50_diff_ms": diff,
                        "p99_diff_ms": diff99,
                        "server_cpu_us_per_call_diff": s.server_cpu_us_per_call - base.server_cpu_us_per_call,
                        "clean": all(r.other_cpus + r.steal_cpus < NOISE_LIMIT for pair in used for r in pair),
                    }
                )
            mark = "*" if s.client_busy >= CLIENT_BOUND else " "
            client_bound |= mark == "*"
            noisy = max(noisy, s.other_cpus + s.steal_cpus)
            if s.errors:
                errors.append(f"{server.name} at concurrency {concurrency}: {s.errors} failed calls (see --json)")
            lines.append(
                f"{concurrency:>4}  {server.name:<9} {s.qps:>8.1f} {f'{s.qps_min:.0f}-{s.qps_max:.0f}':>11} "
                f"{ratio_txt:>7} {ratio_ok:<4}  {s.p50_ms:>7.3f} {diff_txt:>8}  {s.p99_ms:>7.3f} {diff99_txt:>8}  "
                f"{s.server_cpu_us_per_call:>9.0f} {s.client_cpu_us_per_call:>7.0f}{mark}  "
                f"{s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} {f'{s.rounds_used}/{rounds}':>6}"
            )
        lines.append("")
    lines += [
        "ratio: median over the rounds used of processor QPS / bare QPS in the same round; Δ: processor minus bare",
        "CPU µs/call: CPU time of the server / of the client process per call (warm-up included)",
        "others, steal: CPU used meanwhile by other processes / taken by the hypervisor, in % of one CPU (highest)",
        f"rounds: rounds used / run; a round where others + steal reached {NOISE_LIMIT:.0%} during either server's run "
        "is left out if any round is clean",
    ]
    if client_bound:
        lines.append(f"* the client's CPU was >= {CLIENT_BOUND:.0%} busy: QPS may be limited by the client")
    if noisy >= NOISE_LIMIT:
        lines.append(f"WARNING: others + steal reached {noisy:.0%} of a CPU in rounds used: the figures are noisy")
    lines += [f"ERROR: {e}" for e in errors]
    lines += ["", f"{'server':<9} {'idle RSS MB':>11}  {'RSS after load MB':>17}"]
    lines += [f"{s.name:<9} {s.idle_rss_mb:>11.1f}  {s.loaded_rss_mb:>17.1f}" for s in results]
    lines.append("")
    if goal is None:
        lines.append(f"goal not measured: add {GOAL_CONCURRENCY} to --concurrency")
    else:
        at_goal = next(c for c in comparisons if c["concurrency"] == GOAL_CONCURRENCY)
        base, s = summaries[bare.name][GOAL_CONCURRENCY], summaries[processor.name][GOAL_CONCURRENCY]
        lines += [
            f"server CPU per call at concurrency {GOAL_CONCURRENCY}: bare {base.server_cpu_us_per_call:.0f} µs, "
            f"processor {s.server_cpu_us_per_call:.0f} µs (+{at_goal['server_cpu_us_per_call_diff']:.0f} µs); "
            f"bare / processor = {base.server_cpu_us_per_call / max(1e-9, s.server_cpu_us_per_call):.3f}",
            f"{verdict(goal)}  Verify QPS through the processor {at_goal['qps_ratio']:.3f}x bare at concurrency "
            f"{GOAL_CONCURRENCY} (goal >= {QPS_RATIO_GOAL:.2f}x)"
            + ("" if at_goal["clean"] else ": not conclusive, no round was clean"),
        ]
    data = {
        "config": asdict(config),
        "reply_bytes": reply_size,
        "token_chars": token_size,
        "goals": {"qps_ratio_min": QPS_RATIO_GOAL, "at_concurrency": GOAL_CONCURRENCY},
        "goal_pass": goal,
        "summary": {name: {str(c): asdict(s) for c, s in by_c.items()} for name, by_c in summaries.items()},
        "comparisons": comparisons,
        "memory": [{"server": s.name, "idle_rss_mb": s.idle_rss_mb, "loaded_rss_mb": s.loaded_rss_mb} for s in results],
        "runs": {server.name: [asdict(r) for r in server.runs] for server in results},
    }
    return lines, data


def run_benchmark(config: Config, json_path: Path | None) -> int:
    def measure_all(procs: Processes, work: Path) -> Report:
        print("starting the processor, a session and the bare server ...", file=sys.stderr, flush=True)
        results, reply_size, token_size = run_all(procs, config, work)
        return report(results, config, reply_size, token_size)

    failures = (RuntimeError, subprocess.CalledProcessError)  # a server or client failed: say why
    return run_and_report(SCRIPT, config.pin, measure_all, json_path, failures=failures)


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent calls per run (default 1 32)"
    )
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading the idle RSS (default 2)")
    return parser


def _internal(argv: list[str]) -> int:
    """The sub-commands the script runs itself with."""
    command, rest = argv[0], argv[1:]
    sub = argparse.ArgumentParser(prog=command)
    if command == "_bare-server":
        return serve_canned_command(rest, SERVICE, "Verify")
    for name, kind in (("target", str), ("token", str), ("concurrency", int), ("duration", float), ("warmup", float)):
        sub.add_argument(f"--{name}", type=kind, required=True)
    args = sub.parse_args(rest)
    result = asyncio.run(load(args.target, args.token, args.concurrency, args.duration, args.warmup))
    return emit(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_bare-server"], ["_client"]):
        return _internal(argv)
    parser = _parser()
    args = parse_bench_args(parser, argv)
    if min(args.concurrency) < 1:
        parser.error("--concurrency must be >= 1")
    config = Config(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        concurrency=sorted(set(args.concurrency)),
        idle=args.idle,
        pin=pinnable(args.pin),
    )
    return run_benchmark(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
