#!/usr/bin/env python
"""The TypeScript client: its facade against raw @grpc/grpc-js calls, side by side in one run.

    python bench/bench_clients.py [--duration 8] [--slices 32] [--rounds 3] [--concurrency 32] [--messages 20000]
                                  [--sub-slices 16] [--json FILE]

Servers, each its own subprocess on 127.0.0.1 only (pinned to CPU 0 with two or more CPUs):

- `upstream`: bench_actions.py's aiohttp upstream (`GET /users/{id}` answering a small JSON body), on CPU 1;
- `processor`: `ductape-processor serve` with a product `bench`: an app `api` whose action `user` is
  `GET /users/:id` on the upstream (a path parameter and a small body contract), and a memory broker topic
  `events:bench`;
- `bare`: a grpc-js server (clients/typescript/bench/load.mjs `serve`) answering every ActionService.Run with one
  canned reply: the client's work is the same as with the processor, the server's is almost none, so the client's
  own cost shows.

The client is Node (clients/typescript/bench/load.mjs, on CPU 1). Each measurement is one process that runs both
clients in alternating slices (facade, raw, raw, facade, ...), so that the load other processes put on the machine
falls on both alike; the ratio of each round is facade / raw of that process, and the median over `--rounds` is
reported.

1. ActionService.Run at `--concurrency` (32) for `--duration` (8) seconds in all (`--slices` (32) slices, half each),
   against the processor and against the bare server: `facade` (`processor.action.run` with plain objects) vs `raw`
   (the generated grpc-js client called with the same request object, metadata and deadline, wrapped in a
   promise). Goal: facade >= 0.9x raw QPS. The client's CPU time per call is shown too.
2. Subscribe: `--messages` (20 000) JSON messages published to a fresh group, then consumed and acked, timed from
   the stream's opening to the last message handled, `--sub-slices` (16) times per round, alternating as above:
   `facade` (`for await` over `messageBroker.subscribe`, `message.json()`, `message.ack()`) vs `raw` (the generated
   duplex stream with the same init, asking for JSON values, reading each message's value, acks sent every 100 ids
   or 10 ms as the facade does). Each facade consumption is paired with the raw one next to it in time; the ratio
   is the median over every pair of every round (one consumption lasts a fraction of a second, so a stall of the
   machine can decide one pair, not the verdict). Goal: facade >= 0.8x raw messages/s.

The package must be built (`npm ci` and `npm run build` in clients/typescript; this script builds it when dist/ is
missing). Internal sub-command: `_upstream` (bench_actions.py's).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import (
    CLIENT_CPU,
    HARNESS,
    HOST,
    READY_TIMEOUT_S,
    ROOT,
    Processes,
    Report,
    Server,
    bench_parser,
    child_env,
    free_port,
    parse_bench_args,
    pinnable,
    processor_command,
    run_and_report,
    verdict,
    wait_ready,
)
from bench_actions import serve_upstream, wait_http

SCRIPT = str(Path(__file__).resolve())
NODE_SCRIPT = str(ROOT / "clients" / "typescript" / "bench" / "load.mjs")
PACKAGE = ROOT / "clients" / "typescript"
RUN_GOAL = 0.9
SUBSCRIBE_GOAL = 0.8


def manifest(upstream_url: str) -> dict[str, Any]:
    body = {"name": {"type": "string"}, "tags": {"type": "array"}, "count": {"type": "integer"}}
    return {
        "product": "bench",
        "environments": [{"slug": "dev"}],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": upstream_url}},
                "actions": [
                    {
                        "tag": "user",
                        "method": "GET",
                        "path": "/users/:id",
                        "input": {"params": {"id": {"type": "string", "required": True}}, "body": body},
                    }
                ],
            }
        ],
        "brokers": [{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": [{"tag": "bench", "name": "b"}]}],
    }


def ensure_built() -> str:
    """The path of node, with the package built."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    if not (PACKAGE / "node_modules").exists():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=PACKAGE, check=True)
    if not (PACKAGE / "dist" / "index.js").exists():
        subprocess.run([node, "node_modules/typescript/bin/tsc", "-p", "."], cwd=PACKAGE, check=True)
    return node


def node_client(node: str, pin: bool, arguments: list[str]) -> dict[str, Any]:
    launcher = [sys.executable, HARNESS, *(["--cpu", str(CLIENT_CPU)] if pin else []), "--"]
    done = subprocess.run(
        [*launcher, node, NODE_SCRIPT, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the node client exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def wait_port(server: Server) -> None:
    """Poll until the server accepts TCP connections."""
    host, port = server.target.rsplit(":", 1)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} is not listening after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def slice_pairs(slices: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(facade, raw) consumptions next to each other in time, from one process's slices in the order f r r f f r ..."""
    facade = [one for one in slices if one["mode"] == "facade"]
    raw = [one for one in slices if one["mode"] == "raw"]
    return list(zip(facade, raw, strict=False))


def paired(runs: dict[str, list[dict[str, Any]]], key: str, value: Any) -> float:
    """The median over rounds of facade / raw (the two measured in one process, in alternating slices)."""
    return statistics.median(value(f) / value(r) for f, r in zip(runs[f"{key}facade"], runs[f"{key}raw"], strict=True))


def measure(args: Any, procs: Processes, work: Path) -> Report:
    node = ensure_built()
    pin = pinnable(args.pin)
    port = free_port()
    upstream = procs.start_server(
        "upstream", [sys.executable, SCRIPT, "_upstream", str(port)], f"http://{HOST}:{port}", child_env(), CLIENT_CPU
    )
    wait_http(upstream)
    manifest_path = work / "bench.json"
    manifest_path.write_text(json.dumps(manifest(upstream.target)))
    data_dir = work / "data"
    data_dir.mkdir()
    port = free_port()
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_path)]
    processor = procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
    wait_ready(processor)
    port = free_port()
    bare = procs.start_server("bare", [node, NODE_SCRIPT, "serve", "--address", f"{HOST}:{port}"], f"{HOST}:{port}", {})
    wait_port(bare)

    runs: dict[str, list[dict[str, Any]]] = {}
    load = ["--duration", str(args.duration), "--warmup", str(args.warmup), "--concurrency", str(args.concurrency)]
    for _ in range(args.rounds):
        for target, server in (("processor", processor), ("bare", bare)):
            both = node_client(node, pin, ["run", "--address", server.target, *load, "--slices", str(args.slices)])
            for mode in ("raw", "facade"):
                runs.setdefault(f"{target}-{mode}", []).append(both[mode])
        sub = ["subscribe", "--address", processor.target, "--count", str(args.messages)]
        both = node_client(node, pin, [*sub, "--slices", str(args.sub_slices)])
        for mode in ("raw", "facade"):
            runs.setdefault(f"sub-{mode}", []).append(both[mode])
        runs.setdefault("sub-slices", []).append(both["slices"])

    def qps(run: dict[str, Any]) -> float:
        return float(run["calls"]) / float(run["wall_s"])

    def rate(run: dict[str, Any]) -> float:
        return float(run["messages"]) / float(run["wall_s"])

    def cpu_us(run: dict[str, Any], count: str) -> float:
        return float(run["cpu_s"]) * 1e6 / max(1, int(run[count]))

    figures: dict[str, Any] = {}
    for key, group in runs.items():
        if key == "sub-slices":
            continue
        if key.startswith("sub-"):
            figures[key] = {
                "messages_per_s": statistics.median(rate(r) for r in group),
                "client_cpu_us_per_message": statistics.median(cpu_us(r, "messages") for r in group),
            }
        else:
            figures[key] = {
                "qps": statistics.median(qps(r) for r in group),
                "p50_ms": statistics.median(r["p50_ms"] for r in group),
                "p99_ms": statistics.median(r["p99_ms"] for r in group),
                "client_cpu_us_per_call": statistics.median(cpu_us(r, "calls") for r in group),
                "errors": sum(r["errors"] for r in group),
            }
    ratios = {
        "processor": paired(runs, "processor-", qps),
        "bare": paired(runs, "bare-", qps),
    }
    pairs = [rate(f) / rate(r) for slices in runs["sub-slices"] for f, r in slice_pairs(slices)]
    ratios["subscribe"] = statistics.median(pairs)
    lines = [
        f"TypeScript client: facade vs raw @grpc/grpc-js ({args.rounds} rounds, medians; pinned: {pin})",
        "",
        f"ActionService.Run, concurrency {args.concurrency}, {args.duration:g} s:",
        "| server | client | QPS | p50 ms | p99 ms | client CPU µs/call | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in ("processor", "bare"):
        for mode in ("raw", "facade"):
            f = figures[f"{target}-{mode}"]
            lines.append(
                f"| {target} | {mode} | {f['qps']:.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
                f"{f['client_cpu_us_per_call']:.0f} | {f['errors']} |"
            )
    for target in ("processor", "bare"):
        ratio = ratios[target]
        lines.append(
            f"{target}: facade / raw QPS (median of the rounds' pairs) {ratio:.2f}x (goal >= {RUN_GOAL}x): "
            f"{verdict(ratio >= RUN_GOAL)}"
        )
    lines += [
        "",
        f"Subscribe, {args.messages} messages consumed and acked:",
        "| client | messages/s | client CPU µs/message |",
        "| --- | --- | --- |",
    ]
    for mode in ("raw", "facade"):
        f = figures[f"sub-{mode}"]
        lines.append(f"| {mode} | {f['messages_per_s']:.0f} | {f['client_cpu_us_per_message']:.1f} |")
    ratio = ratios["subscribe"]
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [ratio, ratio, ratio]
    lines.append(
        f"facade / raw messages/s (median of {len(pairs)} pairs of neighbouring consumptions, quartiles "
        f"{quartiles[0]:.2f}-{quartiles[2]:.2f}) {ratio:.2f}x (goal >= {SUBSCRIBE_GOAL}x): "
        f"{verdict(ratio >= SUBSCRIBE_GOAL)}"
    )
    return lines, {"figures": figures, "ratios": ratios, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_upstream"]:
        import asyncio

        asyncio.run(serve_upstream(int(argv[1])))
        return 0
    parser = bench_parser(__doc__, duration=8.0)
    parser.add_argument("--concurrency", type=int, default=32, help="Run calls in flight (default 32)")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per consumption (default 20000)")
    parser.add_argument("--slices", type=int, default=32, help="alternating Run slices per round (default 32)")
    parser.add_argument(
        "--sub-slices", type=int, default=16, help="alternating Subscribe consumptions per round (default 16)"
    )
    args = parse_bench_args(parser, argv, quick={"messages": 10_000, "sub_slices": 8})
    return run_and_report(SCRIPT, args.pin, lambda procs, work: measure(args, procs, work), args.json)


if __name__ == "__main__":
    sys.exit(main())
