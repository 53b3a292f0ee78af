#!/usr/bin/env python
"""Actions end to end: ActionService.Run through the processor to a local HTTP upstream, side by side with the
bare gRPC stack and with calling the upstream directly.

    python bench/bench_actions.py [--duration 3] [--rounds 3] [--calls 100000] [--floor] [--json FILE]

Three servers run (four with --floor), each its own subprocess on 127.0.0.1 only:

- `upstream`: an aiohttp web server answering `GET /users/{id}` with the small JSON body {"ok": true, "id": 1}
  (no access log);
- `processor`: `ductape-processor serve --manifest <tmp>/bench.json` (SQLite store in a temp data dir, execution
  records batched into it in the background as in production, no OTLP endpoint, no API key). The manifest has one
  app, `api`, whose `dev` environment points at the upstream, with one action `user` = `GET /users/:id` (one path
  parameter; no cache, no auth, no idempotency key);
- `bare`: a grpc.aio server with one generic ActionService.Run handler (identity serializers, no interceptors)
  answering the pre-serialized bytes of the processor's own reply, so both put the same bytes on the wire;
- `floor` (with --floor): the bare server, except that its handler first makes the same GET with the processor's
  own HTTP client (`HttpClientPool`), on uvloop as the processor runs: what gRPC + that client cost without any of
  the processor's own work (interceptor, parsing, templates, records).

What is measured, in one run:

1. QPS of ActionService.Run at `--concurrency` (32) through the processor vs the bare server (same client,
   generated stubs, one real channel). Goal: processor >= 0.6x bare.
2. Added latency at concurrency 1: p50 and p99 of Run through the processor (client -> processor -> upstream)
   vs an aiohttp client calling the upstream directly. Goals: p50 <= +1.0 ms, p99 <= +3.0 ms. The bare server's
   figures are shown too: they are the gRPC round trip alone.
3. The processor's RSS during `--calls` (100 000) Run calls at concurrency 32 right after start-up, sampled every
   10 000 calls (every tenth of the calls when fewer). Goals: <= 150 MB after the calls, and flat: the samples of
   the second half stay within 5 % of the one at half-way.

Each load is a fresh client process; the (1) and (2) loads are interleaved, `--rounds` times, and the median of
the rounds is reported, leaving out rounds that other processes or the hypervisor made noisy (as in
bench_foundation.py, whose machinery `_harness.py` holds). CPU layout with two or more CPUs (`--no-pin`: none):
the processor and the bare server on CPU 0; the client and the upstream on CPU 1 (`--upstream-cpu 0` puts the
upstream beside the processor instead); the direct aiohttp client on the CPU the upstream is not on.

Internal sub-commands (the script runs itself with them): `_upstream`, `_bare-server`, `_floor-server`, `_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    CALL_TIMEOUT_S,
    CLIENT_BOUND,
    CLIENT_CPU,
    HOST,
    NOISE_LIMIT,
    READY_TIMEOUT_S,
    SERVER_CPU,
    LoadResult,
    Processes,
    Report,
    Server,
    Summary,
    bench_parser,
    child_env,
    clean_runs,
    cpu_seconds,
    emit,
    free_port,
    load_result,
    measure,
    parse_bench_args,
    pinnable,
    processor_command,
    rss_mb,
    run_and_report,
    rusage_s,
    serve_canned_command,
    serve_generic,
    timed_load,
    verdict,
    wait_ready,
)

SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.ActionService"
PRODUCT, ENV, APP, EVENT = "bench", "dev", "api", "user"
USER_ID = "1"
UPSTREAM_BODY = b'{"ok": true, "id": 1}'

QPS_RATIO_GOAL = 0.6  # processor QPS / bare QPS at --concurrency, at least
P50_ADDED_GOAL_MS = 1.0  # processor p50 - direct p50 at concurrency 1, at most
P99_ADDED_GOAL_MS = 3.0  # processor p99 - direct p99 at concurrency 1, at most
RSS_GOAL_MB = 150.0  # processor RSS after --calls calls, at most
RSS_GROWTH_GOAL = 0.05  # growth of the RSS samples over the second half of the calls, at most


# -- results -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One measured load: what the client saw, and the CPU the upstream used meanwhile."""

    target: str  # bare, processor, direct
    load: LoadResult
    upstream_cpu_s: float


@dataclass(slots=True)
class Row:
    """The median of the rounds of one target at one concurrency (noisy rounds left out when others are clean)."""

    target: str
    summary: Summary
    upstream_cpu_us_per_call: float
    busy: dict[int, float]  # CPU -> fraction of it the benchmark's processes kept busy (median of the rounds)


@dataclass(slots=True)
class Soak:
    """The processor's RSS along --calls calls."""

    calls: int
    every: int
    concurrency: int
    idle_rss_mb: float
    samples: list[tuple[int, float]] = field(default_factory=list)  # (calls done, RSS MB)
    cpu_s: list[float] = field(default_factory=list)  # the processor's CPU seconds at each sample
    qps: float = 0.0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    server_cpu_us_per_call: float = 0.0
    upstream_cpu_us_per_call: float = 0.0
    other_cpus: float = 0.0
    steal_cpus: float = 0.0
    records_stored: int = -1  # execution records in the processor's SQLite file at the end (-1: not read)
    total_calls: int = 0  # Run calls the processor served during the whole benchmark (soak and rounds)


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
    rounds: int
    calls: int
    concurrency: int
    idle: float
    pin: bool
    upstream_cpu: int
    floor: bool = False

    @property
    def targets(self) -> list[str]:
        """What the gRPC client measures: bare, processor, and with --floor the floor server."""
        return ["bare", "processor", *(["floor"] if self.floor else [])]

    @property
    def every(self) -> int:
        """Calls between two RSS samples: 10 000, or a tenth of the calls when fewer than 100 000."""
        return max(1, min(10_000, self.calls // 10))

    @property
    def direct_cpu(self) -> int:
        return CLIENT_CPU if self.upstream_cpu == SERVER_CPU else SERVER_CPU

    def layout(self) -> dict[str, int | None]:
        """Role -> CPU it is pinned to."""
        if not self.pin:
            return dict.fromkeys(("processor", "bare", "floor", "client", "upstream", "direct client"))
        return {
            "processor": SERVER_CPU,
            "bare": SERVER_CPU,
            **({"floor": SERVER_CPU} if self.floor else {}),
            "client": CLIENT_CPU,
            "upstream": self.upstream_cpu,
            "direct client": self.direct_cpu,
        }

    def layout_text(self) -> str:
        if not self.pin:
            return "no CPU pinning: the processes share the CPUs as the kernel sees fit"
        by_cpu: dict[int, list[str]] = {}
        for role, cpu in self.layout().items():
            assert cpu is not None
            by_cpu.setdefault(cpu, []).append(role)
        return "; ".join(f"CPU {cpu}: {', '.join(roles)}" for cpu, roles in sorted(by_cpu.items()))


# -- the upstream (a subprocess) ------------------------------------------------------------------------------------


async def serve_upstream(port: int) -> None:
    """aiohttp answering GET /users/{id} with a small JSON body, without access log, until SIGTERM or SIGINT."""
    from aiohttp import web

    async def user(request: web.Request) -> web.Response:
        return web.Response(body=UPSTREAM_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/users/{id}", user)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def wait_http(server: Server) -> None:
    """Poll GET /users/1 until the upstream answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        server.check_alive()
        try:
            with urllib.request.urlopen(f"{server.target}/users/{USER_ID}", timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the upstream does not answer after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


async def serve_floor(port: int, reply: bytes, url: str) -> None:
    """The floor: a bare Run handler that GETs `url` with the processor's own HTTP client (`HttpClientPool`: pooled
    HTTP/1.1 connections, origin and header checks, body bound, timeout), reads the body, then answers the canned
    reply. No interceptor, no parsing, no templates, no records: what gRPC + the HTTP client cost alone."""
    from yarl import URL

    from ductape_processor.adapters.http.client import HttpClientPool, HttpRequest

    http = HttpClientPool(max_response_bytes=8 * 1024 * 1024)
    request = HttpRequest("GET", URL(url, encoded=True), {}, [])

    async def handle(_: bytes, context: Any) -> bytes:
        await http.send("floor", request, CALL_TIMEOUT_S)
        return reply

    try:
        await serve_generic(port, SERVICE, "Run", handle)
    finally:
        await http.close()


# -- the processor's manifest and reply (in this process) -----------------------------------------------------------


def manifest(base_url: str) -> dict[str, Any]:
    """One product, one app pointing at the upstream, one GET action with one path parameter."""
    action = {
        "tag": EVENT,
        "method": "GET",
        "path": "/users/:id",
        "input": {"params": {"id": {"type": "string", "required": True}}},
    }
    app = {"tag": APP, "envs": {ENV: {"base_url": base_url}}, "actions": [action]}
    return {"product": PRODUCT, "environments": [{"slug": ENV}], "apps": [app]}


def run_request() -> Any:
    from ductape.processor.v1 import action_pb2

    request = action_pb2.RunRequest(product=PRODUCT, env=ENV, app=APP, event=EVENT)
    request.input.params.update({"id": USER_ID})
    return request


def fetch_reply(target: str) -> bytes:
    """One Run through the generated stub; checks what came back; returns it serialized (the bare server's reply)."""
    import grpc
    from ductape.processor.v1 import action_pb2_grpc
    from google.protobuf import json_format

    with grpc.insecure_channel(target) as channel:
        reply = action_pb2_grpc.ActionServiceStub(channel).Run(run_request(), timeout=CALL_TIMEOUT_S)
    body = json_format.MessageToDict(reply.json) if reply.WhichOneof("body") == "json" else reply.raw
    if reply.status_code != 200 or body != json.loads(UPSTREAM_BODY):
        raise RuntimeError(f"the processor answered {reply.status_code} {body!r}, not 200 {UPSTREAM_BODY!r}")
    return bytes(reply.SerializeToString())


# -- the load generators (subprocesses) -----------------------------------------------------------------------------


async def load_grpc(target: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    """`concurrency` coroutines calling ActionService.Run back to back on one channel."""
    import grpc
    from ductape.processor.v1 import action_pb2_grpc

    request = run_request()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = action_pb2_grpc.ActionServiceStub(channel)
        await stub.Run(request, timeout=CALL_TIMEOUT_S)  # connect, and fail fast if the call does not work at all
        return await timed_load(
            [lambda: stub.Run(request, timeout=CALL_TIMEOUT_S)],
            concurrency,
            duration,
            warmup,
            grpc.aio.AioRpcError,
            lambda exc: exc.code().name,
        )


class HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def load_http(url: str, concurrency: int, duration: float, warmup: float) -> LoadResult:
    """`concurrency` coroutines calling GET url back to back with one pooled aiohttp session."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",)
    ) as session:

        async def get() -> bytes:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as response:
                body = await response.read()
                if response.status != 200:
                    raise HttpStatusError(response.status)
                return body

        await get()
        return await timed_load(
            [get],
            concurrency,
            duration,
            warmup,
            (aiohttp.ClientError, TimeoutError, HttpStatusError),
            lambda exc: f"HTTP {exc.status}" if isinstance(exc, HttpStatusError) else type(exc).__name__,
        )


async def load_count(target: str, concurrency: int, calls: int, every: int) -> LoadResult:
    """`calls` Run calls made by `concurrency` coroutines; prints {"progress": n} each time `every` more are done.

    GC stays on here: this is a long run and latency is not its point."""
    import resource

    import grpc
    from ductape.processor.v1 import action_pb2_grpc

    request = run_request()
    latencies: list[float] = []
    error_codes: dict[str, int] = {}
    issued = done = 0
    clock = time.perf_counter
    async with grpc.aio.insecure_channel(target) as channel:
        stub = action_pb2_grpc.ActionServiceStub(channel)

        async def worker() -> None:
            nonlocal issued, done
            while issued < calls:
                issued += 1
                started = clock()
                try:
                    await stub.Run(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    error_codes[exc.code().name] = error_codes.get(exc.code().name, 0) + 1
                else:
                    latencies.append(clock() - started)
                done += 1
                if done % every == 0:
                    print(json.dumps({"progress": done}), flush=True)

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        begin = clock()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = clock() - begin
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    return load_result(
        latencies, error_codes, concurrency, wall, done, rusage_s(cpu_after) - rusage_s(cpu_before), wall
    )


# -- orchestration --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Servers:
    upstream: Server
    processor: Server
    bare: Server
    data_dir: Path
    floor: Server | None = None


def start_all(procs: Processes, config: Config, work: Path) -> tuple[Servers, float, int]:
    """Upstream, processor (its idle RSS read), bare server; returns them, the idle RSS and the reply's size."""
    port = free_port()
    upstream = procs.start_server(
        "upstream",
        [sys.executable, SCRIPT, "_upstream", "--port", str(port)],
        f"http://{HOST}:{port}",
        child_env(),
        cpu=config.upstream_cpu,
    )
    wait_http(upstream)

    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(upstream.target), indent=2))
    data_dir = work / "data-processor"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    command += ["--shutdown-grace-s", "2"]
    processor = procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(processor)
    time.sleep(config.idle)
    idle_rss = rss_mb(processor.pid)

    reply = fetch_reply(processor.target)
    bare = procs.start_canned(work, reply)
    wait_ready(bare)
    floor = None
    if config.floor:
        port = free_port()
        command = [
            sys.executable,
            SCRIPT,
            "_floor-server",
            "--port",
            str(port),
            "--reply-file",
            str(work / "reply.bin"),
        ]
        command += ["--url", f"{upstream.target}/users/{USER_ID}"]
        floor = procs.start_server("floor", command, f"{HOST}:{port}", child_env())
        wait_ready(floor)
    return Servers(upstream, processor, bare, data_dir, floor), idle_rss, len(reply)


def soak(procs: Processes, servers: Servers, config: Config, idle_rss: float) -> Soak:
    """--calls calls at --concurrency through the processor, its RSS read every `config.every` calls."""
    result = Soak(config.calls, config.every, config.concurrency, idle_rss)
    pid = servers.processor.pid

    def take(calls: int) -> None:
        try:
            rss, cpu = rss_mb(pid), cpu_seconds(pid)
        except OSError:  # gone: say why
            servers.processor.check_alive()
            raise
        result.samples.append((calls, rss))
        result.cpu_s.append(cpu)

    take(0)

    def sample(line: dict[str, Any]) -> None:
        if "progress" in line:
            take(int(line["progress"]))
            print(
                f"  soak  {line['progress']:>7} calls  RSS {result.samples[-1][1]:6.1f} MB",
                file=sys.stderr,
                flush=True,
            )

    args = ["--mode", "count", "--target", servers.processor.target, "--concurrency", str(config.concurrency)]
    args += ["--calls", str(config.calls), "--every", str(config.every)]
    load, (upstream_cpu,) = measure(procs, servers.processor, args, also=[servers.upstream], on_line=sample)
    if result.samples[-1][0] != config.calls:
        take(config.calls)
    result.qps = load.qps
    result.errors, result.error_codes = load.errors, load.error_codes
    result.server_cpu_us_per_call = load.server_cpu_s * 1e6 / max(1, load.total_calls)
    result.upstream_cpu_us_per_call = upstream_cpu * 1e6 / max(1, load.total_calls)
    result.other_cpus, result.steal_cpus = load.other_cpus, load.steal_cpus
    return result


def measure_one(procs: Processes, servers: Servers, target: str, concurrency: int, config: Config) -> Run:
    timing = ["--concurrency", str(concurrency), "--duration", str(config.duration), "--warmup", str(config.warmup)]
    if target == "direct":
        args = ["--mode", "http", "--target", f"{servers.upstream.target}/users/{USER_ID}", *timing]
        load, _ = measure(procs, servers.upstream, args, cpu=config.direct_cpu)
        upstream_cpu, load.server_cpu_s = load.server_cpu_s, 0.0  # no server between the client and the upstream
        return Run(target, load, upstream_cpu)
    server = {"processor": servers.processor, "bare": servers.bare, "floor": servers.floor}[target]
    assert server is not None
    args = ["--mode", "grpc", "--target", server.target, *timing]
    load, (upstream_cpu,) = measure(procs, server, args, also=[servers.upstream])
    return Run(target, load, upstream_cpu)


def _rotate(items: list[str], by: int) -> list[str]:
    return items[by % len(items) :] + items[: by % len(items)]


def run_rounds(procs: Processes, servers: Servers, config: Config) -> list[Run]:
    """Interleaved rounds: bare and processor at --concurrency, then direct, bare and processor at 1."""
    runs: list[Run] = []
    for round_no in range(config.rounds):
        qps_order = _rotate(config.targets, round_no)  # so no target always goes first
        latency_order = _rotate(["direct", *config.targets], round_no)
        for concurrency, order in ((config.concurrency, qps_order), (1, latency_order)):
            for target in order:
                run = measure_one(procs, servers, target, concurrency, config)
                runs.append(run)
                load = run.load
                errors = f", {load.errors} errors {load.error_codes}" if load.errors else ""
                print(
                    f"  round {round_no + 1}/{config.rounds}  {target:<9}  c={concurrency:<3} {load.qps:8.1f} QPS"
                    f"  p50 {load.p50_ms:6.3f} ms  p99 {load.p99_ms:6.3f} ms{errors}",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def stored_records(data_dir: Path) -> int:
    """Execution records in the processor's SQLite file (read-only), or -1 when it cannot be read."""
    try:
        with sqlite3.connect(f"file:{data_dir / 'processor.db'}?mode=ro", uri=True, timeout=5.0) as db:
            return int(db.execute("SELECT count(*) FROM executions").fetchone()[0])
    except sqlite3.Error:
        return -1


# -- the report -----------------------------------------------------------------------------------------------------


def row(runs: list[Run], target: str, concurrency: int, config: Config) -> Row:
    mine = [r for r in runs if r.target == target and r.load.concurrency == concurrency]
    used_loads = clean_runs([r.load for r in mine])
    used = [r for r in mine if any(r.load is u for u in used_loads)]
    median = statistics.median
    busy: dict[int, float] = {}
    if config.pin:
        layout = config.layout()
        client = layout["direct client" if target == "direct" else "client"]
        for r in used:
            for cpu, seconds in (
                (layout["processor"], r.load.server_cpu_s),
                (client, r.load.client_cpu_s),
                (layout["upstream"], r.upstream_cpu_s),
            ):
                assert cpu is not None
                busy[cpu] = busy.get(cpu, 0.0) + seconds / r.load.wall_s / len(used)  # mean of the rounds used
    return Row(
        target,
        Summary.of([r.load for r in mine]),
        median(r.upstream_cpu_s * 1e6 / max(1, r.load.total_calls) for r in used),
        busy,
    )


def _cpu_cols(row: Row) -> str:
    s = row.summary
    srv = "-" if row.target == "direct" else f"{s.server_cpu_us_per_call:.0f}"
    return f"{srv:>5} {s.client_cpu_us_per_call:>5.0f} {row.upstream_cpu_us_per_call:>5.0f}"


def _busy_cols(row: Row) -> str:
    if not row.busy:
        return f"{'-':>5} {'-':>5}"
    return " ".join(f"{row.busy.get(cpu, 0.0):>5.0%}" for cpu in (SERVER_CPU, CLIENT_CPU))


def report(runs: list[Run], soaked: Soak, config: Config, reply_size: int) -> tuple[list[str], dict[str, Any]]:
    """The tables as lines, and everything as data (for --json)."""
    c = config.concurrency
    lines = [
        "",
        f"ActionService.Run({PRODUCT}/{ENV} {APP}.{EVENT}, params id={USER_ID}) -> GET /users/{USER_ID} -> "
        f"{len(UPSTREAM_BODY)} B JSON; Run reply {reply_size} B; median of {config.rounds} round(s) of "
        f"{config.duration:g} s after {config.warmup:g} s warm-up; 1 channel",
        f"CPU layout: {config.layout_text()}",
        f"goals: processor QPS >= {QPS_RATIO_GOAL:.2f}x bare at c={c}; at c=1 processor p50 <= direct p50 + "
        f"{P50_ADDED_GOAL_MS:.1f} ms, p99 <= direct p99 + {P99_ADDED_GOAL_MS:.1f} ms; processor RSS <= "
        f"{RSS_GOAL_MB:.0f} MB after {config.calls} calls, growing <= {RSS_GROWTH_GOAL:.0%} over the second half",
        "",
    ]
    noisy = 0.0
    errors: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    comparisons: dict[str, Any] = {}

    def note(r: Row, concurrency: int) -> None:
        nonlocal noisy
        noisy = max(noisy, r.summary.other_cpus + r.summary.steal_cpus)
        if r.summary.errors:
            errors.append(f"{r.target} at concurrency {concurrency}: {r.summary.errors} failed calls (see --json)")
        rows.setdefault(str(concurrency), {})[r.target] = asdict(r)

    header_tail = f"{'CPU µs/call srv cli ups':>23}  {'busy cpu0 cpu1':>11}  {'others':>6} {'steal':>5} {'rounds':>6}"
    lines.append(f"QPS at concurrency {c}")
    lines.append(
        f"{'server':<10} {'QPS':>8} {'min-max':>11} {'ratio':>7} {'':4}  {'p50 ms':>7} {'p99 ms':>7}  {header_tail}"
    )
    bare_q, proc_q, *floor_q = (row(runs, t, c, config) for t in config.targets)
    ratio = proc_q.summary.qps / bare_q.summary.qps if bare_q.summary.qps else 0.0
    comparisons["qps_ratio"] = ratio
    comparisons["qps_ratio_pass"] = ratio >= QPS_RATIO_GOAL
    for r in floor_q:
        comparisons["floor_qps_ratio"] = r.summary.qps / bare_q.summary.qps if bare_q.summary.qps else 0.0
    load_bound = False
    for r in (bare_q, proc_q, *floor_q):
        s = r.summary
        note(r, c)
        ratio_txt = "" if r is bare_q else f"{r.summary.qps / bare_q.summary.qps if bare_q.summary.qps else 0.0:.3f}x"
        ratio_ok = verdict(ratio >= QPS_RATIO_GOAL) if r is proc_q else ""
        busy_txt = _busy_cols(r)
        load_cpu = r.busy.get(CLIENT_CPU, 0.0) if config.pin else 0.0
        mark = "*" if load_cpu >= CLIENT_BOUND else " "
        load_bound |= mark == "*"
        lines.append(
            f"{r.target:<10} {s.qps:>8.1f} {f'{s.qps_min:.0f}-{s.qps_max:.0f}':>11} {ratio_txt:>7} {ratio_ok:<4}  "
            f"{s.p50_ms:>7.3f} {s.p99_ms:>7.3f}  {_cpu_cols(r):>23}  {busy_txt:>10}{mark}  "
            f"{s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} {f'{s.rounds_used}/{s.rounds}':>6}"
        )

    lines += ["", "Added latency at concurrency 1 (Δ = minus direct)"]
    lines.append(
        f"{'path':<10} {'QPS':>8} {'p50 ms':>8} {'Δp50 ms':>8} {'':4}  {'p99 ms':>8} {'Δp99 ms':>8} {'':4}  "
        f"{header_tail}"
    )
    direct, bare_1, proc_1, *floor_1 = (row(runs, t, 1, config) for t in ("direct", *config.targets))
    for r in (direct, bare_1, proc_1, *floor_1):
        s = r.summary
        note(r, 1)
        d50 = s.p50_ms - direct.summary.p50_ms
        d99 = s.p99_ms - direct.summary.p99_ms
        d50_txt = d99_txt = ok50 = ok99 = ""
        if r is not direct:
            d50_txt, d99_txt = f"{d50:+.3f}", f"{d99:+.3f}"
        if r is proc_1:
            ok50, ok99 = verdict(d50 <= P50_ADDED_GOAL_MS), verdict(d99 <= P99_ADDED_GOAL_MS)
            comparisons.update(
                p50_added_ms=d50,
                p50_added_pass=d50 <= P50_ADDED_GOAL_MS,
                p99_added_ms=d99,
                p99_added_pass=d99 <= P99_ADDED_GOAL_MS,
            )
        elif r is bare_1:
            comparisons.update(grpc_only_p50_added_ms=d50, grpc_only_p99_added_ms=d99)
        elif r is not direct:
            comparisons.update(floor_p50_added_ms=d50, floor_p99_added_ms=d99)
        busy_txt = _busy_cols(r)
        lines.append(
            f"{r.target:<10} {s.qps:>8.1f} {s.p50_ms:>8.3f} {d50_txt:>8} {ok50:<4}  {s.p99_ms:>8.3f} {d99_txt:>8} "
            f"{ok99:<4}  {_cpu_cols(r):>23}  {busy_txt:>10}   {s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} "
            f"{f'{s.rounds_used}/{s.rounds}':>6}"
        )
    lines += [
        "",
        "direct: an aiohttp client calling the upstream itself; bare: the gRPC round trip alone (canned reply)",
        *(
            [
                "floor: a bare gRPC handler (uvloop) that makes the same GET with the processor's HTTP client,"
                " then answers the canned reply"
            ]
            if config.floor
            else []
        ),
        "CPU µs/call: CPU time of the server / the client / the upstream process per call (warm-up included)",
        "busy: share of CPU 0 / CPU 1 the benchmark's processes kept busy during the load (mean of the rounds used)",
        "others, steal: CPU used meanwhile by other processes / taken by the hypervisor, in % of one CPU (highest)",
        f"rounds: rounds used / run; a round where others + steal reached {NOISE_LIMIT:.0%} is left out if any is not",
    ]
    if load_bound:
        lines.append(
            f"* CPU {CLIENT_CPU} (client{' and upstream' if config.upstream_cpu == CLIENT_CPU else ''}) was >= "
            f"{CLIENT_BOUND:.0%} busy: QPS may be limited by the load side, not the server"
        )

    # memory
    samples = soaked.samples
    half = config.calls / 2
    mid_index = min(range(len(samples)), key=lambda i: (abs(samples[i][0] - half), i))
    mid_rss = samples[mid_index][1]
    second_half = [mb for n, mb in samples[mid_index:]]
    growth = (max(second_half) - mid_rss) / mid_rss if mid_rss else 0.0
    final_rss = samples[-1][1]
    rss_ok, flat_ok = final_rss <= RSS_GOAL_MB, growth <= RSS_GROWTH_GOAL
    comparisons.update(rss_after_mb=final_rss, rss_pass=rss_ok, rss_growth_second_half=growth, rss_flat_pass=flat_ok)
    lines += [
        "",
        f"Processor RSS: {soaked.idle_rss_mb:.1f} MB idle after start-up; then {config.calls} calls at concurrency "
        f"{soaked.concurrency} ({soaked.qps:.0f} QPS, srv {soaked.server_cpu_us_per_call:.0f} µs/call, "
        f"ups {soaked.upstream_cpu_us_per_call:.0f} µs/call, others {soaked.other_cpus:.0%}, steal "
        f"{soaked.steal_cpus:.0%}, {soaked.errors} errors), sampled every {soaked.every} calls "
        "(µs/call: the processor's CPU per call since the previous sample):",
    ]
    per_call = ["-"] + [
        f"{(soaked.cpu_s[i] - soaked.cpu_s[i - 1]) * 1e6 / max(1, samples[i][0] - samples[i - 1][0]):.0f}"
        for i in range(1, len(samples))
    ]
    for start in range(0, len(samples), 11):
        chunk = samples[start : start + 11]
        lines.append("  calls    " + " ".join(f"{_short(n):>6}" for n, _ in chunk))
        lines.append("  MB       " + " ".join(f"{mb:>6.1f}" for _, mb in chunk))
        lines.append("  µs/call  " + " ".join(f"{us:>6}" for us in per_call[start : start + 11]))
    lines += [
        f"RSS after {config.calls} calls: {final_rss:.1f} MB  {verdict(rss_ok)}  (goal <= {RSS_GOAL_MB:.0f} MB)",
        f"growth over the second half ({samples[mid_index][0]} -> {samples[-1][0]} calls): {growth:+.1%} "
        f"{verdict(flat_ok)}  (goal <= {RSS_GROWTH_GOAL:.0%}: max of the samples from half-way on vs the half-way one)",
        f"execution records in the store at the end: {soaked.records_stored} "
        f"(successful Run calls the processor served in all: {soaked.total_calls})",
    ]
    if soaked.errors:
        errors.append(f"soak: {soaked.errors} failed calls {soaked.error_codes}")
    if noisy >= NOISE_LIMIT:
        lines.append(f"WARNING: others + steal reached {noisy:.0%} of a CPU in rounds used: the figures are noisy")
    lines += [f"ERROR: {e}" for e in errors]
    verdicts = [
        ("QPS ratio", comparisons["qps_ratio_pass"]),
        ("added p50", comparisons["p50_added_pass"]),
        ("added p99", comparisons["p99_added_pass"]),
        ("RSS", rss_ok),
        ("RSS flat", flat_ok),
    ]
    lines += ["", "goals: " + ", ".join(f"{name} {verdict(ok)}" for name, ok in verdicts)]
    data = {
        "config": {**asdict(config), "every": config.every, "layout": config.layout()},
        "reply_bytes": reply_size,
        "upstream_body": UPSTREAM_BODY.decode(),
        "goals": {
            "qps_ratio_min": QPS_RATIO_GOAL,
            "p50_added_ms_max": P50_ADDED_GOAL_MS,
            "p99_added_ms_max": P99_ADDED_GOAL_MS,
            "rss_mb_max": RSS_GOAL_MB,
            "rss_growth_second_half_max": RSS_GROWTH_GOAL,
        },
        "summary": rows,
        "comparisons": comparisons,
        "memory": asdict(soaked),
        "runs": [{"target": r.target, "upstream_cpu_s": r.upstream_cpu_s, **asdict(r.load)} for r in runs],
    }
    return lines, data


def _short(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def run_benchmark(config: Config, json_path: Path | None) -> int:
    def measure_all(procs: Processes, work: Path) -> Report:
        print("starting the upstream, the processor and the bare server ...", file=sys.stderr, flush=True)
        servers, idle_rss, reply_size = start_all(procs, config, work)
        print(f"  processor idle RSS {idle_rss:.1f} MB", file=sys.stderr, flush=True)
        soaked = soak(procs, servers, config, idle_rss)
        runs = run_rounds(procs, servers, config)
        time.sleep(0.5)  # the recorder writes every 0.2 s
        soaked.records_stored = stored_records(servers.data_dir)
        # fetch_reply's call, the soak's, and each processor run's first (connecting) call and measured ones
        soaked.total_calls = 1 + config.calls - soaked.errors
        soaked.total_calls += sum(1 + r.load.total_calls for r in runs if r.target == "processor")
        return report(runs, soaked, config, reply_size)

    return run_and_report(SCRIPT, config.pin, measure_all, json_path)


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--calls", type=int, default=100_000, help="calls of the RSS soak, right after start-up (default 100000)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight for QPS and soak (default 32)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading the idle RSS (default 2)")
    parser.add_argument(
        "--upstream-cpu",
        type=int,
        choices=(SERVER_CPU, CLIENT_CPU),
        default=CLIENT_CPU,
        help=f"CPU of the upstream: {CLIENT_CPU} beside the client (default), {SERVER_CPU} beside the processor",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare gRPC handler that makes the same GET with the processor's HTTP client "
        "(what gRPC + that client cost alone)",
    )
    return parser


def _internal(argv: list[str]) -> int:
    """The sub-commands the script runs itself with."""
    command, rest = argv[0], argv[1:]
    sub = argparse.ArgumentParser(prog=command)
    sub.add_argument("--port", type=int)
    if command == "_upstream":
        asyncio.run(serve_upstream(sub.parse_args(rest).port))
        return 0
    if command == "_floor-server":
        sub.add_argument("--reply-file", type=Path, required=True)
        sub.add_argument("--url", required=True)
        args = sub.parse_args(rest)
        floor = serve_floor(args.port, args.reply_file.read_bytes(), args.url)
        try:
            import uvloop  # the loop the processor runs on, when installed
        except ImportError:
            asyncio.run(floor)
        else:
            uvloop.run(floor)
        return 0
    if command == "_bare-server":
        return serve_canned_command(rest, SERVICE, "Run")
    sub.add_argument("--mode", choices=("grpc", "http", "count"), required=True)
    sub.add_argument("--target", required=True)
    sub.add_argument("--concurrency", type=int, required=True)
    sub.add_argument("--duration", type=float)
    sub.add_argument("--warmup", type=float)
    sub.add_argument("--calls", type=int)
    sub.add_argument("--every", type=int)
    args = sub.parse_args(rest)
    if args.mode == "grpc":
        result = asyncio.run(load_grpc(args.target, args.concurrency, args.duration, args.warmup))
    elif args.mode == "http":
        result = asyncio.run(load_http(args.target, args.concurrency, args.duration, args.warmup))
    else:
        result = asyncio.run(load_count(args.target, args.concurrency, args.calls, args.every))
    return emit(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_upstream"], ["_bare-server"], ["_floor-server"], ["_client"]):
        return _internal(argv)
    parser = _parser()
    args = parse_bench_args(parser, argv, quick={"calls": 2000})
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be >= 1")
    config = Config(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        calls=args.calls,
        concurrency=args.concurrency,
        idle=args.idle,
        pin=pinnable(args.pin),
        upstream_cpu=args.upstream_cpu,
        floor=args.floor,
    )
    return run_benchmark(config, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
