#!/usr/bin/env python
"""Storage: streamed upload and download through the processor, side by side with the provider's client directly.

    python bench/bench_storage.py [--mib 128] [--rounds 3] [--rss-mib 1024] [--no-pin] [--json FILE]

One `ductape-processor serve` subprocess (SQLite store in a temp data dir, no OTLP endpoint) serves product `bench`
with two storages: `disk` (fs, under the data dir) and `bucket` (S3 on a moto server this script starts on a free
loopback port, as in the tests). For each provider and round, one file of `--mib` MiB (random bytes, sent in 1 MiB
chunks) is:
- processor: uploaded with the Python client's `storage.upload` (a client stream) and downloaded with
  `storage.download` (a server stream, 1 MiB chunks), the bytes hashed on arrival and compared;
- direct: written and read by the provider's own client against the same place. fs: the same folder, written and
  read 1 MiB at a time in a worker thread, flushed to disk before it counts as written, as the processor's saves are
  (what an application on the processor's disk would do). S3: aiobotocore,
  a multipart upload of 8 MiB parts, two in flight (the processor's own part size and parallelism), and a GetObject
  read 1 MiB at a time.
The rate is MiB / seconds from the first byte sent to the answer (upload), and from the request to the last byte
(download). Rounds interleave the paths; the median is shown. Goal: processor >= 0.7x direct, each way.

Then one `--rss-mib` MiB file (default 1 GiB) goes up and back through the processor on each provider while the
server's resident memory is read every 20 ms: its peak, against its idle size before. Goal: peak <= 150 MB.

CPU pinning (two CPUs; `--no-pin` turns it off): the processor on CPU 0, this script (the client of both paths) on
CPU 1; the moto server is not pinned (both paths use it). What the benchmarks share is in `_harness.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from _harness import (
    CLIENT_CPU,
    HOST,
    SERVER_CPU,
    Processes,
    Report,
    bench_parser,
    child_env,
    free_port,
    parse_bench_args,
    pinnable,
    processor_command,
    rss_mb,
    run_and_report,
    verdict,
    wait_ready,
)

SCRIPT = str(Path(__file__).resolve())
PRODUCT, ENV = "bench", "dev"
MIB = 1024 * 1024
PART = 8 * MIB
RATIO_GOAL = 0.7
RSS_GOAL_MB = 150.0
KEY_ID, SECRET = "AKIDBENCHSTORAGE", "bench-secret"  # made up for the emulator


def manifest(endpoint: str) -> dict[str, Any]:
    return {
        "product": PRODUCT,
        "environments": [{"slug": ENV}],
        "storage": [
            {"tag": "disk", "envs": {ENV: {"provider": "fs", "directory": "bench"}}},
            {
                "tag": "bucket",
                "envs": {
                    ENV: {
                        "provider": "s3",
                        "bucket": "bench",
                        "endpoint": endpoint,
                        "path_style": True,
                        "access_key_id": "$Secret{BENCH_KEY_ID}",
                        "secret_access_key": "$Secret{BENCH_SECRET}",
                    }
                },
            },
        ],
    }


async def blocks(total: int, block: bytes) -> AsyncIterator[bytes]:
    for _ in range(total // len(block)):
        yield block


class Direct:
    """The provider's own client against the place the processor writes to."""

    def __init__(self, folder: Path, endpoint: str) -> None:
        self.folder = folder
        self.endpoint = endpoint
        self.s3: Any = None

    async def open(self, stack: Any) -> None:
        from aiobotocore.session import get_session

        client = get_session().create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        self.s3 = await stack.enter_async_context(client)
        await self.s3.create_bucket(Bucket="bench")

    async def fs_up(self, key: str, total: int, block: bytes) -> None:
        path = self.folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            async for chunk in blocks(total, block):
                await asyncio.to_thread(handle.write, chunk)
            handle.flush()
            await asyncio.to_thread(os.fsync, handle.fileno())  # on disk before done, as the processor's saves

    async def fs_down(self, key: str) -> str:
        digest = hashlib.sha256()
        with (self.folder / key).open("rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, MIB):
                digest.update(chunk)
        return digest.hexdigest()

    async def s3_up(self, key: str, total: int, block: bytes) -> None:
        started = await self.s3.create_multipart_upload(Bucket="bench", Key=key)
        upload_id = started["UploadId"]
        slots = asyncio.Semaphore(2)
        sent: list[asyncio.Task[dict[str, Any]]] = []
        pending: list[bytes] = []

        async def part(number: int, body: bytes) -> dict[str, Any]:
            try:
                answer = await self.s3.upload_part(
                    Bucket="bench", Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            finally:
                slots.release()
            return {"ETag": answer["ETag"], "PartNumber": number}

        async for chunk in blocks(total, block):
            pending.append(chunk)
            if sum(map(len, pending)) >= PART:
                await slots.acquire()
                sent.append(asyncio.ensure_future(part(len(sent) + 1, b"".join(pending))))
                pending = []
        if pending:
            await slots.acquire()
            sent.append(asyncio.ensure_future(part(len(sent) + 1, b"".join(pending))))
        parts = list(await asyncio.gather(*sent))
        await self.s3.complete_multipart_upload(
            Bucket="bench", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    async def s3_down(self, key: str) -> str:
        digest = hashlib.sha256()
        answer = await self.s3.get_object(Bucket="bench", Key=key)
        async with answer["Body"] as body:
            async for chunk in body.iter_chunks(MIB):
                digest.update(chunk)
        return digest.hexdigest()


async def timed(work: Coroutine[Any, Any, Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await work
    return time.perf_counter() - started, result


async def through_processor(client: Any, storage: str, key: str, total: int, block: bytes) -> tuple[float, float, str]:
    where = {"product": PRODUCT, "env": ENV, "event": storage, "file_name": key}
    up_s, _ = await timed(client.storage.upload(blocks(total, block), **where, size=total))

    async def down() -> str:
        digest = hashlib.sha256()
        async for chunk in client.storage.download(**where):
            digest.update(chunk)
        return digest.hexdigest()

    down_s, digest = await timed(down())
    return up_s, down_s, digest


async def measure_async(procs: Processes, work: Path, args: Any) -> Report:
    import contextlib

    from ductape.processor import Processor

    pin = pinnable(args.pin)
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    moto_port = free_port()
    moto_bin = str(Path(sys.executable).with_name("moto_server"))
    env = child_env()
    moto = procs.start_server("moto", [moto_bin, "-H", HOST, "-p", str(moto_port)], f"{HOST}:{moto_port}", env)
    endpoint = f"http://{HOST}:{moto_port}"
    for _ in range(300):
        moto.check_alive()
        try:
            _, writer = await asyncio.open_connection(HOST, moto_port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    data_dir = work / "data"
    manifest_file = work / "bench.json"
    manifest_file.write_text(json.dumps(manifest(endpoint)))
    port = free_port()
    server_env = {
        **child_env(data_dir),
        "PROCESSOR_SECRET_BENCH_KEY_ID": KEY_ID,
        "PROCESSOR_SECRET_BENCH_SECRET": SECRET,
    }
    command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest_file)]
    server = procs.start_server("processor", command, f"{HOST}:{port}", server_env, cpu=SERVER_CPU)
    await asyncio.to_thread(wait_ready, server)

    total = args.mib * MIB
    block = os.urandom(MIB)
    expected = hashlib.sha256()
    for _ in range(total // len(block)):
        expected.update(block)
    rates: dict[str, list[float]] = {}
    lines: list[str] = []
    data: dict[str, Any] = {"mib": args.mib, "rounds": args.rounds}
    direct = Direct(data_dir / "storage" / "bench", endpoint)
    async with contextlib.AsyncExitStack() as stack:
        await direct.open(stack)
        client = await stack.enter_async_context(Processor(f"{HOST}:{port}", timeout=None))
        paths: dict[str, Callable[[int], Coroutine[Any, Any, tuple[float, float, str]]]] = {}

        async def direct_fs(n: int) -> tuple[float, float, str]:
            up_s, _ = await timed(direct.fs_up(f"direct-{n}", total, block))
            down_s, digest = await timed(direct.fs_down(f"direct-{n}"))
            return up_s, down_s, digest

        async def direct_s3(n: int) -> tuple[float, float, str]:
            up_s, _ = await timed(direct.s3_up(f"direct-{n}", total, block))
            down_s, digest = await timed(direct.s3_down(f"direct-{n}"))
            return up_s, down_s, digest

        paths["fs processor"] = lambda n: through_processor(client, "disk", f"proc-{n}", total, block)
        paths["fs direct"] = direct_fs
        paths["s3 processor"] = lambda n: through_processor(client, "bucket", f"proc-{n}", total, block)
        paths["s3 direct"] = direct_s3
        await through_processor(client, "disk", "warm", 4 * MIB, block)  # imports, pools
        await through_processor(client, "bucket", "warm", 4 * MIB, block)
        for round_ in range(args.rounds):
            names = list(paths)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in names:
                up_s, down_s, digest = await paths[name](round_)
                if digest != expected.hexdigest():
                    raise RuntimeError(f"{name}: the bytes downloaded differ from those uploaded")
                rates.setdefault(f"{name} up", []).append(args.mib / up_s)
                rates.setdefault(f"{name} down", []).append(args.mib / down_s)
                server.check_alive()

        lines.append(f"storage: {args.mib} MiB streamed, median of {args.rounds} rounds (MiB/s)")
        lines.append(f"{'':<14}{'up':>10}{'down':>10}")
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for provider in ("fs", "s3"):
            for path in ("processor", "direct"):
                name = f"{provider} {path}"
                lines.append(f"{name:<14}{medians[name + ' up']:>10.1f}{medians[name + ' down']:>10.1f}")
            for way in ("up", "down"):
                ratio = medians[f"{provider} processor {way}"] / medians[f"{provider} direct {way}"]
                data[f"{provider}_{way}_ratio"] = ratio
                lines.append(f"  {provider} {way}: processor/direct {ratio:.2f}x  {verdict(ratio >= RATIO_GOAL)}")
        data["mib_per_s"] = medians

        if args.rss_mib:
            lines.append(f"server RSS moving {args.rss_mib} MiB up and back (goal: peak <= {RSS_GOAL_MB:.0f} MB)")
            for storage in ("disk", "bucket"):
                idle = rss_mb(server.pid)
                peak = idle
                done = asyncio.Event()

                async def watch(done: asyncio.Event = done) -> None:
                    nonlocal peak
                    while not done.is_set():
                        peak = max(peak, rss_mb(server.pid))
                        await asyncio.sleep(0.02)

                watcher = asyncio.ensure_future(watch())
                await through_processor(client, storage, "rss", args.rss_mib * MIB, block)
                done.set()
                await watcher
                peak_mb = peak * MIB / 1e6
                data[f"rss_{storage}"] = {"idle_mib": idle, "peak_mib": peak, "peak_mb": peak_mb}
                lines.append(
                    f"  {storage:<7} idle {idle:.0f} MiB, peak {peak:.0f} MiB ({peak_mb:.0f} MB) "
                    f"{verdict(peak_mb <= RSS_GOAL_MB)}"
                )
    return lines, data


def main(argv: list[str]) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--mib", type=int, default=128, help="MiB per transfer in the rate runs (default 128)")
    parser.add_argument("--rss-mib", type=int, default=1024, help="MiB of the memory run; 0 skips it (default 1024)")
    args = parse_bench_args(parser, argv, quick={"mib": 16, "rss_mib": 128})

    def measure(procs: Processes, work: Path) -> Report:
        return asyncio.run(measure_async(procs, work, args))

    return run_and_report(SCRIPT, args.pin, measure, args.json)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
