#!/usr/bin/env python
"""Foundation benchmark: the processor's full gRPC stack against a bare grpc.aio server, side by side.

    python bench/bench_foundation.py [--duration 5] [--warmup 1] [--concurrency 1 32] [--json out.json]

Three servers are measured, one at a time, each in its own subprocess:

- `bare`: a grpc.aio server with one generic unary-unary handler (identity serializers, no interceptors) that answers
  ProductService.Get with the pre-serialized bytes of a real GetResponse, so both servers put the same bytes on
  the wire and the client is byte-for-byte the same;
- `full`: `ductape-processor serve --manifest examples/` (SQLite store in a temp data dir, interceptor as in
  production, no OTLP endpoint), ProductService.Get(product="shop", env="dev") served from memory;
- `full+auth`: the same with an API key configured, so the interceptor also checks the key.

For each server and concurrency, a fresh client process (generated stubs, one asyncio loop) runs N coroutines for
`--warmup` + `--duration` seconds and reports the calls completed in the measured window and their latencies. The
client sends `authorization: Bearer <key>` to all three servers, so the client's work is identical. On a machine
with two or more CPUs the server is pinned to CPU 0 and the client to CPU 1 (`--no-pin` to turn that off).
Everything listens on 127.0.0.1 only. Subprocesses are stopped on exit, Ctrl-C or error.

Internal sub-commands (used by the script itself): `_exec`, `_bare-server`, `_client`.
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
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "ductape.processor.v1.ProductService"
HOST = "127.0.0.1"
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0

QPS_RATIO_GOAL = 0.85  # full QPS / bare QPS, at least
P50_DIFF_GOAL_MS = 0.2  # full p50 - bare p50, at most
IDLE_RSS_GOAL_MB = 80.0  # full server's RSS after start-up, at most

SERVER_CPU = 0
CLIENT_CPU = 1


# -- results -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    """What one client run measured."""

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
    total_calls: int  # including warm-up, for the server CPU per call
    server_cpu_us_per_call: float = 0.0


@dataclass(slots=True)
class ServerResult:
    """One server: its memory and a load result per concurrency."""

    name: str
    idle_rss_mb: float = 0.0
    loaded_rss_mb: float = 0.0
    runs: list[LoadResult] = field(default_factory=list)

    def run(self, concurrency: int) -> LoadResult | None:
        return next((r for r in self.runs if r.concurrency == concurrency), None)


# -- subprocess plumbing --------------------------------------------------------------------------------------------


def _exec(cpu: int | None, command: list[str]) -> None:
    """Die with the parent, optionally pin to one CPU, then become `command` (same pid)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl
            sys.exit(1)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.execv(command[0], command)


class Processes:
    """The subprocesses this run started; all stopped on exit."""

    def __init__(self, pin: bool, log_dir: Path) -> None:
        self._pin = pin
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], *, cpu: int, env: dict[str, str] | None = None) -> Process:
        launcher = [sys.executable, str(Path(__file__).resolve()), "_exec"]
        if self._pin:
            launcher += ["--cpu", str(cpu)]
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*launcher, "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops the children itself
            )
        self._procs.append(proc)
        return Process(name, proc, log_path)

    def run_json(self, command: list[str], *, cpu: int) -> dict[str, Any]:
        """Run a command to completion and parse the JSON object it prints last on standard output."""
        launcher = [sys.executable, str(Path(__file__).resolve()), "_exec"]
        if self._pin:
            launcher += ["--cpu", str(cpu)]
        proc = subprocess.Popen(
            [*launcher, "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
        )
        self._procs.append(proc)
        try:
            out, err = proc.communicate()
        finally:
            self._procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client exited with {proc.returncode}:\n{err.decode(errors='replace')}")
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    def stop(self, process: Process, timeout: float = 10.0) -> None:
        proc = process.popen
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in list(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


@dataclass(slots=True)
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} server exited with {self.popen.returncode}; its output:\n{tail}")


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- readiness (in this process, synchronous gRPC) --------------------------------------------------------------------


def wait_ready(process: Process, target: str) -> None:
    """Poll the standard gRPC health check until the server says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            process.check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} server not SERVING after {READY_TIMEOUT_S:.0f} s")
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
    """A grpc.aio server with a generic Get handler, identity serializers and no interceptors."""
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
    window_start = clock() + warmup
    window_end = window_start + duration

    async def worker(stub: product_pb2_grpc.ProductServiceStub) -> None:
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
    try:
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    finally:
        gc.enable()
        for channel in opened:
            await channel.close()
    latencies.sort()
    ms = [x * 1000.0 for x in (_percentile(latencies, 0.5), _percentile(latencies, 0.9), _percentile(latencies, 0.99))]
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
    )


# -- orchestration --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    duration: float
    warmup: float
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


def _processor_command(port: int, api_key_hash: str | None) -> list[str]:
    script = Path(sys.executable).parent / "ductape-processor"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "ductape_processor.cli"]
    command = [
        *base,
        "serve",
        "--address",
        f"{HOST}:{port}",
        "--manifest",
        str(ROOT / "examples"),
        "--shutdown-grace-s",
        "2",
    ]
    if api_key_hash is not None:
        command += ["--api-key-hash", api_key_hash]
    return command


def measure(procs: Processes, server: Process, target: str, result: ServerResult, config: Config) -> None:
    """Run one client process per concurrency against a ready server."""
    for concurrency in config.concurrency:
        server.check_alive()
        cpu_before = cpu_seconds(server.pid)
        raw = procs.run_json(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "_client",
                "--target",
                target,
                "--concurrency",
                str(concurrency),
                "--duration",
                str(config.duration),
                "--warmup",
                str(config.warmup),
                "--channels",
                str(config.channels),
                "--api-key",
                config.api_key,
            ],
            cpu=CLIENT_CPU,
        )
        cpu_used = cpu_seconds(server.pid) - cpu_before
        run = LoadResult(**raw)
        # the connect calls and the idle time around the run are included: a slight over-estimate, same for all
        run.server_cpu_us_per_call = cpu_used * 1e6 / max(1, run.total_calls)
        result.runs.append(run)
        errors = f", {run.errors} errors {run.error_codes}" if run.errors else ""
        print(
            f"  {result.name:<10} c={concurrency:<3} {run.qps:9.1f} QPS  p50 {run.p50_ms:.3f} ms  "
            f"p99 {run.p99_ms:.3f} ms{errors}",
            file=sys.stderr,
            flush=True,
        )


def bench_processor(
    procs: Processes, name: str, config: Config, work: Path, *, auth: bool
) -> tuple[ServerResult, bytes]:
    data_dir = work / f"data-{name.replace('+', '-')}"
    data_dir.mkdir()
    port = free_port()
    target = f"{HOST}:{port}"
    key_hash = hashlib.sha256(config.api_key.encode()).hexdigest() if auth else None
    server = procs.start(name, _processor_command(port, key_hash), cpu=SERVER_CPU, env=_child_env(data_dir))
    try:
        wait_ready(server, target)
        time.sleep(config.idle)
        result = ServerResult(name, idle_rss_mb=rss_mb(server.pid))
        reply = fetch_reply(target, (("authorization", f"Bearer {config.api_key}"),))
        measure(procs, server, target, result, config)
        result.loaded_rss_mb = rss_mb(server.pid)
    finally:
        procs.stop(server)
    return result, reply


def bench_bare(procs: Processes, config: Config, work: Path, reply: bytes) -> ServerResult:
    reply_file = work / "reply.bin"
    reply_file.write_bytes(reply)
    port = free_port()
    target = f"{HOST}:{port}"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_bare-server",
        "--port",
        str(port),
        "--reply-file",
        str(reply_file),
    ]
    server = procs.start("bare", command, cpu=SERVER_CPU, env=_child_env())
    try:
        wait_ready(server, target)
        time.sleep(config.idle)
        result = ServerResult("bare", idle_rss_mb=rss_mb(server.pid))
        measure(procs, server, target, result, config)
        result.loaded_rss_mb = rss_mb(server.pid)
    finally:
        procs.stop(server)
    return result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: list[ServerResult], config: Config, reply_size: int) -> tuple[list[str], dict[str, Any]]:
    """The table as lines, and the comparison as data (for --json)."""
    bare = results[0]
    lines = [
        "",
        f"ProductService.Get(product='shop', env='dev'), {reply_size} B reply; "
        f"{config.duration:g} s measured after {config.warmup:g} s warm-up, {config.channels} channel(s); "
        + (f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if config.pin else "no CPU pinning"),
        f"goals: QPS ratio >= {QPS_RATIO_GOAL:.2f}x bare, p50 <= bare + {P50_DIFF_GOAL_MS:.2f} ms, "
        f"full idle RSS <= {IDLE_RSS_GOAL_MB:.0f} MB",
        "",
        f"{'conc':>4}  {'server':<10} {'QPS':>9} {'ratio':>7} {'':4}  {'p50 ms':>7} {'p99 ms':>7} "
        f"{'Δp50 ms':>8} {'':4}  {'srv CPU µs/call':>15}  errors",
    ]
    comparisons: list[dict[str, Any]] = []
    for concurrency in config.concurrency:
        base = bare.run(concurrency)
        for server in results:
            run = server.run(concurrency)
            if run is None or base is None:
                continue
            if server is bare:
                ratio_txt, ratio_ok, diff_txt, diff_ok = "", "", "", ""
            else:
                ratio = run.qps / base.qps if base.qps else 0.0
                diff = run.p50_ms - base.p50_ms
                ratio_txt, ratio_ok = f"{ratio:.2f}x", _verdict(ratio >= QPS_RATIO_GOAL)
                diff_txt, diff_ok = f"{diff:+.3f}", _verdict(diff <= P50_DIFF_GOAL_MS)
                comparisons.append(
                    {
                        "server": server.name,
                        "concurrency": concurrency,
                        "qps_ratio": ratio,
                        "qps_ratio_pass": ratio >= QPS_RATIO_GOAL,
                        "p50_diff_ms": diff,
                        "p50_diff_pass": diff <= P50_DIFF_GOAL_MS,
                        "p99_diff_ms": run.p99_ms - base.p99_ms,
                    }
                )
            lines.append(
                f"{concurrency:>4}  {server.name:<10} {run.qps:>9.1f} {ratio_txt:>7} {ratio_ok:<4}  "
                f"{run.p50_ms:>7.3f} {run.p99_ms:>7.3f} {diff_txt:>8} {diff_ok:<4}  "
                f"{run.server_cpu_us_per_call:>15.0f}  {run.errors}"
            )
        lines.append("")
    memory: list[dict[str, Any]] = []
    lines.append(f"{'server':<10} {'idle RSS MB':>11} {'':4}  {'RSS after load MB':>17}")
    for server in results:
        goal = _verdict(server.idle_rss_mb <= IDLE_RSS_GOAL_MB) if server is not bare else ""
        lines.append(f"{server.name:<10} {server.idle_rss_mb:>11.1f} {goal:<4}  {server.loaded_rss_mb:>17.1f}")
        memory.append(
            {
                "server": server.name,
                "idle_rss_mb": server.idle_rss_mb,
                "loaded_rss_mb": server.loaded_rss_mb,
                "idle_rss_pass": None if server is bare else server.idle_rss_mb <= IDLE_RSS_GOAL_MB,
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
        "servers": [asdict(server) for server in results],
        "comparisons": comparisons,
        "memory": memory,
    }
    return lines, data


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to this script unwinds like Ctrl-C, so the `finally` blocks stop the subprocesses."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_benchmark(config: Config, json_path: Path | None) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp, _sigterm_as_interrupt():
        work = Path(tmp)
        procs = Processes(config.pin, work)
        try:
            print("measuring (server, concurrency, QPS, latency) ...", file=sys.stderr, flush=True)
            full, reply = bench_processor(procs, "full", config, work, auth=False)
            bare = bench_bare(procs, config, work, reply)
            full_auth, _ = bench_processor(procs, "full+auth", config, work, auth=True)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    lines, data = report([bare, full, full_auth], config, len(reply))
    data["elapsed_s"] = time.monotonic() - started
    print("\n".join(lines))
    print(f"total time {data['elapsed_s']:.0f} s")
    if json_path is not None:
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {json_path}")
    return 0


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each run (default 1)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent calls per run (default 1 32)"
    )
    parser.add_argument("--channels", type=int, default=1, help="client channels the calls spread over (default 1)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading the idle RSS (default 2)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and client to CPUs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_exec"]:
        sub = argparse.ArgumentParser(prog="_exec")
        sub.add_argument("--cpu", type=int)
        sub.add_argument("command", nargs=argparse.REMAINDER)
        args = sub.parse_args(argv[1:])
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        _exec(args.cpu, command)
        return 1  # not reached
    if argv[:1] == ["_bare-server"]:
        sub = argparse.ArgumentParser(prog="_bare-server")
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--reply-file", type=Path, required=True)
        args = sub.parse_args(argv[1:])
        asyncio.run(serve_bare(args.port, args.reply_file.read_bytes()))
        return 0
    if argv[:1] == ["_client"]:
        sub = argparse.ArgumentParser(prog="_client")
        sub.add_argument("--target", required=True)
        sub.add_argument("--concurrency", type=int, required=True)
        sub.add_argument("--duration", type=float, required=True)
        sub.add_argument("--warmup", type=float, required=True)
        sub.add_argument("--channels", type=int, required=True)
        sub.add_argument("--api-key", required=True)
        args = sub.parse_args(argv[1:])
        result = asyncio.run(
            load(args.target, args.concurrency, args.duration, args.warmup, args.channels, args.api_key)
        )
        print(json.dumps(asdict(result)))
        return 0

    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or any(c < 1 for c in args.concurrency) or args.channels < 1:
        _parser().error("--duration must be > 0, --warmup >= 0, --concurrency and --channels >= 1")
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2 and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    config = Config(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=sorted(set(args.concurrency)),
        channels=args.channels,
        idle=args.idle,
        pin=pin,
    )
    return run_benchmark(config, args.json)


if __name__ == "__main__":
    sys.exit(main())
