"""Shared fixtures: real servers on port 0, real channels, real stores (SQLite files and PostgreSQL schemas).

PostgreSQL tests use PROCESSOR_TEST_POSTGRES_DSN (default: the local server's `test` database). Without a server
they skip with a message; under CI=true a missing server fails the run instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from ductape.processor import Processor

from ductape_processor.app import ProcessorApp
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.settings import Settings
from ductape_processor.store import Store
from ductape_processor.store.postgres import PostgresStore
from ductape_processor.store.sqlite import SqliteStore
from ductape_processor.telemetry.setup import Telemetry
from tests.features_harness import Ops, start_ops
from tests.upstream import Upstream, start_upstream

ROOT = Path(__file__).resolve().parent.parent
# The servers the tests start, in process or as `ductape-processor serve`, take a free port for the webhook listener,
# never the default 127.0.0.1:8090: `make test` must pass beside a `make run` (and beside another suite).
os.environ.setdefault("PROCESSOR_WEBHOOK_HTTP_ADDRESS", "127.0.0.1:0")
EXAMPLE = ROOT / "examples" / "shop.yaml"
POSTGRES_DSN = os.environ.get("PROCESSOR_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

_postgres_checked: str | None = None  # "" when reachable, else why not


async def _postgres_unavailable() -> str:
    global _postgres_checked
    if _postgres_checked is None:
        try:
            conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            await conn.close()
            _postgres_checked = ""
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            _postgres_checked = f"PostgreSQL at {POSTGRES_DSN} is not reachable: {exc}"
    return _postgres_checked


def _missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: a missing server is a failure)")
    pytest.skip(why)


async def require_postgres() -> None:
    """Skip (or fail under CI=true) when the PostgreSQL server is unreachable."""
    why = await _postgres_unavailable()
    if why:
        _missing(why)


async def require_tcp(name: str, host: str, port: int) -> None:
    """Skip (or fail under CI=true) when nothing accepts connections at host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    except (OSError, TimeoutError) as exc:
        _missing(f"{name} at {host}:{port} is not reachable: {exc}")
        return
    writer.close()
    await writer.wait_closed()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL `postgres` (so `-m "not postgres"` selects the rest): those using the
    `pg_schema` fixture or the PostgreSQL case of `store_factory`. Marked here, from the fixtures, so none is missed."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        uses_schema = "pg_schema" in getattr(item, "fixturenames", ())
        if uses_schema or (callspec is not None and callspec.params.get("store_factory") == "postgres"):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema name, dropped after the test."""
    await require_postgres()
    schema = f"t_{secrets.token_hex(6)}"
    yield schema
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Opens stores of one kind sharing one database (several stores = several replicas)."""
    opened: list[Store] = []
    schema: str | None = None
    if request.param == "postgres":
        await require_postgres()
        schema = f"t_{secrets.token_hex(6)}"

        def make() -> Store:
            return PostgresStore(POSTGRES_DSN, schema)
    else:

        def make() -> Store:
            return SqliteStore(tmp_path / "store.db")

    async def factory() -> Store:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()
    if schema is not None:
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@dataclass
class Running:
    """A started processor and a client connected to it."""

    app: ProcessorApp
    port: int
    client: Processor

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)


ServerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start processors on 127.0.0.1:0: `await start_server(store=..., telemetry=..., clock=..., **settings)`."""
    running: list[Running] = []

    async def start(
        *,
        store: Store | None = None,
        telemetry: Telemetry | None = None,
        api_key: str | None = None,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> Running:
        values: dict[str, Any] = {
            "address": "127.0.0.1:0",
            "webhook_http_address": "127.0.0.1:0",
            "data_dir": tmp_path / f"data{len(running)}",
        }
        values.update(overrides)
        app = ProcessorApp(Settings(**values), store=store, telemetry=telemetry, clock=clock)
        port = await app.start()
        client = Processor(f"127.0.0.1:{port}", api_key=api_key, timeout=10)
        handle = Running(app, port, client)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.client.close()
        await handle.app.stop(grace=0)


@pytest.fixture
def made_queues(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the RabbitMQ queues the processor declares during the test, for its teardown to delete.

    RabbitMQ keeps a group's quorum queue after its last consumer leaves (that is what makes a group durable), so a
    test that does not delete the queues it caused leaves them on the server for good."""
    made: set[str] = set()
    try:
        from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker
        from ductape_processor.adapters.brokers.rabbitmq_queue import queue_name
    except ModuleNotFoundError:  # installed without the RabbitMQ driver: no queue can be made
        return made

    subscribe = RabbitMQBroker.subscribe

    async def recording(self: RabbitMQBroker, topic: str, group: str, options: Any) -> Any:
        made.add(queue_name(topic, group))
        return await subscribe(self, topic, group, options)

    monkeypatch.setattr(RabbitMQBroker, "subscribe", recording)
    return made


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real HTTP server on 127.0.0.1 that records what it receives."""
    state = await start_upstream()
    yield state
    assert state.server is not None
    await state.server.close()


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    """A loopback upstream whose `/op/<name>` routes record each call (tests/features_harness.py)."""
    started = await start_ops()
    yield started
    await started.server.close()


@pytest.fixture
async def server(start_server: ServerFactory) -> Running:
    """One processor on the embedded SQLite store."""
    return await start_server()
