"""The shared store: PostgreSQL through an asyncpg pool, for several replicas.

All tables live in one schema (`store_schema`, default `processor`). Writes that must not race across replicas
take a transaction-scoped advisory lock per product. Every change is announced with NOTIFY on a channel named
after the schema, so other replicas drop their cached copy within milliseconds; polling `products.revision`
covers a notification lost while a listener reconnects. The statements and row mappers are shared with SQLite
(sql.py); this module holds what is PostgreSQL's own: the pool, its failures and re-sends, locks and notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from ductape_processor.errors import StoreUnavailable
from ductape_processor.store import job_statements, migrations, statements, webhook_statements
from ductape_processor.store.base import ChangeListener
from ductape_processor.store.features import SqlFeatureStore
from ductape_processor.store.job_records import (
    JOBS_TOPIC,
    JobRecord,
    JobStep,
    RunEnd,
    RunStatus,
    new_job_payload,
)
from ductape_processor.store.sql import Connection, Row
from ductape_processor.store.statements import SqlValue, Statement
from ductape_processor.store.webhook_records import WEBHOOKS_TOPIC, DeliveryRecord, Stored, WebhookMessage

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A connection that died under a statement (pg_terminate_backend, a restart, a network cut) shows up as one of these.
# The statement's effect is then unknown, so only idempotent statements are sent again.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    # "another operation is in progress": a connection left mid-protocol by a termination.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
# What a caller sees as "the store failed": connection losses, and server-side failures that are not caused by the
# statement itself (too many connections, out of disk, serialisation failures).
_STORE_FAILURE: tuple[type[BaseException], ...] = (
    *_CONNECTION_LOST,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.CannotConnectNowError,
)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"the store (PostgreSQL) failed: {type(exc).__name__}; retry the call", metadata={"store": "postgresql"}
    )


async def _leave_as_is(_conn: asyncpg.Connection) -> None:
    """A pool connection's reset: nothing (see `PostgresStore.open`)."""


def _changed_rows(status: str) -> int:
    """Rows a command changed, from its status ("UPDATE 1", "INSERT 0 1"); 0 for commands that do not say."""
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


class _Transaction:
    """One connection inside a transaction, as the shared operations use it (failures are mapped by `_Pool`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.raw = conn
        """The asyncpg connection, for what only PostgreSQL takes (arrays of values)."""

    async def fetch(self, statement: Statement, *args: SqlValue) -> Sequence[Row]:
        rows: list[Row] = await self._conn.fetch(statement.numbered, *args)
        return rows

    async def fetchrow(self, statement: Statement, *args: SqlValue) -> Row | None:
        row: Row | None = await self._conn.fetchrow(statement.numbered, *args)
        return row

    async def execute(self, statement: Statement, *args: SqlValue) -> int:
        return _changed_rows(await self._conn.execute(statement.numbered, *args))

    async def executemany(self, statement: Statement, rows: list[tuple[SqlValue, ...]]) -> None:
        await self._conn.executemany(statement.numbered, rows)


class _Pool:
    """The asyncpg pool as the store uses it: store failures become StoreUnavailable (the one place they are mapped),
    and a statement whose connection died is sent once more on a fresh connection unless told it must not be
    (`retry=False` for statements that are not idempotent)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.raw = pool

    async def call(self, operation: Callable[[asyncpg.Pool], Awaitable[_T]], *, retry: bool = True) -> _T:
        """`operation` on the pool, its failures mapped (and re-sent once after a lost connection, if `retry`)."""
        try:
            return await operation(self.raw)
        except _CONNECTION_LOST as exc:
            if not retry:
                raise _unavailable(exc) from exc
            log.warning("store: the connection was lost (%s); retrying once on a fresh connection", exc)
            # Connections idle in the pool were most likely cut at the same time: replace them all.
            await self.raw.expire_connections()
        except _STORE_FAILURE as exc:
            raise _unavailable(exc) from exc
        try:
            return await operation(self.raw)
        except _STORE_FAILURE as exc:
            raise _unavailable(exc) from exc

    async def execute(self, statement: Statement, *args: SqlValue, retry: bool = True) -> int:
        return _changed_rows(await self.call(lambda pool: pool.execute(statement.numbered, *args), retry=retry))

    async def executemany(self, statement: Statement, rows: list[tuple[SqlValue, ...]]) -> None:
        await self.call(lambda pool: pool.executemany(statement.numbered, rows))

    async def fetch(self, statement: Statement, *args: SqlValue, retry: bool = True) -> Sequence[Row]:
        rows: list[Row] = await self.call(lambda pool: pool.fetch(statement.numbered, *args), retry=retry)
        return rows

    async def fetchrow(self, statement: Statement, *args: SqlValue, retry: bool = True) -> Row | None:
        row: Row | None = await self.call(lambda pool: pool.fetchrow(statement.numbered, *args), retry=retry)
        return row

    async def transaction(self, body: Callable[[asyncpg.Connection], Awaitable[_T]], *, retry: bool = True) -> _T:
        """Run `body` in one transaction; again on a fresh connection when the first one died (if `retry`)."""

        async def run(pool: asyncpg.Pool) -> _T:
            async with pool.acquire() as conn, conn.transaction():
                return await body(conn)

        return await self.call(run, retry=retry)


_KEY_LOCK: Final = Statement("SELECT pg_advisory_xact_lock(?)")
_NAMED_LOCK: Final = Statement("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))")
_NOTIFY: Final = Statement("SELECT pg_notify(?, ?)")
_INSERT_NEW_JOB_NOTIFIED: Final = Statement(
    # One round trip: the insert and, if it inserted, its notification (channel and payload: the last parameters).
    f"WITH added AS ({job_statements.INSERT_NEW_JOB.qmark} RETURNING product) SELECT pg_notify(?, ?) FROM added"  # noqa: S608
)


_END_RUNS: Final = Statement(
    # Many runs' ends in one statement: one array per column of the ends, then the owner.
    "UPDATE job_runs r SET status = e.status, ended_at = e.ended_at, attempt_at = e.attempt_at, result = e.result, "
    "error_reason = e.error_reason, error_message = e.error_message, process_id = e.process_id, owner = NULL, "
    "lease_until = NULL FROM unnest(?::text[], ?::smallint[], ?::timestamptz[], ?::timestamptz[], ?::text[], "
    "?::text[], ?::text[], ?::text[]) AS e(run_id, status, ended_at, attempt_at, result, error_reason, error_message, "
    "process_id) WHERE r.run_id = e.run_id AND r.owner = ? AND r.status = 2 RETURNING r.run_id"
)


_RUN_TYPES: Final = (
    *("text", "text", "text", "text", "smallint", "smallint", "timestamptz", "timestamptz", "integer"),
    *("timestamptz", "timestamptz", "text", "timestamptz", "boolean", "text", "text", "text", "text"),
)
"""The types of RUN_COLUMNS, in their order (for the arrays a batch of runs is sent as)."""
_RUN_FIELDS: Final = tuple(column.strip() for column in job_statements.RUN_COLUMNS.split(","))
_STEP_JOBS: Final = Statement(
    # One statement writes the steps of the jobs the transaction holds, and their runs. Parameters: the steps' four
    # arrays, then one array per run column.
    "WITH moved AS (UPDATE jobs j SET next_run_at = s.next_run_at, status = s.status, runs = j.runs + s.started "  # noqa: S608
    "FROM unnest(?::text[], ?::timestamptz[], ?::smallint[], ?::integer[]) AS s(job_id, next_run_at, status, started) "
    "WHERE j.job_id = s.job_id) "
    f"INSERT INTO job_runs ({job_statements.RUN_COLUMNS}) SELECT * "
    f"FROM unnest({', '.join(f'?::{kind}[]' for kind in _RUN_TYPES)})"
)


_DELIVERY_TYPES: Final = (
    *("text", "text", "text", "text", "text", "text", "text", "smallint", "integer", "timestamptz", "timestamptz"),
    *("integer", "text", "timestamptz"),
)
"""The types of DELIVERY_COLUMNS, in their order (for the arrays an Emit's deliveries are sent as)."""
_WHEN_DISABLED: Final = {
    "status": "4",
    "attempts": "0",
    "next_attempt_at": "NULL",
    "lease_owner": "NULL",
    "lease_until": "NULL",
}
"""A delivery to a disabled endpoint is stored ENDPOINT_DISABLED, not due and unleased."""
_UNLESS_DISABLED: Final = ", ".join(
    f"CASE WHEN x.endpoint IS NULL THEN d.{column} ELSE {_WHEN_DISABLED[column]} END"
    if column in _WHEN_DISABLED
    else f"d.{column}"
    for column in (c.strip() for c in webhook_statements.DELIVERY_COLUMNS.split(","))
)
_EMIT: Final = Statement(
    # One round trip for an Emit without an idempotency key: the message, and its deliveries as given but those to
    # a disabled endpoint (ENDPOINT_DISABLED, unleased). Returns the ids of those stored leased (the emitter attempts
    # them). Parameters: the message's columns, then one array per delivery column.
    f"WITH message AS (INSERT INTO webhook_messages ({webhook_statements.MESSAGE_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)), "
    "disabled AS (SELECT endpoint FROM webhook_endpoints WHERE product = ? AND env = ? AND webhook = ? "
    "AND disabled_at IS NOT NULL), "
    f"stored AS (INSERT INTO webhook_deliveries ({webhook_statements.DELIVERY_COLUMNS}) SELECT {_UNLESS_DISABLED} "
    f"FROM unnest({', '.join(f'?::{kind}[]' for kind in _DELIVERY_TYPES)}) "
    f"AS d({webhook_statements.DELIVERY_COLUMNS}) LEFT JOIN disabled x ON x.endpoint = d.endpoint "
    "RETURNING delivery_id, lease_owner) "
    "SELECT delivery_id FROM stored WHERE lease_owner IS NOT NULL"
)


class PostgresStore(SqlFeatureStore):
    """Store on PostgreSQL, shared by every replica."""

    dialect = "postgresql"
    _dialect = statements.POSTGRES
    _migrations = migrations.POSTGRES

    def __init__(self, dsn: str, schema: str = "processor", *, min_size: int = 1, max_size: int = 10) -> None:
        self._dsn = dsn
        self._schema = schema
        # One NOTIFY channel per change topic (Store.listen), all heard on one listening connection.
        self._channels = {
            "products": f"{schema}_product_changes",
            "jobs": f"{schema}_job_changes",
            "webhooks": f"{schema}_webhook_changes",
            "features": f"{schema}_feature_changes",
        }
        self._min_size = min_size
        self._max_size = max_size
        self._pool: _Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listeners: dict[str, list[ChangeListener]] = {topic: [] for topic in self._channels}
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> _Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def open(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            # The schema in the name tells an operator (and the fault tests) which deployment a connection serves.
            server_settings={"search_path": self._schema, "application_name": f"ductape-processor/{self._schema}"[:63]},
            # asyncpg resets a connection on its way back to the pool with a statement of its own (unlock, CLOSE ALL,
            # UNLISTEN, RESET ALL): a round trip per operation. The store leaves no session state behind (its locks
            # are transaction-scoped, it listens on a connection of its own, it sets nothing), so there is none to
            # reset.
            reset=_leave_as_is,
        )
        self._pool = _Pool(pool)
        await self._migrate()

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        if self._listen_conn is not None:
            conn, self._listen_conn = self._listen_conn, None
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.raw.close()

    @property
    def _reader(self) -> Connection:
        return self.pool

    async def _write(self, statement: Statement, *args: SqlValue, retry: bool = True) -> int:
        return await self.pool.execute(statement, *args, retry=retry)

    async def _write_returning(self, statement: Statement, *args: SqlValue, retry: bool = True) -> Sequence[Row]:
        return await self.pool.fetch(statement, *args, retry=retry)

    async def _transaction(
        self, body: Callable[[Connection], Awaitable[_T]], *, lock: int | str | None = None, retry: bool = True
    ) -> _T:
        async def run(conn: asyncpg.Connection) -> _T:
            transaction = _Transaction(conn)
            if isinstance(lock, int):
                await transaction.execute(_KEY_LOCK, lock)
            elif lock is not None:
                await transaction.execute(_NAMED_LOCK, lock)
            return await body(transaction)

        return await self.pool.transaction(run, retry=retry)

    async def _insert_new_job(self, job: JobRecord, values: tuple[Any, ...], *, announce: bool) -> bool:
        if not announce:
            return await super()._insert_new_job(job, values, announce=False)
        payload = new_job_payload(job.product, job.next_run_at)
        rows = await self.pool.fetch(
            _INSERT_NEW_JOB_NOTIFIED, *values, self._channels[JOBS_TOPIC], payload, retry=False
        )
        return len(rows) == 1

    async def _write_steps(self, conn: Connection, steps: list[JobStep]) -> None:
        assert isinstance(conn, _Transaction)  # what _transaction hands its body
        runs = [run for step in steps for run in step.runs]
        await conn.raw.execute(
            _STEP_JOBS.numbered,
            [step.job_id for step in steps],
            [step.next_run_at for step in steps],
            [int(step.status) for step in steps],
            [step.started for step in steps],
            *([getattr(run, field) for run in runs] for field in _RUN_FIELDS),
        )

    async def end_runs(self, owner: str, ends: list[tuple[str, RunEnd]]) -> set[str]:
        # An end that changes its job's state goes through _end_run's transaction; the others share one statement.
        ended = await super().end_runs(owner, [(run_id, end) for run_id, end in ends if end.job_status is not None])
        plain = [(run_id, end) for run_id, end in ends if end.job_status is None]
        if not plain:
            return ended
        columns = (
            [run_id for run_id, _ in plain],
            [int(end.status) for _, end in plain],
            [end.ended_at if end.status != RunStatus.RETRYING else None for _, end in plain],
            [end.attempt_at for _, end in plain],
            [end.result for _, end in plain],
            [end.error_reason for _, end in plain],
            [end.error_message for _, end in plain],
            [end.process_id for _, end in plain],
        )
        rows: list[Row] = await self.pool.call(
            lambda pool: pool.fetch(_END_RUNS.numbered, *columns, owner), retry=False
        )
        ended.update(str(row[0]) for row in rows)
        return ended

    async def insert_webhook_message(self, message: WebhookMessage, deliveries: list[DeliveryRecord]) -> Stored:
        if message.idempotency_key:  # the key's lock and lookup: the shared transaction
            return await super().insert_webhook_message(message, deliveries)
        rows = [self._delivery_row(d) for d in deliveries]
        columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in _DELIVERY_TYPES]
        values = (*self._message_row(message), message.product, message.env, message.webhook)
        held: list[Row] = await self.pool.call(lambda pool: pool.fetch(_EMIT.numbered, *values, *columns), retry=False)
        if any(d.lease_owner is None for d in deliveries):  # any replica may take those
            await self._write(_NOTIFY, self._channels[WEBHOOKS_TOPIC], message.product)
        ids = {str(row[0]) for row in held}
        return Stored(
            message, [d.delivery_id for d in deliveries], True, [d for d in deliveries if d.delivery_id in ids]
        )

    async def _announce(self, conn: Connection, product: str, topic: str = "products") -> None:
        await conn.execute(_NOTIFY, self._channels[topic], product)

    async def listen(self, listener: ChangeListener, topic: str = "products") -> None:
        self._listeners[topic].append(listener)
        if self._listen_conn is None:
            await self._connect_listener()

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        for channel in self._channels.values():
            await conn.add_listener(channel, self._notified)
        conn.add_termination_listener(self._listener_lost)
        self._listen_conn = conn

    def _notified(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        topic = next(topic for topic, name in self._channels.items() if name == channel)
        for listener in self._listeners[topic]:
            result = listener(payload)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)  # noqa: RUF006 - listeners are short and log their own errors

    def _listener_lost(self, _conn: object) -> None:
        self._listen_conn = None
        if not self._closing and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                await self._connect_listener()
                log.info("store change listener reconnected")
                return
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("store change listener: reconnect failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
