#!/usr/bin/env python
"""Message brokers: publish -> subscribe through the processor, side by side with each broker's own Python client.

    python bench/bench_brokers.py [--messages 20000] [--single-messages 2000] [--rounds 3] [--json FILE]

One `ductape-processor serve` subprocess (SQLite store in a temp data dir, no OTLP endpoint, no API key) serves a
manifest with three brokers of one product, `bench`: `nats` (the local NATS JetStream at nats://127.0.0.1:4222,
JetStream stream `bench_<run>`), `redis` (the local Redis at redis://127.0.0.1:6379/0) and `memory`. Every
throughput run uses its own topic (and consumer group), so runs never see each other's messages; everything a run
created on the brokers is deleted afterwards (a broker that is not reachable is skipped, with a note).

1. End-to-end throughput, NATS and Redis. A subscriber process opens its subscription; once it is open, a publisher
   process publishes `--messages` distinct 128-byte payloads; the rate is messages ÷ (first publish -> the last
   distinct message received, both read from the system's monotonic clock). Every message is acked.
   - processor: the Python client (`ductape.processor`). Publisher: `publish_batch` with `--batch` (100) messages,
     `--batches-in-flight` (4) calls at a time (`batch`), or single `publish` calls at `--concurrency` (32)
     (`single`, `--single-messages`). Subscriber: `subscribe(max_batch=100, max_in_flight=1000)` in `async for`,
     `await message.ack()` on every message (the client batches the acks).
   - direct: the broker's own client. NATS (nats-py): `js.publish_async` with as many acks pending as the processor
     path has messages in flight (`batch`), or `js.publish` at `--concurrency` (`single`); a durable pull consumer
     (deliver new, explicit ack) fetching 100 at a time and acking each message. Redis (redis.asyncio): pipelines
     of 100 XADD, as many in flight as the processor path (`batch`), or XADD at `--concurrency` (`single`);
     XREADGROUP COUNT 100 then XACK of the batch.
   Goal, with batches: processor >= 0.5x direct. Single publishes get no goal against the direct client (one unary
   call a message cannot match its pipelined publishes; the ratio is shown for information): their goal is the
   floor's, below. Beside them, `grpc single bare`: the single-publish client against a bare
   grpc.aio server that only answers (no subscriber), the most unary publishes gRPC itself carries here.
   Single publishes alone (`publish`, no subscriber): the processor against the floor, a bare grpc.aio handler that
   decodes each PublishRequest and makes the direct client's single publish with its payload (`js.publish`,
   `XADD`), with the same client at `--concurrency`. Goal: processor publish/s >= 0.8x the floor's.
2. The memory broker through the processor (`batch`, as above). Goal: >= 100 000 messages/s. Beside it, `bare`: the
   bare server streams pre-serialized batches of 100 messages shaped like the processor's; `bare` reads them with
   the same subscriber code (the Python client, acking), `bare-raw` with the generated stub, counting.
3. Publish latency at concurrency 1 over `--duration` seconds after `--warmup`: the client's `publish` through the
   processor against `js.publish` / `XADD` directly, and against the bare server (the gRPC round trip alone).
   Goal: processor p90 <= direct p90 + 1 ms.

The bare server is one grpc.aio process with generic handlers (identity serializers, no interceptors) for
BrokerService.Subscribe and BrokerService.Publish; the floor server another, whose Publish publishes to the broker
its `event` names (`nats:<subject>` or `redis:<stream key>`, the direct client's), over one connection each.

CPU pinning (two CPUs; `--no-pin` turns it off): the processor (and the bare and floor servers) on CPU 0; the gRPC
publisher and subscriber on CPU 1. The direct publisher runs on CPU 0, where the processor would otherwise be
publishing, and the direct subscriber on CPU 1, so both paths get the whole machine. The NATS and Redis servers are
shared system services: they are not pinned, and their CPU time per message is shown. Latency clients (all paths)
run on CPU 1. Rounds are interleaved (the order of the paths rotates); the median is shown, leaving out rounds that
other processes or the hypervisor made noisy. Subprocesses are stopped on exit, Ctrl-C, SIGTERM or error.

Internal sub-commands (the script runs itself with them): `_bare-server`, `_floor-server`, `_sub`, `_pub`, `_lat`.
What the benchmarks share (the pinned-subprocess launcher, the load loop, the /proc readings) is in `_harness.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    CLIENT_BOUND,
    CLIENT_CPU,
    HOST,
    NOISE_LIMIT,
    SERVER_CPU,
    LoadResult,
    Processes,
    Report,
    Server,
    bench_parser,
    child_env,
    cpu_seconds,
    emit,
    free_port,
    machine_seconds,
    parse_bench_args,
    pinnable,
    processor_command,
    run_and_report,
    rusage_s,
    serve_handlers,
    timed_load,
    verdict,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
SERVICE = "ductape.processor.v1.BrokerService"
PRODUCT, ENV, GROUP = "bench", "dev", "g"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
BROKERS = {"nats": (4222, "nats-server"), "redis": (6379, "redis-server")}  # port, server process name
PAYLOAD_BYTES = 128
SUB_BATCH = 100  # subscriber: messages per batch (processor max_batch, NATS fetch, XREADGROUP COUNT)
SUB_IN_FLIGHT = 1000  # subscriber: processor max_in_flight
IDLE_GIVE_UP_S = 5.0  # a subscriber that receives nothing for this long gives up (lost messages)

RATIO_GOAL = 0.5  # processor msg/s / direct msg/s, at least
MEMORY_GOAL = 100_000.0  # memory broker through the processor, msg/s, at least
FLOOR_GOAL = 0.8  # single publishes: processor publish/s / the floor's (a bare handler's direct publish), at least
P90_DIFF_GOAL_MS = 1.0  # processor publish p90 - direct p90 at concurrency 1, at most

SERVER_INDEX = {"processor": 0, "bare": 1, "floor": 2}  # where each server's CPU time is in `Meter.stop`'s list
DIRECT_PUB_CPU = SERVER_CPU  # the direct publisher runs where the processor would run
SUB_CPU = CLIENT_CPU


def payload(index: int) -> bytes:
    """The `index`th message: a distinct JSON document of PAYLOAD_BYTES bytes."""
    head = b'{"seq":%09d,"pad":"' % index
    return head + b"x" * (PAYLOAD_BYTES - len(head) - 2) + b'"}'


# -- the subscriber (a subprocess) ------------------------------------------------------------------------------------


class Receiver:
    """Counts deliveries and distinct payloads; notes when the last expected one arrived."""

    def __init__(self, expected: int, distinct: bool = True) -> None:
        self.expected = expected
        self.distinct = distinct
        self.seen: set[bytes] = set()
        self.deliveries = 0
        self.open_ns = 0  # just before the subscription was opened
        self.ready_ns = 0
        self.last_ns = 0
        self.cpu_start = 0.0
        self.cpu_s = 0.0

    def ready(self, ready_file: Path) -> None:
        gc.collect()
        gc.freeze()
        gc.disable()  # the same for both paths: no collector pauses while receiving
        self.cpu_start = rusage_s(resource.getrusage(resource.RUSAGE_SELF))
        self.ready_ns = time.monotonic_ns()
        ready_file.write_text("ready")

    def got(self, data: bytes) -> bool:
        """One delivery; True once every expected message arrived."""
        self.deliveries += 1
        self.seen.add(data)
        if len(self.seen) >= self.expected:
            self.last_ns = self.last_ns or time.monotonic_ns()
            return True
        return False

    def got_many(self, count: int) -> bool:
        """`count` deliveries, not checked for repeats (the bare server sends each message once)."""
        self.deliveries += count
        if self.deliveries >= self.expected:
            self.last_ns = self.last_ns or time.monotonic_ns()
            return True
        return False

    @property
    def received(self) -> int:
        return len(self.seen) if self.distinct else self.deliveries

    def finish(self) -> dict[str, Any]:
        self.cpu_s = rusage_s(resource.getrusage(resource.RUSAGE_SELF)) - self.cpu_start
        gc.enable()
        return {
            "received": self.received,
            "deliveries": self.deliveries,
            "open_ns": self.open_ns,
            "ready_ns": self.ready_ns,
            "last_ns": self.last_ns,
            "cpu_s": self.cpu_s,
        }


async def consume_until_done(receiver: Receiver, consume: Callable[[], Awaitable[None]]) -> None:
    """Run `consume` until it returns, or until nothing arrived for IDLE_GIVE_UP_S (messages were lost)."""
    task = asyncio.ensure_future(consume())
    seen, still = -1, 0.0
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if receiver.deliveries != seen:
            seen, still = receiver.deliveries, 0.0
        else:
            still += 0.25
            if still >= IDLE_GIVE_UP_S:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return
    task.result()


async def subscribe_processor(args: argparse.Namespace, receiver: Receiver) -> None:
    """The Python client: `async for` over a subscription, acking every message."""
    from ductape.processor import Processor

    async with Processor(args.target, timeout=None) as processor:
        await processor.channel.channel_ready()
        receiver.open_ns = time.monotonic_ns()
        subscription = processor.message_broker.subscribe(
            product=PRODUCT, env=ENV, event=args.name, group=GROUP, max_in_flight=SUB_IN_FLIGHT, max_batch=SUB_BATCH
        )
        messages = subscription.__aiter__()
        first = asyncio.ensure_future(anext(messages))
        while subscription._call is None:  # set once the server answered `ready`: the group exists
            if first.done():
                first.result()
            await asyncio.sleep(0.002)
        receiver.ready(args.ready_file)

        async def consume() -> None:
            message = await first
            while True:
                done = receiver.got(message.data)
                await message.ack()
                if done:
                    return
                message = await anext(messages)

        await consume_until_done(receiver, consume)
        await subscription.close()


async def subscribe_bare_raw(args: argparse.Namespace, receiver: Receiver) -> None:
    """The generated stub on the bare server: read the batches and count their messages."""
    import grpc
    from ductape.processor.v1 import broker_pb2, broker_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = broker_pb2_grpc.BrokerServiceStub(channel)
        end = asyncio.Event()

        async def requests() -> Any:
            yield broker_pb2.SubscribeRequest(init=broker_pb2.SubscribeInit(product=PRODUCT, env=ENV, event="x:y"))
            await end.wait()

        await channel.channel_ready()
        receiver.open_ns = time.monotonic_ns()
        subscribe: Any = stub.Subscribe
        call = subscribe(requests())
        await call.read()  # ready
        receiver.ready(args.ready_file)

        async def consume() -> None:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF or receiver.got_many(len(response.batch.messages)):
                    return

        await consume_until_done(receiver, consume)
        end.set()
        call.cancel()


async def subscribe_nats(args: argparse.Namespace, receiver: Receiver) -> None:
    """nats-py: a durable pull consumer (deliver new, explicit ack) fetching SUB_BATCH at a time."""
    import nats
    import nats.errors
    from nats.js import api

    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_deliver=-1,
            max_ack_pending=20_000,  # as the processor's consumers
        )
        pull = await js.pull_subscribe(args.name, durable=args.durable, stream=args.stream, config=config)
        receiver.ready(args.ready_file)

        async def consume() -> None:
            done = False
            while not done:
                try:
                    batch = await pull.fetch(SUB_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in batch:
                    done = receiver.got(msg.data) or done
                    await msg.ack()

        await consume_until_done(receiver, consume)
        await connection.flush()
    finally:
        await connection.close()


async def subscribe_redis(args: argparse.Namespace, receiver: Receiver) -> None:
    """redis.asyncio: XREADGROUP COUNT SUB_BATCH, then XACK of the batch."""
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        try:
            await client.xgroup_create(args.name, GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        receiver.ready(args.ready_file)

        async def consume() -> None:
            done = False
            while not done:
                reply = await client.xreadgroup(GROUP, "c1", {args.name: ">"}, count=SUB_BATCH, block=500)
                ids = []
                for _, entries in reply.items() if isinstance(reply, dict) else (reply or []):
                    for entry_id, fields in entries:
                        done = receiver.got(fields[b"data"]) or done
                        ids.append(entry_id)
                if ids:
                    await client.xack(args.name, GROUP, *ids)

        await consume_until_done(receiver, consume)
    finally:
        await client.aclose()


async def subscriber(args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver(args.messages, distinct=args.path != "bare-raw")
    if args.path in ("processor", "bare"):
        await subscribe_processor(args, receiver)
    elif args.path == "bare-raw":
        await subscribe_bare_raw(args, receiver)
    elif args.kind == "nats":
        await subscribe_nats(args, receiver)
    else:
        await subscribe_redis(args, receiver)
    return receiver.finish()


# -- the publisher (a subprocess) -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Published:
    """What a publisher did."""

    published: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    cpu_s: float = 0.0

    def begin(self) -> None:
        """Publishing starts (connected, imports done)."""
        gc.collect()
        gc.freeze()
        gc.disable()  # the same for both paths: no collector pauses while publishing
        self.cpu_s = -rusage_s(resource.getrusage(resource.RUSAGE_SELF))
        self.start_ns = time.monotonic_ns()

    def end(self) -> None:
        self.end_ns = time.monotonic_ns()
        self.cpu_s += rusage_s(resource.getrusage(resource.RUSAGE_SELF))
        gc.enable()

    def failed(self, code: str, count: int = 1) -> None:
        self.errors += count
        self.error_codes[code] = self.error_codes.get(code, 0) + count


def chunks(total: int, size: int) -> list[range]:
    return [range(start, min(total, start + size)) for start in range(0, total, size)]


async def workers(count: int, work: Callable[[], Awaitable[None]]) -> None:
    await asyncio.gather(*(work() for _ in range(count)))


async def publish_processor(args: argparse.Namespace, out: Published) -> None:
    from ductape.processor import Processor, ProcessorError
    from ductape.processor.brokers import outgoing

    async with Processor(args.target, timeout=60.0) as processor:
        broker = processor.message_broker
        await processor.channel.channel_ready()
        out.begin()
        if args.mode == "batch":
            todo = chunks(args.messages, args.batch)

            async def batches() -> None:
                while todo:
                    indices = todo.pop(0)
                    messages = [outgoing(payload(i), content_type="application/json") for i in indices]
                    try:
                        results = await broker.publish_batch(
                            product=PRODUCT, env=ENV, event=args.name, messages=messages
                        )
                    except ProcessorError as exc:
                        out.failed(exc.code.name, len(indices))
                        continue
                    for result in results:
                        if result.ok:
                            out.published += 1
                        else:
                            out.failed(result.reason or result.code.name)

            await workers(args.inflight, batches)
        else:
            todo_single = iter(range(args.messages))

            async def singles() -> None:
                for index in todo_single:
                    try:
                        await broker.publish(
                            product=PRODUCT,
                            env=ENV,
                            event=args.name,
                            data=payload(index),
                            content_type="application/json",
                        )
                        out.published += 1
                    except ProcessorError as exc:
                        out.failed(exc.code.name)

            await workers(args.concurrency, singles)
        out.end()


async def publish_nats(args: argparse.Namespace, out: Published) -> None:
    import nats
    import nats.errors

    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream(publish_async_max_pending=args.batch * args.inflight)
        out.begin()
        if args.mode == "batch":
            pending = [await js.publish_async(args.name, payload(i)) for i in range(args.messages)]
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    out.failed(type(outcome).__name__)
                else:
                    out.published += 1
        else:
            todo = iter(range(args.messages))

            async def singles() -> None:
                for index in todo:
                    try:
                        await js.publish(args.name, payload(index))
                        out.published += 1
                    except (nats.errors.Error, TimeoutError) as exc:
                        out.failed(type(exc).__name__)

            await workers(args.concurrency, singles)
        out.end()
    finally:
        await connection.close()


async def publish_redis(args: argparse.Namespace, out: Published) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
        out.begin()
        if args.mode == "batch":
            todo = chunks(args.messages, args.batch)

            async def pipelines() -> None:
                while todo:
                    indices = todo.pop(0)
                    pipe = client.pipeline(transaction=False)
                    for index in indices:
                        pipe.xadd(args.name, {b"data": payload(index)})
                    for reply in await pipe.execute(raise_on_error=False):
                        if isinstance(reply, Exception):
                            out.failed(type(reply).__name__)
                        else:
                            out.published += 1

            await workers(args.inflight, pipelines)
        else:
            todo_single = iter(range(args.messages))

            async def singles() -> None:
                for index in todo_single:
                    try:
                        await client.xadd(args.name, {b"data": payload(index)})
                        out.published += 1
                    except RedisError as exc:
                        out.failed(type(exc).__name__)

            await workers(args.concurrency, singles)
        out.end()
    finally:
        await client.aclose()


async def publisher(args: argparse.Namespace) -> dict[str, Any]:
    out = Published()
    if args.path in ("processor", "bare", "floor"):
        await publish_processor(args, out)
    elif args.kind == "nats":
        await publish_nats(args, out)
    else:
        await publish_redis(args, out)
    return asdict(out)


# -- publish latency (a subprocess) ----------------------------------------------------------------------------------


async def latency(args: argparse.Namespace) -> LoadResult:
    """One coroutine publishing back to back for warmup + duration seconds."""
    data = payload(0)
    if args.path in ("processor", "bare"):
        from ductape.processor import Processor, ProcessorError

        async with Processor(args.target, timeout=10.0) as processor:
            broker = processor.message_broker

            def publish() -> Awaitable[str]:
                return broker.publish(
                    product=PRODUCT, env=ENV, event=args.name, data=data, content_type="application/json"
                )

            await publish()
            return await timed_load([publish], 1, args.duration, args.warmup, ProcessorError, lambda exc: exc.code.name)
    if args.kind == "nats":
        import nats
        import nats.errors

        connection = await nats.connect(NATS_URL)
        try:
            js = connection.jetstream()
            await js.publish(args.name, data)
            return await timed_load(
                [lambda: js.publish(args.name, data)],
                1,
                args.duration,
                args.warmup,
                (nats.errors.Error, TimeoutError),
                lambda exc: type(exc).__name__,
            )
        finally:
            await connection.close()
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        fields = {b"data": data}
        await client.xadd(args.name, fields)
        return await timed_load(
            [lambda: client.xadd(args.name, fields)],
            1,
            args.duration,
            args.warmup,
            RedisError,
            lambda exc: type(exc).__name__,
        )
    finally:
        await client.aclose()


# -- the bare streaming server (a subprocess) -------------------------------------------------------------------------


def bare_batches(messages: int) -> tuple[bytes, list[bytes]]:
    """The serialized `ready` response and batches of SUB_BATCH messages shaped like the processor's."""
    from datetime import UTC, datetime

    from ductape.processor.v1 import broker_pb2
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    ready = broker_pb2.SubscribeResponse(ready=broker_pb2.SubscribeReady(subscription_id=secrets.token_hex(8)))
    batches = []
    for indices in chunks(messages, SUB_BATCH):
        batch = broker_pb2.MessageBatch(
            messages=[
                broker_pb2.ReceivedMessage(
                    ack_id=f"{i + 1:x}",
                    id=os.urandom(12).hex(),
                    data=payload(i),
                    content_type="application/json",
                    publish_time=stamp,
                    delivery_attempt=1,
                    source=f"/ductape/{PRODUCT}/{ENV}/memory",
                    type="bench.bare",
                )
                for i in indices
            ]
        )
        batches.append(broker_pb2.SubscribeResponse(batch=batch).SerializeToString())
    return ready.SerializeToString(), batches


async def serve_bare(port: int, messages: int) -> None:
    """A grpc.aio server with generic handlers (identity serializers, no interceptors): Subscribe answers every
    stream with `ready`, then all the pre-serialized batches, reading (and dropping) the acks meanwhile; Publish
    answers a pre-serialized PublishResponse."""
    import grpc
    from ductape.processor.v1 import broker_pb2

    ready, batches = bare_batches(messages)
    published = broker_pb2.PublishResponse(message_id=os.urandom(12).hex()).SerializeToString()

    async def publish(request: bytes, context: Any) -> bytes:
        return published

    async def subscribe(requests: Any, context: Any) -> Any:
        await anext(requests)  # init

        async def drain() -> None:
            async for _ in requests:
                pass

        reader = asyncio.ensure_future(drain())
        try:
            yield ready
            for batch in batches:
                yield batch
            await reader  # until the client ends its side, as the processor does
        finally:
            reader.cancel()

    handlers = {
        "Subscribe": grpc.stream_stream_rpc_method_handler(subscribe),
        "Publish": grpc.unary_unary_rpc_method_handler(publish),
    }
    await serve_handlers(port, SERVICE, handlers)


async def serve_floor(port: int) -> None:
    """A grpc.aio server with a generic Publish handler (identity serializers, no interceptors) that decodes each
    PublishRequest and publishes its payload with the broker's own client, as the direct client's single publishes
    do: `js.publish` to the subject, or XADD of a `data` field to the stream key, that `event` names
    (`nats:<subject>`, `redis:<key>`). The floor of a processor's single publish: gRPC plus the broker call, on
    uvloop when it is installed, as the processor runs."""
    import grpc
    import nats
    import redis.asyncio as aioredis
    from ductape.processor.v1 import broker_pb2

    clients: dict[str, Any] = {}
    lock = asyncio.Lock()

    async def client(kind: str) -> Any:
        if kind not in clients:
            async with lock:
                if kind not in clients:
                    if kind == "nats":
                        clients[kind] = (await nats.connect(NATS_URL)).jetstream()
                    else:
                        clients[kind] = aioredis.Redis.from_url(REDIS_URL)
        return clients[kind]

    async def publish(request: bytes, context: Any) -> bytes:
        message = broker_pb2.PublishRequest.FromString(request)
        kind, _, name = message.event.partition(":")
        broker = await client(kind)
        if kind == "nats":
            ack = await broker.publish(name, message.message.data)
            message_id = f"{ack.stream}:{ack.seq}"
        elif kind == "redis":
            message_id = (await broker.xadd(name, {b"data": message.message.data})).decode()
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no broker {kind!r}")
        return broker_pb2.PublishResponse(message_id=message_id).SerializeToString()

    await serve_handlers(port, SERVICE, {"Publish": grpc.unary_unary_rpc_method_handler(publish)})


# -- broker housekeeping (in this process) -------------------------------------------------------------------------


def reachable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0):
        return True
    return False


def find_pid(name: str) -> int | None:
    """The first process whose command name is `name` (the local broker server), for its CPU time."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    return int(entry.name)
    return None


@dataclass(frozen=True, slots=True)
class Names:
    """Where one run's messages go, per path."""

    run: str
    kind: str
    tag: str

    @property
    def topic(self) -> str:
        """The processor's topic name (a NATS subject; the Redis stream is ductape:topic:<topic>)."""
        return f"bench.{self.run}.{self.kind}.{self.tag}"

    @property
    def event(self) -> str:
        return f"{self.kind}:{self.tag}"

    @property
    def direct(self) -> str:
        """The direct client's NATS subject or Redis stream key."""
        return f"benchd.{self.run}.{self.tag}" if self.kind == "nats" else f"bench:{self.run}:direct:{self.tag}"


def processor_stream(run: str) -> str:
    return f"bench_{run}"


def direct_stream(run: str) -> str:
    return f"benchd_{run}"


async def prepare_direct_nats(run: str) -> None:
    """The direct clients' JetStream stream, configured as the processor creates its own (file, limits)."""
    import nats
    from nats.js import api

    connection = await nats.connect(NATS_URL)
    try:
        await connection.jetstream().add_stream(
            api.StreamConfig(
                name=direct_stream(run),
                subjects=[f"benchd.{run}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
            )
        )
    finally:
        await connection.close()


async def forget_topic(names: Names, path: str) -> None:
    """Delete one run's consumer group and messages (the processor's or the direct client's)."""
    if names.kind == "nats":
        import nats

        connection = await nats.connect(NATS_URL)
        try:
            js = connection.jetstream()
            stream = processor_stream(names.run) if path == "processor" else direct_stream(names.run)
            subject = names.topic if path == "processor" else names.direct
            with contextlib.suppress(Exception):
                for info in await js.consumers_info(stream):
                    if info.config.filter_subject == subject:
                        await js.delete_consumer(stream, info.name)
                await js.purge_stream(stream, subject=subject)
        finally:
            await connection.close()
    elif names.kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.delete(f"ductape:topic:{names.topic}" if path == "processor" else names.direct)
        finally:
            await client.aclose()


async def forget_run(run: str, kinds: list[str]) -> None:
    """Delete everything this run created on the brokers."""
    if "nats" in kinds:
        import nats

        connection = await nats.connect(NATS_URL)
        try:
            for stream in (processor_stream(run), direct_stream(run)):
                with contextlib.suppress(Exception):
                    await connection.jetstream().delete_stream(stream)
        finally:
            await connection.close()
    if "redis" in kinds:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for pattern in (f"ductape:topic:bench.{run}.*", f"bench:{run}:*"):
                keys = [key async for key in client.scan_iter(match=pattern)]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()


# -- measurements (in this process) -----------------------------------------------------------------------------------


class Meter:
    """CPU time of some processes, of this script's children and of the whole machine, around one run."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._cpu = [cpu_seconds(pid) for pid in pids]
        (self._busy, self._steal), self._wall = machine_seconds(), time.monotonic()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._self = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> tuple[list[float], float, float]:
        """CPU seconds of each pid; CPUs used by other processes and stolen by the hypervisor meanwhile."""
        used = [cpu_seconds(pid) - before for pid, before in zip(self._pids, self._cpu, strict=True)]
        children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        ours = sum(used) + rusage_s(children) - rusage_s(self._children) + rusage_s(own) - rusage_s(self._self)
        busy, steal = machine_seconds()
        wall = time.monotonic() - self._wall
        return used, max(0.0, busy - self._busy - ours) / wall, (steal - self._steal) / wall


@dataclass(slots=True)
class Flow:
    """One end-to-end throughput run."""

    kind: str
    path: str
    mode: str
    round: int
    messages: int
    received: int
    deliveries: int
    window_s: float  # first publish (or, bare, the subscription opening) -> last distinct message received
    rate: float  # messages / window_s
    publish_rate: float  # messages / (first publish -> last publish confirmed)
    publish_errors: int
    error_codes: dict[str, int]
    srv_cpu_s: float  # processor or bare server, whole run
    brk_cpu_s: float  # broker server, whole run
    pub_cpu_s: float  # publisher, while publishing
    sub_cpu_s: float  # subscriber, from ready to the end
    other_cpus: float
    steal_cpus: float


@dataclass(slots=True)
class FlowSummary:
    """The median of the rounds of one row, leaving out noisy rounds when others are clean."""

    rate: float
    rate_min: float
    rate_max: float
    publish_rate: float
    srv_us: float
    brk_us: float
    pub_us: float
    sub_us: float
    cpu0_busy: float
    cpu1_busy: float
    brk_busy: float
    other_cpus: float
    steal_cpus: float
    lost: int
    publish_errors: int
    rounds_used: int
    rounds: int

    @classmethod
    def of(cls, runs: list[Flow], pinned_cpu: Callable[[Flow], tuple[float, float]]) -> FlowSummary:
        used = [r for r in runs if r.other_cpus + r.steal_cpus < NOISE_LIMIT] or runs
        median = statistics.median
        busy = [pinned_cpu(r) for r in used]
        return cls(
            rate=median(r.rate for r in used),
            rate_min=min(r.rate for r in used),
            rate_max=max(r.rate for r in used),
            publish_rate=median(r.publish_rate for r in used),
            srv_us=median(r.srv_cpu_s * 1e6 / r.messages for r in used),
            brk_us=median(r.brk_cpu_s * 1e6 / r.messages for r in used),
            pub_us=median(r.pub_cpu_s * 1e6 / r.messages for r in used),
            sub_us=median(r.sub_cpu_s * 1e6 / r.messages for r in used),
            cpu0_busy=median(b[0] for b in busy),
            cpu1_busy=median(b[1] for b in busy),
            brk_busy=median(r.brk_cpu_s / r.window_s for r in used),
            other_cpus=max(r.other_cpus for r in used),
            steal_cpus=max(r.steal_cpus for r in used),
            lost=sum(r.messages - r.received for r in runs),
            publish_errors=sum(r.publish_errors for r in runs),
            rounds_used=len(used),
            rounds=len(runs),
        )


@dataclass(slots=True)
class Latency:
    """One latency run: the client's result, plus the broker server's CPU time."""

    kind: str
    path: str
    round: int
    result: LoadResult
    brk_cpu_s: float


@dataclass(slots=True)
class LatencySummary:
    qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    srv_us: float
    brk_us: float
    cli_us: float
    other_cpus: float
    steal_cpus: float
    errors: int
    rounds_used: int
    rounds: int

    @classmethod
    def of(cls, runs: list[Latency]) -> LatencySummary:
        used = [r for r in runs if r.result.other_cpus + r.result.steal_cpus < NOISE_LIMIT] or runs
        median = statistics.median
        return cls(
            qps=median(r.result.qps for r in used),
            p50_ms=median(r.result.p50_ms for r in used),
            p90_ms=median(r.result.p90_ms for r in used),
            p99_ms=median(r.result.p99_ms for r in used),
            srv_us=median(r.result.server_cpu_s * 1e6 / max(1, r.result.total_calls) for r in used),
            brk_us=median(r.brk_cpu_s * 1e6 / max(1, r.result.total_calls) for r in used),
            cli_us=median(r.result.client_cpu_s * 1e6 / max(1, r.result.total_calls) for r in used),
            other_cpus=max(r.result.other_cpus for r in used),
            steal_cpus=max(r.result.steal_cpus for r in used),
            errors=sum(r.result.errors for r in runs),
            rounds_used=len(used),
            rounds=len(runs),
        )


@dataclass(slots=True)
class Config:
    messages: int
    single_messages: int
    batch: int
    inflight: int
    concurrency: int
    duration: float
    warmup: float
    rounds: int
    pin: bool
    kinds: list[str]
    memory: bool
    run: str = field(default_factory=lambda: secrets.token_hex(4))


class Bench:
    """The servers of one benchmark run and the runs made against them."""

    def __init__(self, procs: Processes, config: Config, work: Path) -> None:
        self.procs = procs
        self.config = config
        self.work = work
        self.processor: Server | None = None
        self.bare: Server | None = None
        self.floor: Server | None = None
        self.flows: list[Flow] = []
        self.latencies: list[Latency] = []
        self.broker_pids = {kind: find_pid(name) for kind, (_, name) in BROKERS.items()}
        self._runs = 0

    def manifest(self) -> dict[str, Any]:
        config, run = self.config, self.config.run
        modes = ("batch", "single", "publish")
        tags = ["lat", *(f"{mode}{r}" for mode in modes for r in range(1, config.rounds + 1))]
        settings = {
            "nats": {"type": "nats", "url": NATS_URL, "stream": processor_stream(run)},
            "redis": {"type": "redis", "url": REDIS_URL},
            "memory": {"type": "memory"},
        }
        kinds = [*config.kinds, *(["memory"] if config.memory else [])]
        return {
            "product": PRODUCT,
            "environments": [{"slug": ENV}],
            "brokers": [
                {
                    "tag": kind,
                    "envs": {ENV: settings[kind]},
                    "topics": [{"tag": tag, "name": Names(run, kind, tag).topic} for tag in tags],
                }
                for kind in kinds
            ],
        }

    def start(self) -> None:
        manifest = self.work / "bench.json"
        manifest.write_text(json.dumps(self.manifest(), indent=2))
        data_dir = self.work / "data"
        data_dir.mkdir()
        port = free_port()
        command = [*processor_command(), "serve", "--address", f"{HOST}:{port}", "--manifest", str(manifest)]
        command += ["--shutdown-grace-s", "2"]
        self.processor = self.procs.start_server("processor", command, f"{HOST}:{port}", child_env(data_dir))
        port = free_port()
        command = [sys.executable, SCRIPT, "_bare-server", "--port", str(port)]
        command += ["--messages", str(self.config.messages)]
        self.bare = self.procs.start_server("bare", command, f"{HOST}:{port}", child_env())
        port = free_port()
        command = [sys.executable, SCRIPT, "_floor-server", "--port", str(port)]
        self.floor = self.procs.start_server("floor", command, f"{HOST}:{port}", child_env())
        for server in (self.processor, self.bare, self.floor):
            wait_ready(server)
        if "nats" in self.config.kinds:
            asyncio.run(prepare_direct_nats(self.config.run))

    def meter(self, kind: str) -> Meter:
        """A meter of the processor, the bare server, the floor server and the broker server of `kind` (when local):
        `stop` gives their CPU seconds in that order."""
        assert self.processor is not None and self.bare is not None and self.floor is not None
        servers = (self.processor, self.bare, self.floor)
        for server in servers:
            server.check_alive()
        broker = self.broker_pids.get(kind)
        return Meter([*(server.pid for server in servers), *([broker] if broker is not None else [])])

    # -- one end-to-end run --------------------------------------------------------------------------------------

    def flow(self, kind: str, path: str, mode: str, round_no: int) -> Flow:
        """One run: a subscriber process, then (once it is subscribed) a publisher process, to the end.

        `bare` `stream`: no publisher (the bare server streams canned batches); `bare` `single` (kind `grpc`): no
        subscriber (the publisher against the bare server's canned Publish reply, the ceiling of unary publishing);
        `publish`: single publishes and no subscriber, through the processor or the floor server.
        """
        config = self.config
        assert self.processor is not None and self.bare is not None and self.floor is not None
        names = Names(config.run, kind, f"{mode}{round_no}")
        messages = config.single_messages if mode in ("single", "publish") else config.messages
        server = self.bare if path.startswith("bare") else self.floor if path == "floor" else self.processor
        has_sub, has_pub = kind != "grpc" and mode != "publish", mode != "stream"
        self._runs += 1
        ready_file = self.work / f"ready-{self._runs}"
        result_file = self.work / f"result-{self._runs}.json"
        common = ["--path", path, "--kind", kind, "--target", server.target, "--messages", str(messages)]
        name = {"direct": names.direct, "floor": f"{kind}:{names.direct}"}.get(path, names.event)
        common += ["--name", name]
        meter = self.meter(kind)
        sub: Server | None = None
        if has_sub:
            sub_args = [*common, "--ready-file", str(ready_file), "--result-file", str(result_file)]
            if kind == "nats" and path == "direct":
                sub_args += ["--stream", direct_stream(config.run), "--durable", f"g_{names.tag}"]
            command = [sys.executable, SCRIPT, "_sub", *sub_args]
            sub = self.procs.start_server(f"sub-{self._runs}", command, "", child_env(), cpu=SUB_CPU)
            deadline = time.monotonic() + 30.0
            while not ready_file.exists():
                sub.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} {path} subscriber not ready after 30 s; see {sub.log_path}")
                time.sleep(0.005)
        pub: dict[str, Any] = {}
        if has_pub:
            pub_mode = "single" if mode == "publish" else mode
            pub_args = [*common, "--mode", pub_mode, "--batch", str(config.batch), "--inflight", str(config.inflight)]
            pub_args += ["--concurrency", str(config.concurrency)]
            pub = self.procs.run_client(["_pub", *pub_args], cpu=DIRECT_PUB_CPU if path == "direct" else CLIENT_CPU)
        got: dict[str, Any] = {"received": pub.get("published", 0), "deliveries": 0, "cpu_s": 0.0, "last_ns": 0}
        if sub is not None:
            try:
                sub.popen.wait(timeout=120.0)
            except Exception:
                sub.popen.kill()
                raise
            if sub.popen.returncode != 0 or not result_file.exists():
                tail = sub.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{kind} {path} subscriber failed:\n{tail}")
            got = json.loads(result_file.read_text())
        used, others, steal = meter.stop()
        start_ns = pub.get("start_ns") or got["open_ns"]  # bare stream: the server streams from the opening on
        last_ns = got["last_ns"] or pub.get("end_ns") or time.monotonic_ns()
        window = max(1e-9, (last_ns - start_ns) / 1e9)
        publish_window = (pub["end_ns"] - pub["start_ns"]) / 1e9 if pub else 0.0
        if path in ("processor", "direct", "floor"):
            asyncio.run(forget_topic(names, "processor" if path == "processor" else "direct"))
        return Flow(
            kind=kind,
            path=path,
            mode=mode,
            round=round_no,
            messages=messages,
            received=got["received"],
            deliveries=got["deliveries"],
            window_s=window,
            rate=got["received"] / window,
            publish_rate=pub.get("published", 0) / publish_window if publish_window > 0 else 0.0,
            publish_errors=pub.get("errors", 0),
            error_codes=pub.get("error_codes", {}),
            srv_cpu_s=0.0 if path == "direct" else used[SERVER_INDEX["bare" if path.startswith("bare") else path]],
            brk_cpu_s=used[3] if len(used) > 3 else 0.0,
            pub_cpu_s=pub.get("cpu_s", 0.0),
            sub_cpu_s=got["cpu_s"],
            other_cpus=others,
            steal_cpus=steal,
        )

    def latency(self, kind: str, path: str, round_no: int) -> Latency:
        """Publish latency at concurrency 1; `bare` (kind `grpc`): the client against the bare server's Publish."""
        config = self.config
        assert self.processor is not None and self.bare is not None
        names = Names(config.run, kind, "lat")
        name = names.direct if path == "direct" else names.event
        target = (self.bare if path == "bare" else self.processor).target
        meter = self.meter(kind)
        raw = self.procs.run_client(
            [
                *("_lat", "--path", path, "--kind", kind, "--target", target, "--name", name),
                *("--duration", str(config.duration), "--warmup", str(config.warmup)),
            ],
            cpu=CLIENT_CPU,
        )
        used, others, steal = meter.stop()
        result = LoadResult(**raw)
        result.server_cpu_s = used[SERVER_INDEX[path]] if path in SERVER_INDEX else 0.0
        result.other_cpus, result.steal_cpus = others, steal
        run = Latency(kind, path, round_no, result, used[3] if len(used) > 3 else 0.0)
        errors = f", {result.errors} errors {result.error_codes}" if result.errors else ""
        print(
            f"  round {round_no}/{config.rounds}  {kind:<6} latency {path:<10} {result.qps:8.1f} QPS  "
            f"p50 {result.p50_ms:6.3f}  p90 {result.p90_ms:6.3f}  p99 {result.p99_ms:6.3f} ms{errors}",
            file=sys.stderr,
            flush=True,
        )
        return run

    # -- all of it -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        for round_no in range(1, config.rounds + 1):
            turn = round_no % 2
            for kind in config.kinds:
                for mode in ("batch", "single"):
                    paths = ["processor", "direct"]
                    for path in paths[turn:] + paths[:turn]:
                        self.flows.append(self.flow(kind, path, mode, round_no))
                        self._progress(self.flows[-1], round_no)
                paths = ["processor", "floor"]  # single publishes alone, against their floor
                for path in paths[turn:] + paths[:turn]:
                    self.flows.append(self.flow(kind, path, "publish", round_no))
                    self._progress(self.flows[-1], round_no)
            if config.kinds:  # the ceiling of single publishes: a server that only answers
                self.flows.append(self.flow("grpc", "bare", "single", round_no))
                self._progress(self.flows[-1], round_no)
            if config.memory:
                paths = ["processor", "bare", "bare-raw"]
                for path in paths[round_no % 3 :] + paths[: round_no % 3]:
                    self.flows.append(self.flow("memory", path, "batch" if path == "processor" else "stream", round_no))
                    self._progress(self.flows[-1], round_no)
            if config.kinds and turn:
                self.latencies.append(self.latency("grpc", "bare", round_no))
            for kind in config.kinds:
                paths = ["processor", "direct"]
                for path in paths[turn:] + paths[:turn]:
                    self.latencies.append(self.latency(kind, path, round_no))
            if config.kinds and not turn:
                self.latencies.append(self.latency("grpc", "bare", round_no))

    def _progress(self, run: Flow, round_no: int) -> None:
        lost = f", {run.messages - run.received} LOST" if run.received < run.messages else ""
        errors = f", {run.publish_errors} publish errors {run.error_codes}" if run.publish_errors else ""
        print(
            f"  round {round_no}/{self.config.rounds}  {run.kind:<6} {run.mode:<6} {run.path:<10} "
            f"{run.rate:9.1f} msg/s  (publish {run.publish_rate:9.1f} msg/s){lost}{errors}",
            file=sys.stderr,
            flush=True,
        )


# -- the report -------------------------------------------------------------------------------------------------------


def pinned_cpu(run: Flow) -> tuple[float, float]:
    """Share of CPU 0 and CPU 1 the run's pinned processes used during its window."""
    window = run.window_s
    if run.path == "direct":
        return run.pub_cpu_s / window, run.sub_cpu_s / window
    return run.srv_cpu_s / window, (run.pub_cpu_s + run.sub_cpu_s) / window


def report(bench: Bench, config: Config) -> tuple[list[str], dict[str, Any]]:
    """The tables as lines, and everything as data (for --json)."""
    pinning = (
        f"CPUs: processor, bare and floor servers on {SERVER_CPU}; gRPC publisher + subscriber on {CLIENT_CPU}; direct "
        f"publisher on {DIRECT_PUB_CPU}, direct subscriber on {SUB_CPU}; NATS and Redis servers not pinned"
        if config.pin
        else "no CPU pinning"
    )
    lines = [
        "",
        f"End to end: publish -> subscribe -> ack of {config.messages} messages ({config.single_messages} for "
        f"`single`) of {PAYLOAD_BYTES} B; median of {config.rounds} round(s)",
        f"batch: {config.batch} messages a call, {config.inflight} calls in flight; single: one message a call, "
        f"{config.concurrency} in flight; subscriber: batches of {SUB_BATCH}, {SUB_IN_FLIGHT} in flight",
        pinning,
        f"goals: processor >= {RATIO_GOAL:.1f}x direct msg/s with batches; single publishes >= {FLOOR_GOAL:.1f}x "
        f"the floor's publish/s; memory broker >= {MEMORY_GOAL:,.0f} msg/s; "
        f"publish p90 at concurrency 1 <= direct + {P90_DIFF_GOAL_MS:.1f} ms",
        "",
        f"{'broker':<6} {'mode':<6} {'path':<9} {'msg/s':>7} {'min-max':>11} {'ratio':>6} {'':4}  "
        f"{'publish/s':>9} {'srv max/s':>9}  {'CPU µs/msg srv brk pub sub':>26}  {'busy cpu0 cpu1 brk':>18}  "
        f"{'others':>6} {'steal':>5} {'rounds':>6}",
    ]
    verdicts: list[dict[str, Any]] = []
    summaries: dict[str, Any] = {}
    client_bound = False
    noisy = 0.0
    problems: list[str] = []

    def row(kind: str, mode: str, path: str, s: FlowSummary, ratio: float | None, ok: bool | None) -> str:
        nonlocal client_bound, noisy
        mark = "*" if s.cpu1_busy >= CLIENT_BOUND else " "
        client_bound |= mark == "*"
        noisy = max(noisy, s.other_cpus + s.steal_cpus)
        if s.lost or s.publish_errors:
            problems.append(f"{kind} {mode} {path}: {s.lost} messages lost, {s.publish_errors} publish errors")
        srv = "-" if path == "direct" else f"{s.srv_us:.1f}"
        capacity = "-" if path == "direct" or not s.srv_us else f"{1e6 / s.srv_us:.0f}"
        pub = "-" if mode == "stream" else f"{s.pub_us:.1f}"
        publish = "-" if mode == "stream" else f"{s.publish_rate:.0f}"
        ratio_txt = "" if ratio is None else f"{ratio:.3f}"
        ok_txt = "" if ok is None else verdict(ok)
        return (
            f"{kind:<6} {mode:<6} {path:<9} {s.rate:>7.0f} {f'{s.rate_min:.0f}-{s.rate_max:.0f}':>11} "
            f"{ratio_txt:>6} {ok_txt:<4}  {publish:>9} {capacity:>9}  {srv:>8} {s.brk_us:>5.1f} {pub:>5} "
            f"{s.sub_us:>5.1f}  {'':>4}{s.cpu0_busy:>4.0%} {s.cpu1_busy:>4.0%}{mark}{s.brk_busy:>4.0%}  "
            f"{s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} {f'{s.rounds_used}/{s.rounds}':>6}"
        )

    def summary(kind: str, mode: str, path: str) -> FlowSummary | None:
        runs = [f for f in bench.flows if (f.kind, f.mode, f.path) == (kind, mode, path)]
        if not runs:
            return None
        s = FlowSummary.of(runs, pinned_cpu)
        summaries[f"{kind}/{mode}/{path}"] = asdict(s)
        return s

    for kind in config.kinds:
        for mode in ("batch", "single"):
            direct = summary(kind, mode, "direct")
            proc = summary(kind, mode, "processor")
            if direct is None or proc is None:
                continue
            ratio = proc.rate / direct.rate if direct.rate else 0.0
            # Only batches have a goal against the direct client: one unary call per message cannot match a direct
            # client's pipelined publishes, so single publishes are judged against the floor (the `publish` rows);
            # their ratio to the direct client is shown for information.
            goal = mode == "batch"
            lines.append(row(kind, mode, "direct", direct, None, None))
            lines.append(row(kind, mode, "processor", proc, ratio, ratio >= RATIO_GOAL if goal else None))
            if goal:
                verdicts.append(
                    {
                        "goal": f"{kind} {mode}: processor msg/s >= {RATIO_GOAL}x direct",
                        "value": f"{ratio:.3f}x ({proc.rate:.0f} vs {direct.rate:.0f} msg/s)",
                        "pass": ratio >= RATIO_GOAL,
                    }
                )
        floor = summary(kind, "publish", "floor")
        proc = summary(kind, "publish", "processor")
        if floor is not None and proc is not None:
            ratio = proc.rate / floor.rate if floor.rate else 0.0
            lines.append(row(kind, "publish", "floor", floor, None, None))
            lines.append(row(kind, "publish", "processor", proc, ratio, ratio >= FLOOR_GOAL))
            verdicts.append(
                {
                    "goal": f"{kind} single publishes: processor publish/s >= {FLOOR_GOAL}x the floor",
                    "value": f"{ratio:.3f}x ({proc.rate:.0f} vs {floor.rate:.0f} publishes/s)",
                    "pass": ratio >= FLOOR_GOAL,
                }
            )
        lines.append("")
    ceiling = summary("grpc", "single", "bare")
    if ceiling is not None:
        lines += [row("grpc", "single", "bare", ceiling, None, None), ""]
    if config.memory:
        for path, mode in (("processor", "batch"), ("bare", "stream"), ("bare-raw", "stream")):
            s = summary("memory", mode, path)
            if s is None:
                continue
            if path == "processor":
                ok = s.rate >= MEMORY_GOAL
                lines.append(row("memory", mode, path, s, s.rate / MEMORY_GOAL, ok))
                verdicts.append(
                    {
                        "goal": f"memory batch: processor >= {MEMORY_GOAL:,.0f} msg/s",
                        "value": f"{s.rate:.0f} msg/s",
                        "pass": ok,
                    }
                )
            else:
                lines.append(row("memory", mode, path, s, None, None))
        lines.append("")
    lines += [
        "msg/s: distinct messages received ÷ (first publish -> last one received); bare: from the stream's opening",
        f"ratio: processor ÷ direct; memory: ÷ the goal, {MEMORY_GOAL:,.0f} msg/s. publish/s: the publisher's own rate",
        "srv max/s: 1e6 ÷ srv CPU µs/msg, the most the processor (bare server) could carry with one CPU to itself",
        "CPU µs/msg: processor (or bare server), broker server, publisher, subscriber CPU time per message",
        "busy: share of CPU 0 and CPU 1 that the pinned processes used in the window, and of one CPU the broker used",
        "memory bare: the client's subscriber against canned batches (no processor); bare-raw: the generated stub",
        "grpc single bare: single publishes against a server that only answers (no subscriber): the gRPC ceiling",
        f"publish: single publishes alone (no subscriber); floor: a bare handler making the direct client's publish; "
        f"ratio: processor ÷ floor, goal >= {FLOOR_GOAL}x",
    ]
    if client_bound:
        lines.append(f"* CPU 1 was >= {CLIENT_BOUND:.0%} busy: the clients, not the processor, may have limited msg/s")

    lines += [
        "",
        f"Publish latency at concurrency 1, {config.duration:g} s after {config.warmup:g} s warm-up, client on "
        f"CPU {CLIENT_CPU} (Δ = processor minus direct)",
        f"{'broker':<6} {'path':<9} {'QPS':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'Δp50':>7} "
        f"{'Δp90':>7} {'':4} {'Δp99':>7}  {'CPU µs/call srv brk cli':>23}  {'others':>6} {'steal':>5} {'rounds':>6}",
    ]
    latency_summaries: dict[str, Any] = {}

    def latency_row(kind: str, path: str, s: LatencySummary, base: LatencySummary | None) -> str:
        nonlocal noisy
        noisy = max(noisy, s.other_cpus + s.steal_cpus)
        if s.errors:
            problems.append(f"{kind} latency {path}: {s.errors} failed publishes")
        d50 = d90 = d99 = ok = ""
        if base is not None:
            diff = s.p90_ms - base.p90_ms
            d50, d90, d99 = f"{s.p50_ms - base.p50_ms:+.3f}", f"{diff:+.3f}", f"{s.p99_ms - base.p99_ms:+.3f}"
            ok = verdict(diff <= P90_DIFF_GOAL_MS)
            verdicts.append(
                {
                    "goal": f"{kind} publish latency: processor p90 <= direct p90 + {P90_DIFF_GOAL_MS} ms",
                    "value": f"{diff:+.3f} ms ({s.p90_ms:.3f} vs {base.p90_ms:.3f} ms)",
                    "pass": diff <= P90_DIFF_GOAL_MS,
                }
            )
        srv = "-" if path == "direct" else f"{s.srv_us:.0f}"
        brk = "-" if kind == "grpc" else f"{s.brk_us:.0f}"
        return (
            f"{kind:<6} {path:<9} {s.qps:>7.1f} {s.p50_ms:>7.3f} {s.p90_ms:>7.3f} {s.p99_ms:>7.3f} {d50:>7} "
            f"{d90:>7} {ok:<4} {d99:>7}  {srv:>11} {brk:>5} {s.cli_us:>5.0f}  "
            f"{s.other_cpus:>6.0%} {s.steal_cpus:>5.0%} {f'{s.rounds_used}/{s.rounds}':>6}"
        )

    def latency_summary(kind: str, path: str) -> LatencySummary | None:
        runs = [r for r in bench.latencies if (r.kind, r.path) == (kind, path)]
        if not runs:
            return None
        s = latency_summaries[f"{kind}/{path}"] = LatencySummary.of(runs)
        return s

    bare = latency_summary("grpc", "bare")
    if bare is not None:
        lines.append(latency_row("grpc", "bare", bare, None))
    for kind in config.kinds:
        direct_lat = latency_summary(kind, "direct")
        proc_lat = latency_summary(kind, "processor")
        if direct_lat is None or proc_lat is None:
            continue
        lines.append(latency_row(kind, "direct", direct_lat, None))
        lines.append(latency_row(kind, "processor", proc_lat, direct_lat))
    lines += [
        "grpc bare: the same publish call against the bare server's canned reply: the gRPC round trip alone",
        "CPU µs/call: processor (or bare server), broker server, client CPU time per call",
        "",
        "others, steal: CPU used meanwhile by other processes / taken by the hypervisor, in % of one CPU (highest)",
        f"rounds: rounds used / run; a round where others + steal reached {NOISE_LIMIT:.0%} is left out if any is not",
    ]
    if noisy >= NOISE_LIMIT:
        lines.append(f"WARNING: others + steal reached {noisy:.0%} of a CPU in rounds used: the figures are noisy")
    lines += [f"ERROR: {p}" for p in problems]
    lines += ["", "verdicts:"]
    lines += [f"  {verdict(v['pass'])}  {v['goal']}: {v['value']}" for v in verdicts]
    data = {
        "config": asdict(config),
        "payload_bytes": PAYLOAD_BYTES,
        "subscriber": {"max_batch": SUB_BATCH, "max_in_flight": SUB_IN_FLIGHT},
        "goals": {
            "ratio_min": RATIO_GOAL,
            "memory_msg_per_s_min": MEMORY_GOAL,
            "p90_diff_ms_max": P90_DIFF_GOAL_MS,
            "floor_ratio_min": FLOOR_GOAL,
        },
        "throughput": summaries,
        "latency": {key: asdict(value) for key, value in latency_summaries.items()},
        "verdicts": verdicts,
        "flows": [asdict(f) for f in bench.flows],
        "latency_runs": [
            {"kind": r.kind, "path": r.path, "round": r.round, "brk_cpu_s": r.brk_cpu_s, **asdict(r.result)}
            for r in bench.latencies
        ],
    }
    return lines, data


def run_benchmark(config: Config, json_path: Path | None, skipped: list[str]) -> int:
    def measure_all(procs: Processes, work: Path) -> Report:
        bench = Bench(procs, config, work)
        print(f"starting the servers (run {config.run}) ...", file=sys.stderr, flush=True)
        bench.start()
        bench.run()
        lines, data = report(bench, config)
        data["skipped"] = skipped
        return lines, data

    def forget() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(forget_run(config.run, config.kinds))

    notes = [f"SKIPPED: {note}" for note in skipped]
    return run_and_report(SCRIPT, config.pin, measure_all, json_path, after=forget, notes=notes)


# -- command line ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__, duration=1.5)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per `batch` run (default 20000)")
    parser.add_argument("--single-messages", type=int, default=2_000, help="messages per `single` run (default 2000)")
    parser.add_argument("--batch", type=int, default=100, help="messages per PublishBatch / pipeline (default 100)")
    parser.add_argument("--batches-in-flight", dest="inflight", type=int, default=4, help="(default 4)")
    parser.add_argument("--concurrency", type=int, default=32, help="single publishes in flight (default 32)")
    parser.add_argument(
        "--brokers", nargs="+", choices=["nats", "redis", "memory"], default=["nats", "redis", "memory"]
    )
    return parser


def _internal(argv: list[str]) -> int:
    """The sub-commands the script runs itself with."""
    command, rest = argv[0], argv[1:]
    sub = argparse.ArgumentParser(prog=command)
    if command == "_bare-server":
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--messages", type=int, required=True)
        args = sub.parse_args(rest)
        asyncio.run(serve_bare(args.port, args.messages))
        return 0
    if command == "_floor-server":
        sub.add_argument("--port", type=int, required=True)
        port = sub.parse_args(rest).port
        try:  # on the processor's loop: the floor is what the processor's own work comes on top of
            import uvloop
        except ModuleNotFoundError:
            asyncio.run(serve_floor(port))
        else:
            uvloop.run(serve_floor(port))
        return 0
    sub.add_argument("--path", choices=["processor", "direct", "bare", "bare-raw", "floor"], required=True)
    sub.add_argument("--kind", choices=["nats", "redis", "memory", "grpc"], required=True)
    sub.add_argument("--target", required=True)
    sub.add_argument("--name", required=True)
    if command == "_lat":
        sub.add_argument("--duration", type=float, required=True)
        sub.add_argument("--warmup", type=float, required=True)
        args = sub.parse_args(rest)
        return emit(asyncio.run(latency(args)))
    sub.add_argument("--messages", type=int, required=True)
    if command == "_pub":
        for name in ("batch", "inflight", "concurrency"):
            sub.add_argument(f"--{name}", type=int, required=True)
        sub.add_argument("--mode", choices=["batch", "single"], required=True)
        args = sub.parse_args(rest)
        print(json.dumps(asyncio.run(publisher(args))))
        return 0
    sub.add_argument("--ready-file", type=Path, required=True)
    sub.add_argument("--result-file", type=Path, required=True)
    sub.add_argument("--stream", default="")
    sub.add_argument("--durable", default="")
    args = sub.parse_args(rest)
    result = asyncio.run(subscriber(args))
    args.result_file.write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:  # how _harness.Processes.run_client starts a client
        argv = argv[1:]
    if argv[:1] in (["_bare-server"], ["_floor-server"], ["_sub"], ["_pub"], ["_lat"]):
        return _internal(argv)
    parser = _parser()
    args = parse_bench_args(parser, argv, quick={"messages": 3000, "single_messages": 300})
    if min(args.messages, args.single_messages, args.batch, args.inflight, args.concurrency) < 1:
        parser.error("--messages, --single-messages, --batch, --batches-in-flight, --concurrency: >= 1")
    if args.batch > 1000:
        parser.error("--batch must be <= 1000")
    kinds, skipped = [], []
    for kind in ("nats", "redis"):
        if kind in args.brokers:
            port = BROKERS[kind][0]
            if reachable(port):
                kinds.append(kind)
            else:
                skipped.append(f"{kind}: nothing listens on {HOST}:{port}")
    config = Config(
        messages=args.messages,
        single_messages=args.single_messages,
        batch=args.batch,
        inflight=args.inflight,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        pin=pinnable(args.pin),
        kinds=kinds,
        memory="memory" in args.brokers,
    )
    return run_benchmark(config, args.json, skipped)


if __name__ == "__main__":
    sys.exit(main())
