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

Internal sub-commands (the script runs itself with them): `_exec`, `_bare-server`, `_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.ProductService"
HOST = "127.0.0.1"
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0

QPS_RATIO_GOAL = 0.85  # full QPS / bare QPS, at least
P50_DIFF_GOAL_MS = 0.2  # full p50 - bare p50, at most
IDLE_RSS_GOAL_MB = 80.0  # full server's RSS after start-up, at most

SERVER_CPU = 0
CLIENT_CPU = 1
NOISE_LIMIT = 0.1  # other processes + hypervisor steal taking this much of a CPU during a run: noisy figures
CLIENT_BOUND = 0.9  # client CPU busy this fraction of the run: the client, not the server, limits QPS


# -- results -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    """What one client process measured."""

    concurrency: int
    duration_s: float
    calls: int  # completed in the measured window
    qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_codes: dict[str, int]
    total_calls: int  # including warm-up
    client_cpu_s: float  # including warm-up
    wall_s: float  # warm-up + duration
    server_cpu_s: float = 0.0  # filled in by the parent, from /proc
    other_cpus: float = 0.0  # CPUs (0..n) used meanwhile by processes other than server, client and this script
    steal_cpus: float = 0.0  # CPUs (0..n) stolen meanwhile by the hypervisor


@dataclass(slots=True)
class Summary:
    """The median of the rounds for one server at one concurrency, leaving out noisy rounds when others are clean."""

    qps: float
    qps_min: float
    qps_max: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float
    client_cpu_us_per_call: float
    client_busy: float  # client CPU time / wall time
    other_cpus: float  # the highest of the rounds used
    steal_cpus: float  # the highest of the rounds used
    errors: int
    rounds_used: int
    rounds: int

    @classmethod
    def of(cls, all_runs: list[LoadResult]) -> Summary:
        median = statistics.median
        runs = [r for r in all_runs if r.other_cpus + r.steal_cpus < NOISE_LIMIT] or all_runs
        return cls(
            qps=median(r.qps for r in runs),
            qps_min=min(r.qps for r in runs),
            qps_max=max(r.qps for r in runs),
            p50_ms=median(r.p50_ms for r in runs),
            p99_ms=median(r.p99_ms for r in runs),
            server_cpu_us_per_call=median(r.server_cpu_s * 1e6 / max(1, r.total_calls) for r in runs),
            client_cpu_us_per_call=median(r.client_cpu_s * 1e6 / max(1, r.total_calls) for r in runs),
            client_busy=median(r.client_cpu_s / r.wall_s for r in runs),
            other_cpus=max(r.other_cpus for r in runs),
            steal_cpus=max(r.steal_cpus for r in runs),
            errors=sum(r.errors for r in all_runs),
            rounds_used=len(runs),
            rounds=len(all_runs),
        )


@dataclass(slots=True)
class ServerResult:
    """One server: its memory and its runs."""

    name: str
    idle_rss_mb: float = 0.0
    loaded_rss_mb: float = 0.0
    runs: list[LoadResult] = field(default_factory=list)

    def summary(self, concurrency: int) -> Summary:
        return Summary.of([r for r in self.runs if r.concurrency == concurrency])


# -- subprocess plumbing --------------------------------------------------------------------------------------------


def _exec(cpu: int | None, command: list[str]) -> None:
    """Die with the parent, optionally pin to one CPU, then become `command` (same pid)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl
            sys.exit(1)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.execv(command[0], command)


@dataclass(slots=True)
class Server:
    """A server subprocess."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    target: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} server exited with {self.popen.returncode}; its output:\n{tail}")


class Processes:
    """The subprocesses this run started; `stop_all` stops those still running."""

    def __init__(self, pin: bool, log_dir: Path) -> None:
        self._pin = pin
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def _launcher(self, cpu: int) -> list[str]:
        return [sys.executable, SCRIPT, "_exec", *(["--cpu", str(cpu)] if self._pin else []), "--"]

    def start_server(self, name: str, command: list[str], target: str, env: dict[str, str]) -> Server:
        log_path = self._log_dir / f"{name.replace('+', '-')}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*self._launcher(SERVER_CPU), *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops the children itself
            )
        self._procs.append(proc)
        return Server(name, proc, log_path, target)

    def run_client(self, arguments: list[str]) -> dict[str, Any]:
        """Run a client process to completion and parse the JSON object it prints."""
        proc = subprocess.Popen(
            [*self._launcher(CLIENT_CPU), sys.executable, SCRIPT, "_client", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
        )
        self._procs.append(proc)
        out, err = proc.communicate()
        self._procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client exited with {proc.returncode}:\n{err.decode(errors='replace')}")
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_seconds() -> tuple[float, float]:
    """CPU time the whole machine spent in processes (user + system), and stolen by the hypervisor, in seconds.

    Interrupt time is left out: loopback traffic of the benchmark itself is processed there.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, steal = fields[0], fields[1], fields[2], fields[7]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tick, steal / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- readiness and the canned reply (in this process, synchronous gRPC) ---------------------------------------------


def wait_ready(server: Server) -> None:
    """Poll the standard gRPC health check until the server says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            server.check_alive()
            with contextlib.suppress(grpc.RpcError):
                # types-grpcio-health-checking does not declare the stub's methods
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)  # type: ignore[attr-defined]
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} server not SERVING after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)


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


# -- the bare server (a subprocess) -----------------------------------------------------------------------------------


async def serve_bare(port: int, reply: bytes) -> None:
    """A grpc.aio server with a generic Get handler, identity serializers and no interceptors (+ health checks)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def get(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return reply

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Get": grpc.unary_unary_rpc_method_handler(get)}),)
    )
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


# -- the load generator (a subprocess) ------------------------------------------------------------------------------


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


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

    latencies: list[float] = []
    error_codes: dict[str, int] = {}
    total = 0
    clock = time.perf_counter
    begin = clock()
    window_start = begin + warmup
    window_end = window_start + duration

    async def worker(stub: product_pb2_grpc.ProductServiceAsyncStub) -> None:
        nonlocal total
        while True:
            started = clock()
            if started >= window_end:
                return
            try:
                await stub.Get(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                error_codes[exc.code().name] = error_codes.get(exc.code().name, 0) + 1
                continue
            finished = clock()
            total += 1
            if window_start <= finished <= window_end:
                latencies.append(finished - started)

    gc.collect()
    gc.freeze()
    gc.disable()  # no client-side GC pauses in the measured latencies
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    finally:
        gc.enable()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    wall = clock() - begin
    for channel in opened:
        await channel.close()
    latencies.sort()
    ms = [1000.0 * _percentile(latencies, p) for p in (0.5, 0.9, 0.99)]
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration,
        calls=len(latencies),
        qps=len(latencies) / duration,
        p50_ms=ms[0],
        p90_ms=ms[1],
        p99_ms=ms[2],
        max_ms=(latencies[-1] * 1000.0) if latencies else 0.0,
        errors=sum(error_codes.values()),
        error_codes=error_codes,
        total_calls=total,
        client_cpu_s=(cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime),
        wall_s=wall,
    )


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


def _child_env(data_dir: Path | None = None) -> dict[str, str]:
    """This environment without OTEL_* / PROCESSOR_* variables (so no OTLP export), plus the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROCESSOR_"))}
    if data_dir is not None:
        env["PROCESSOR_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_processor(procs: Processes, name: str, work: Path, api_key: str | None) -> Server:
    """`ductape-processor serve` on a free loopback port, its own data dir, the example manifest."""
    data_dir = work / f"data-{name.replace('+', '-')}"
    data_dir.mkdir()
    port = free_port()
    script = Path(sys.executable).parent / "ductape-processor"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ductape_processor.cli"]
    command += ["serve", "--address", f"{HOST}:{port}", "--manifest", str(ROOT / "examples")]
    command += ["--shutdown-grace-s", "2"]
    if api_key is not None:
        command += ["--api-key-hash", hashlib.sha256(api_key.encode()).hexdigest()]
    return procs.start_server(name, command, f"{HOST}:{port}", _child_env(data_dir))


def start_bare(procs: Processes, work: Path, reply: bytes) -> Server:
    reply_file = work / "reply.bin"
    reply_file.write_bytes(reply)
    port = free_port()
    command = [sys.executable, SCRIPT, "_bare-server", "--port", str(port), "--reply-file", str(reply_file)]
    return procs.start_server("bare", command, f"{HOST}:{port}", _child_env())


def measure(procs: Processes, server: Server, concurrency: int, config: Config) -> LoadResult:
    """One client process against one server; CPU time of the server and of everything else is read around it."""
    server.check_alive()
    cpu_before = cpu_seconds(server.pid)
    (busy_before, steal_before), wall_before = machine_seconds(), time.monotonic()
    children_before, self_before = (
        resource.getrusage(resource.RUSAGE_CHILDREN),
        resource.getrusage(resource.RUSAGE_SELF),
    )
    raw = procs.run_client(
        [
            *("--target", server.target, "--concurrency", str(concurrency), "--channels", str(config.channels)),
            *("--duration", str(config.duration), "--warmup", str(config.warmup), "--api-key", config.api_key),
        ]
    )
    run = LoadResult(**raw)
    run.server_cpu_s = cpu_seconds(server.pid) - cpu_before
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    ours = run.server_cpu_s + _rusage_s(children) - _rusage_s(children_before) + _rusage_s(own) - _rusage_s(self_before)
    busy, steal = machine_seconds()
    wall = time.monotonic() - wall_before
    run.other_cpus = max(0.0, busy - busy_before - ours) / wall
    run.steal_cpus = (steal - steal_before) / wall
    return run


def _rusage_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_all(procs: Processes, config: Config, work: Path) -> tuple[list[ServerResult], int]:
    """Start the three servers, read their idle RSS, run the interleaved rounds, read their RSS after load."""
    full = start_processor(procs, "full", work, None)
    full_auth = start_processor(procs, "full+auth", work, config.api_key)
    for server in (full, full_auth):
        wait_ready(server)
    time.sleep(config.idle)
    idle = {s.name: rss_mb(s.pid) for s in (full, full_auth)}
    reply = fetch_reply(full.target, (("authorization", f"Bearer {config.api_key}"),))
    bare = start_bare(procs, work, reply)
    wait_ready(bare)
    time.sleep(config.idle)
    idle[bare.name] = rss_mb(bare.pid)

    servers = [bare, full, full_auth]
    results = {s.name: ServerResult(s.name, idle_rss_mb=idle[s.name]) for s in servers}
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


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


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
                ratio_txt, ratio_ok = f"{ratio:.3f}x", _verdict(ratio >= QPS_RATIO_GOAL)
                diff_txt, diff_ok, diff99_txt = f"{diff:+.3f}", _verdict(diff <= P50_DIFF_GOAL_MS), f"{diff99:+.3f}"
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
    lines.append(f"{'server':<9} {'idle RSS MB':>11} {'':4}  {'RSS after load MB':>17}")
    memory: list[dict[str, Any]] = []
    for server in results:
        ok = None if server is bare else server.idle_rss_mb <= IDLE_RSS_GOAL_MB
        lines.append(
            f"{server.name:<9} {server.idle_rss_mb:>11.1f} {'' if ok is None else _verdict(ok):<4}  "
            f"{server.loaded_rss_mb:>17.1f}"
        )
        memory.append(
            {
                "server": server.name,
                "idle_rss_mb": server.idle_rss_mb,
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


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT (even when inherited as ignored, as in `cmd &`) and SIGTERM unwind like Ctrl-C, so the `finally`
    blocks stop the subprocesses."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def run_benchmark(config: Config, json_path: Path | None) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp, _signals_as_interrupt():
        work = Path(tmp)
        procs = Processes(config.pin, work)
        try:
            print("starting the servers ...", file=sys.stderr, flush=True)
            results, reply_size = run_all(procs, config, work)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the servers", file=sys.stderr)
            return 130
        except RuntimeError as exc:  # a server or client failed: say why, without a traceback
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    lines, data = report(results, config, reply_size)
    data["elapsed_s"] = time.monotonic() - started
    print("\n".join(lines))
    print(f"\ntotal time {data['elapsed_s']:.0f} s")
    if json_path is not None:
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {json_path}")
    return 0


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up before each run (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown (default 3)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent calls per run (default 1 32)"
    )
    parser.add_argument("--channels", type=int, default=1, help="client channels the calls spread over (default 1)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading the idle RSS (default 2)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin servers and client to CPUs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    return parser


def _internal(argv: list[str]) -> int:
    """The sub-commands the script runs itself with."""
    command, rest = argv[0], argv[1:]
    sub = argparse.ArgumentParser(prog=command)
    if command == "_exec":
        sub.add_argument("--cpu", type=int)
        sub.add_argument("command", nargs=argparse.REMAINDER)
        args = sub.parse_args(rest)
        _exec(args.cpu, args.command[1:] if args.command[:1] == ["--"] else args.command)
        return 1  # not reached: exec replaced this process
    if command == "_bare-server":
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--reply-file", type=Path, required=True)
        args = sub.parse_args(rest)
        asyncio.run(serve_bare(args.port, args.reply_file.read_bytes()))
        return 0
    for name, kind in (("target", str), ("concurrency", int), ("duration", float), ("warmup", float)):
        sub.add_argument(f"--{name}", type=kind, required=True)
    sub.add_argument("--channels", type=int, required=True)
    sub.add_argument("--api-key", required=True)
    args = sub.parse_args(rest)
    result = asyncio.run(load(args.target, args.concurrency, args.duration, args.warmup, args.channels, args.api_key))
    print(json.dumps(asdict(result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_exec"], ["_bare-server"], ["_client"]):
        return _internal(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.channels < 1 or min(args.concurrency) < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --rounds, --channels and --concurrency >= 1")
    cpus = os.sched_getaffinity(0)
    config = Config(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        concurrency=sorted(set(args.concurrency)),
        channels=args.channels,
        idle=args.idle,
        pin=args.pin and {SERVER_CPU, CLIENT_CPU} <= cpus,
    )
    return run_benchmark(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
