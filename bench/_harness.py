"""What the benchmarks share: pinned subprocesses, the timed load loop, CPU and memory readings, noise accounting.

The benchmark scripts import this module (it sits next to them). It is also the launcher they start every
subprocess with: `python bench/_harness.py [--cpu N] -- command ...` makes the process die with its parent, pins
it to one CPU, then becomes `command` (same pid). Only the standard library is imported at module level, so that
launcher starts fast; grpc is imported inside the functions that need it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HARNESS = str(Path(__file__).resolve())
HOST = "127.0.0.1"
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0

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


def clean_runs(all_runs: list[LoadResult]) -> list[LoadResult]:
    """The runs where others + steal stayed under NOISE_LIMIT, or all of them when none did."""
    return [r for r in all_runs if r.other_cpus + r.steal_cpus < NOISE_LIMIT] or all_runs


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
        runs = clean_runs(all_runs)
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- subprocess plumbing --------------------------------------------------------------------------------------------


def exec_pinned(cpu: int | None, command: list[str]) -> None:
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
    """The subprocesses this run started; `stop_all` stops those still running.

    `script` is the benchmark script; clients run as `python <script> _client <arguments>`.
    """

    def __init__(self, script: str, pin: bool, log_dir: Path) -> None:
        self._script = script
        self._pin = pin
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def _launcher(self, cpu: int) -> list[str]:
        return [sys.executable, HARNESS, *(["--cpu", str(cpu)] if self._pin else []), "--"]

    def start_server(
        self, name: str, command: list[str], target: str, env: dict[str, str], cpu: int = SERVER_CPU
    ) -> Server:
        log_path = self._log_dir / f"{name.replace('+', '-')}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*self._launcher(cpu), *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops the children itself
            )
        self._procs.append(proc)
        return Server(name, proc, log_path, target)

    def start_canned(self, work: Path, reply: bytes) -> Server:
        """The `bare` server: `<script> _bare-server` answering every call with `reply` (see `serve_canned_command`)."""
        reply_file = work / "reply.bin"
        reply_file.write_bytes(reply)
        port = free_port()
        command = [sys.executable, self._script, "_bare-server", "--port", str(port), "--reply-file", str(reply_file)]
        return self.start_server("bare", command, f"{HOST}:{port}", child_env())

    def run_client(
        self,
        arguments: list[str],
        cpu: int = CLIENT_CPU,
        on_line: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Run a client process to completion and parse the last JSON object it prints.

        With `on_line`, every JSON object the client prints (one a line) is handed to it as soon as it arrives.
        """
        err_path = self._log_dir / "client.err"
        with err_path.open("wb") as err_file:
            proc = subprocess.Popen(
                [*self._launcher(cpu), sys.executable, self._script, "_client", *arguments],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err_file,
                cwd=ROOT,
                start_new_session=True,
            )
            self._procs.append(proc)
            assert proc.stdout is not None
            last = b""
            for line in proc.stdout:
                if line.strip():
                    last = line.strip()
                    if on_line is not None:
                        on_line(json.loads(last))
            proc.wait()
        self._procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client exited with {proc.returncode}:\n{err_path.read_text(errors='replace')}")
        return dict(json.loads(last))

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


def child_env(data_dir: Path | None = None) -> dict[str, str]:
    """This environment without OTEL_* / PROCESSOR_* variables (so no OTLP export), plus the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROCESSOR_"))}
    if data_dir is not None:
        env["PROCESSOR_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def processor_command() -> list[str]:
    """`ductape-processor` from the same bin/ folder as this Python, else `python -m ductape_processor.cli`."""
    script = Path(sys.executable).parent / "ductape-processor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ductape_processor.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
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


# -- CPU and memory, from /proc ---------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MiB."""
    return rss_parts_mb(pid)["VmRSS"]


def rss_parts_mb(pid: int) -> dict[str, float]:
    """VmRSS of a process and its parts, in MiB: `RssAnon` (the process's own memory) and `RssFile` (pages of mapped
    files, such as shared libraries: how many of a library's pages count depends on how much of the file the page
    cache holds, so this part moves between otherwise equal runs)."""
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            parts[name] = int(value.split()[0]) / 1024.0
    if "VmRSS" not in parts:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return parts


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


def rusage_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def measure(
    procs: Processes,
    server: Server,
    arguments: list[str],
    *,
    also: Sequence[Server] = (),
    cpu: int = CLIENT_CPU,
    on_line: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[LoadResult, list[float]]:
    """One client process against `server`; CPU time of the server, of `also` and of everything else is read
    around it. Returns the client's result and the CPU seconds each of `also` used meanwhile."""
    for one in (server, *also):
        one.check_alive()
    cpu_before = [cpu_seconds(s.pid) for s in (server, *also)]
    (busy_before, steal_before), wall_before = machine_seconds(), time.monotonic()
    children_before, self_before = (
        resource.getrusage(resource.RUSAGE_CHILDREN),
        resource.getrusage(resource.RUSAGE_SELF),
    )
    raw = procs.run_client(arguments, cpu=cpu, on_line=on_line)
    run = LoadResult(**raw)
    used = [cpu_seconds(s.pid) - before for s, before in zip((server, *also), cpu_before, strict=True)]
    run.server_cpu_s = used[0]
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    ours = sum(used) + rusage_s(children) - rusage_s(children_before) + rusage_s(own) - rusage_s(self_before)
    busy, steal = machine_seconds()
    wall = time.monotonic() - wall_before
    run.other_cpus = max(0.0, busy - busy_before - ours) / wall
    run.steal_cpus = (steal - steal_before) / wall
    return run, used[1:]


# -- readiness (in the parent, synchronous gRPC) and the canned-reply server (a subprocess) ---------------------------


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


async def serve_canned(port: int, service: str, method: str, reply: bytes) -> None:
    """A bare server (see `serve_handlers`) answering `service`/`method` with `reply`."""
    import grpc

    async def handle(request: bytes, context: Any) -> bytes:
        return reply

    await serve_handlers(port, service, {method: grpc.unary_unary_rpc_method_handler(handle)})


def serve_canned_command(rest: list[str], service: str, method: str) -> int:
    """The `_bare-server --port N --reply-file FILE` sub-command: `serve_canned` with the file's bytes."""
    sub = argparse.ArgumentParser(prog="_bare-server")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--reply-file", type=Path, required=True)
    args = sub.parse_args(rest)
    asyncio.run(serve_canned(args.port, service, method, args.reply_file.read_bytes()))
    return 0


async def serve_generic(port: int, service: str, method: str, handle: Callable[[bytes, Any], Awaitable[bytes]]) -> None:
    """A bare server (see `serve_handlers`) with one unary handler `handle(request bytes, context) -> reply bytes`."""
    import grpc

    await serve_handlers(port, service, {method: grpc.unary_unary_rpc_method_handler(handle)})


async def serve_handlers(port: int, service: str, handlers: dict[str, Any]) -> None:
    """A grpc.aio server with generic method `handlers` (method name -> grpc.RpcMethodHandler), identity
    serializers and no interceptors (+ health checks), serving `service` until SIGTERM or SIGINT."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
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


# -- the load loop (in a client subprocess) -------------------------------------------------------------------------


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def timed_load(
    calls: Sequence[Callable[[], Awaitable[object]]],
    concurrency: int,
    duration: float,
    warmup: float,
    failure: type[BaseException] | tuple[type[BaseException], ...],
    code: Callable[[Any], str],
) -> LoadResult:
    """`concurrency` coroutines making calls back to back for warmup + duration seconds (coroutine i uses
    `calls[i % len(calls)]`). An exception of type `failure` counts as an error under `code(exc)`."""
    latencies: list[float] = []
    error_codes: dict[str, int] = {}
    total = 0
    clock = time.perf_counter
    begin = clock()
    window_start = begin + warmup
    window_end = window_start + duration

    async def worker(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal total
        while True:
            started = clock()
            if started >= window_end:
                return
            try:
                await call()
            except failure as exc:
                name = code(exc)
                error_codes[name] = error_codes.get(name, 0) + 1
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
        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
    finally:
        gc.enable()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    wall = clock() - begin
    return load_result(
        latencies, error_codes, concurrency, duration, total, rusage_s(cpu_after) - rusage_s(cpu_before), wall
    )


def load_result(
    latencies: list[float],
    error_codes: dict[str, int],
    concurrency: int,
    duration: float,
    total: int,
    client_cpu_s: float,
    wall: float,
) -> LoadResult:
    """The figures of a load run from its calls' latencies (seconds, any order) in a window of `duration` s."""
    latencies.sort()
    ms = [1000.0 * percentile(latencies, p) for p in (0.5, 0.9, 0.99)]
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
        client_cpu_s=client_cpu_s,
        wall_s=wall,
    )


# -- the command line and the run of a benchmark script ---------------------------------------------------------------

Report = tuple[list[str], dict[str, Any]]
"""A benchmark's report: the lines printed and the figures written with --json."""


QUICK_DURATION_S = 1.0
QUICK_WARMUP_S = 0.2
"""`--quick` (what `make bench-quick` runs): one round of runs this short, for a check during changes."""


def bench_parser(doc: str | None, *, duration: float = 3.0) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --duration, --warmup, --rounds, --no-pin, --json, --quick."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--duration", type=float, default=duration, help=f"seconds measured per run (default {duration:g})"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up before each run (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown (default 3)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the processes to CPUs")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one round, {QUICK_DURATION_S:g} s runs after {QUICK_WARMUP_S:g} s warm-up, smaller loads (make "
        "bench-quick): a check during changes; options given explicitly still win",
    )
    return parser


def parse_bench_args(
    parser: argparse.ArgumentParser, argv: list[str], quick: Mapping[str, object] | None = None
) -> argparse.Namespace:
    """The parsed options, refusing a --duration that is not > 0, a negative --warmup or --rounds below 1.

    With --quick, the options left at their defaults take their quick values: one round, short runs, and the
    script's own `quick` values (option dest -> value, e.g. a smaller load).
    """
    args = parser.parse_args(argv)
    if args.quick:
        shorter = {"rounds": 1, "duration": QUICK_DURATION_S, "warmup": QUICK_WARMUP_S, **(quick or {})}
        for name, value in shorter.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0 and --rounds >= 1")
    return args


def pinnable(pin: bool) -> bool:
    """Whether to pin: asked for, and both the server's and the client's CPU are ours."""
    return pin and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


def emit(result: Any) -> int:
    """A client subprocess's answer to the parent: its result (a dataclass) as one JSON line on standard output."""
    print(json.dumps(asdict(result)))
    return 0


def run_and_report(
    script: str,
    pin: bool,
    measure: Callable[[Processes, Path], Report],
    json_path: Path | None,
    *,
    failures: tuple[type[BaseException], ...] = (RuntimeError,),
    after: Callable[[], None] | None = None,
    notes: Sequence[str] = (),
) -> int:
    """Run `measure(processes, work folder)` in a temporary folder, stop every subprocess it started, then print its
    report (and `notes`), the total time, and write the figures to `json_path`. Returns the exit status: 130 when
    interrupted, 1 when a server or client failed (an exception in `failures`: said without a traceback)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem.replace('_', '-')}-") as tmp, signals_as_interrupt():
        work = Path(tmp)
        procs = Processes(script, pin, work)
        try:
            lines, data = measure(procs, work)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the servers", file=sys.stderr)
            return 130
        except failures as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
            if after is not None:
                after()
    data["elapsed_s"] = time.monotonic() - started
    print("\n".join(lines))
    for note in notes:
        print(note)
    print(f"\ntotal time {data['elapsed_s']:.0f} s")
    if json_path is not None:
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {json_path}")
    return 0


if __name__ == "__main__":  # the launcher: python _harness.py [--cpu N] -- command ...
    _launch = argparse.ArgumentParser(prog="_harness.py")
    _launch.add_argument("--cpu", type=int)
    _launch.add_argument("command", nargs=argparse.REMAINDER)
    _args = _launch.parse_args()
    exec_pinned(_args.cpu, _args.command[1:] if _args.command[:1] == ["--"] else _args.command)
