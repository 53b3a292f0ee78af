"""The shared store: PostgreSQL through an asyncpg pool, for several replicas.

All tables live in one schema (`store_schema`, default `processor`). Writes that must not race across replicas
take a transaction-scoped advisory lock per product. Every change is announced with NOTIFY on a channel named
after the schema, so other replicas drop their cached copy within milliseconds; polling `products.revision`
covers a notification lost while a listener reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from ductape_processor.errors import StoreUnavailable
from ductape_processor.store.base import (
    ChangeListener,
    ExecutionFilter,
    ExecutionRecord,
    IdempotencyRecord,
    ProductRevision,
    SessionRecord,
    Store,
    VersionRecord,
)
from ductape_processor.store.migrations import POSTGRES

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


class _Pool:
    """The asyncpg pool as the store uses it: store failures become StoreUnavailable (the one place they are mapped),
    and a statement whose connection died is sent once more on a fresh connection unless told it must not be
    (`retry=False` for statements that are not idempotent)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.raw = pool

    async def _call(self, operation: Callable[[asyncpg.Pool], Awaitable[_T]], *, retry: bool = True) -> _T:
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

    async def execute(self, query: str, *args: Any, retry: bool = True) -> str:
        return await self._call(lambda pool: pool.execute(query, *args), retry=retry)

    async def executemany(self, query: str, args: list[tuple[Any, ...]]) -> None:
        await self._call(lambda pool: pool.executemany(query, args))

    async def fetch(self, query: str, *args: Any, retry: bool = True) -> list[Any]:
        return await self._call(lambda pool: pool.fetch(query, *args), retry=retry)

    async def fetchrow(self, query: str, *args: Any, retry: bool = True) -> Any:
        return await self._call(lambda pool: pool.fetchrow(query, *args), retry=retry)

    async def fetchval(self, query: str, *args: Any, retry: bool = True) -> Any:
        return await self._call(lambda pool: pool.fetchval(query, *args), retry=retry)

    async def transaction(self, body: Callable[[asyncpg.Connection], Awaitable[_T]], *, retry: bool = True) -> _T:
        """Run `body` in one transaction; again on a fresh connection when the first one died (if `retry`)."""

        async def run(pool: asyncpg.Pool) -> _T:
            async with pool.acquire() as conn, conn.transaction():
                return await body(conn)

        return await self._call(run, retry=retry)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for a transaction that is not sent again (its statements are not all idempotent)."""
        try:
            async with self.raw.acquire() as conn:
                yield conn
        except _STORE_FAILURE as exc:
            raise _unavailable(exc) from exc


_VERSION_COLUMNS = "product, version, checksum, format, source, document, created_at"
_MIGRATION_LOCK = 0x70726F63  # advisory lock key held while migrating ("proc")


def _record(row: Any) -> VersionRecord:
    return VersionRecord(
        product=row["product"],
        version=row["version"],
        checksum=row["checksum"],
        format=row["format"],
        source=bytes(row["source"]),
        document=row["document"],
        created_at=row["created_at"],
    )


_IDEMPOTENCY_COLUMNS = "key, request_hash, owner, state, response, lease_until, expires_at"
_EXECUTION_COLUMNS = (
    "process_id, product, env, version, kind, resource, status, started_at, ended_at, attempts, "
    "upstream_status, error_reason, cached, detail"
)


def _idempotency(row: Any) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=row["key"],
        request_hash=row["request_hash"],
        owner=row["owner"],
        state=row["state"],
        response=bytes(row["response"]) if row["response"] is not None else None,
        lease_until=row["lease_until"],
        expires_at=row["expires_at"],
    )


_INSERT_EXECUTION = (
    f"INSERT INTO executions ({_EXECUTION_COLUMNS}) "  # noqa: S608
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT DO NOTHING"
)


def _execution_row(r: ExecutionRecord) -> tuple[Any, ...]:
    return (
        r.process_id,
        r.product,
        r.env,
        r.version,
        r.kind,
        r.resource,
        r.status,
        r.started_at,
        r.ended_at,
        r.attempts,
        r.upstream_status,
        r.error_reason,
        r.cached,
        r.detail,
    )


def _execution(row: Any) -> ExecutionRecord:
    return ExecutionRecord(**{key: row[key] for key in row.keys()})  # noqa: SIM118 - asyncpg Record


_SESSION_COLUMNS = (
    "session_id, product, env, tag, identifier, generation, started_at, refreshed_at, expires_at, revoked_at"
)


def _session(row: Any) -> SessionRecord:
    return SessionRecord(**{key: row[key] for key in row.keys()})  # noqa: SIM118 - asyncpg Record


class PostgresStore(Store):
    """Store on PostgreSQL, shared by every replica."""

    dialect = "postgresql"

    def __init__(self, dsn: str, schema: str = "processor", *, min_size: int = 1, max_size: int = 10) -> None:
        self._dsn = dsn
        self._schema = schema
        self._channel = f"{schema}_product_changes"
        self._min_size = min_size
        self._max_size = max_size
        self._pool: _Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._listeners: list[ChangeListener] = []
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

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for migration in POSTGRES:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )

    async def schema_version(self) -> int:
        return int(await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))

    async def _changed(self, conn: asyncpg.Connection, product: str) -> None:
        await conn.execute(
            "INSERT INTO products (product, revision) VALUES ($1, 1) "
            "ON CONFLICT (product) DO UPDATE SET revision = products.revision + 1",
            product,
        )
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, product)

    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"product:{product}")
            row = await conn.fetchrow(
                f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 "  # noqa: S608
                "ORDER BY version DESC LIMIT 1",
                product,
            )
            if row is not None and row["checksum"] == checksum:
                return _record(row), False
            version = (row["version"] if row else 0) + 1
            created = await conn.fetchrow(
                f"INSERT INTO product_versions (product, version, checksum, format, source, document) "  # noqa: S608
                f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_VERSION_COLUMNS}",
                product,
                version,
                checksum,
                fmt,
                source,
                document,
            )
            await self._changed(conn, product)
            return _record(created), True

    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 AND version = $2",  # noqa: S608
            product,
            version,
        )
        return _record(row) if row else None

    async def latest_version(self, product: str) -> VersionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions WHERE product = $1 "  # noqa: S608
            "ORDER BY version DESC LIMIT 1",
            product,
        )
        return _record(row) if row else None

    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_VERSION_COLUMNS} FROM product_versions "  # noqa: S608
            "WHERE product = $1 AND version < $2 ORDER BY version DESC LIMIT $3",
            product,
            before if before is not None else 2**31 - 1,
            limit,
        )
        return [_record(row) for row in rows]

    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"product:{product}")
            previous = await conn.fetchval(
                "SELECT version FROM environment_pins WHERE product = $1 AND env = $2", product, env
            )
            await conn.execute(
                "INSERT INTO environment_pins (product, env, version) VALUES ($1, $2, $3) "
                "ON CONFLICT (product, env) DO UPDATE SET version = excluded.version, updated_at = now()",
                product,
                env,
                version,
            )
            await self._changed(conn, product)
        return int(previous) if previous is not None else None

    async def pins(self, product: str) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT env, version FROM environment_pins WHERE product = $1", product)
        return {row["env"]: int(row["version"]) for row in rows}

    async def revisions(self) -> list[ProductRevision]:
        rows = await self.pool.fetch("SELECT product, revision FROM products")
        return [ProductRevision(row["product"], int(row["revision"])) for row in rows]

    # -- auth tokens --------------------------------------------------------------------------------------------

    async def get_auth_token(self, key: str, now: datetime) -> str | None:
        value = await self.pool.fetchval(
            "SELECT token_values FROM auth_tokens WHERE key = $1 AND expires_at > $2", key, now
        )
        return str(value) if value is not None else None

    async def put_auth_token(self, key: str, values: str, expires_at: datetime) -> None:
        await self.pool.execute(
            "INSERT INTO auth_tokens (key, token_values, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (key) DO UPDATE SET token_values = excluded.token_values, expires_at = excluded.expires_at",
            key,
            values,
            expires_at,
        )

    async def delete_auth_token(self, key: str, values: str) -> None:
        await self.pool.execute("DELETE FROM auth_tokens WHERE key = $1 AND token_values = $2", key, values)

    # -- cache --------------------------------------------------------------------------------------------------

    async def cache_get(self, key: str, now: datetime) -> bytes | None:
        value = await self.pool.fetchval("SELECT value FROM cache_entries WHERE key = $1 AND expires_at > $2", key, now)
        return bytes(value) if value is not None else None

    async def cache_put(self, key: str, value: bytes, expires_at: datetime) -> None:
        await self.pool.execute(
            "INSERT INTO cache_entries (key, value, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            key,
            value,
            expires_at,
        )

    # -- idempotency --------------------------------------------------------------------------------------------

    async def idempotency_claim(
        self, key: str, request_hash: str, owner: str, now: datetime, lease_until: datetime, expires_at: datetime
    ) -> IdempotencyRecord:
        async def claim(conn: asyncpg.Connection) -> Any:
            await conn.execute(
                "INSERT INTO idempotency_keys (key, request_hash, owner, state, response, lease_until, expires_at) "
                "VALUES ($1, $2, $3, 'pending', NULL, $4, $5) ON CONFLICT (key) DO UPDATE SET "
                "request_hash = excluded.request_hash, owner = excluded.owner, state = 'pending', response = NULL, "
                "lease_until = excluded.lease_until, expires_at = excluded.expires_at "
                "WHERE idempotency_keys.expires_at <= $6 "
                "OR (idempotency_keys.state = 'pending' AND idempotency_keys.lease_until <= $6)",
                key,
                request_hash,
                owner,
                lease_until,
                expires_at,
                now,
            )
            return await conn.fetchrow(
                f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = $1",  # noqa: S608
                key,
            )

        # Sent again after a lost connection, the claim finds its own row (the owner is this call): idempotent.
        return _idempotency(await self.pool.transaction(claim))

    async def idempotency_mark_sent(self, key: str, owner: str, lease_until: datetime) -> bool:
        status = await self.pool.execute(
            "UPDATE idempotency_keys SET state = 'sent', lease_until = $1 "
            "WHERE key = $2 AND owner = $3 AND state IN ('pending', 'sent')",
            lease_until,
            key,
            owner,
        )
        return bool(status == "UPDATE 1")

    async def idempotency_renew(self, key: str, owner: str, lease_until: datetime) -> bool:
        status = await self.pool.execute(
            "UPDATE idempotency_keys SET lease_until = $1 WHERE key = $2 AND owner = $3 AND state <> 'done'",
            lease_until,
            key,
            owner,
        )
        return bool(status == "UPDATE 1")

    async def idempotency_complete(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord | None = None
    ) -> bool:
        async def complete(conn: asyncpg.Connection) -> str:
            status: str = await conn.execute(
                "UPDATE idempotency_keys SET state = 'done', response = $1 WHERE key = $2 AND owner = $3",
                response,
                key,
                owner,
            )
            if record is not None:
                await conn.execute(_INSERT_EXECUTION, *_execution_row(record))
            return status

        return bool(await self.pool.transaction(complete) == "UPDATE 1")

    async def idempotency_release(self, key: str, owner: str) -> None:
        await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE key = $1 AND owner = $2 AND state IN ('pending', 'sent')", key, owner
        )

    async def idempotency_get(self, key: str) -> IdempotencyRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = $1",  # noqa: S608
            key,
        )
        return _idempotency(row) if row else None

    # -- executions ---------------------------------------------------------------------------------------------

    async def insert_executions(self, records: list[ExecutionRecord]) -> None:
        if not records:
            return
        await self.pool.executemany(_INSERT_EXECUTION, [_execution_row(r) for r in records])

    async def list_executions(
        self, where: ExecutionFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[ExecutionRecord]:
        params: list[Any] = [where.product]
        clauses = ["product = $1"]

        def bind(clause: str, *values: Any) -> None:
            for value in values:
                params.append(value)
                clause = clause.replace("?", f"${len(params)}", 1)
            clauses.append(clause)

        if where.env is not None:
            bind("env = ?", where.env)
        if where.resource is not None:
            bind("resource = ?", where.resource)
        if where.status is not None:
            bind("status = ?", where.status)
        if where.since is not None:
            bind("started_at >= ?", where.since)
        if where.until is not None:
            bind("started_at < ?", where.until)
        if after is not None:
            bind("(started_at, process_id) < (?, ?)", after[0], after[1])
        params.append(limit)
        # The clauses are fixed strings chosen above; every value is a bound parameter.
        sql = (
            f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE {' AND '.join(clauses)} "  # noqa: S608
            f"ORDER BY started_at DESC, process_id DESC LIMIT ${len(params)}"
        )
        rows = await self.pool.fetch(sql, *params)
        return [_execution(row) for row in rows]

    # -- sessions -----------------------------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self.pool.execute(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)",  # noqa: S608
            record.session_id,
            record.product,
            record.env,
            record.tag,
            record.identifier,
            record.generation,
            record.started_at,
            record.refreshed_at,
            record.expires_at,
            retry=False,  # a second INSERT after a commit would fail on the key
        )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = $1",  # noqa: S608
            session_id,
        )
        return _session(row) if row else None

    async def rotate_session(self, session_id: str, generation: int, now: datetime) -> SessionRecord | None:
        row = await self.pool.fetchrow(
            "UPDATE sessions SET generation = generation + 1, refreshed_at = $1 "  # noqa: S608
            "WHERE session_id = $2 AND generation = $3 AND revoked_at IS NULL AND expires_at > $1 "
            f"RETURNING {_SESSION_COLUMNS}",
            now,
            session_id,
            generation,
            retry=False,  # sent again after a commit, it would answer as if another refresh won
        )
        return _session(row) if row else None

    async def revoke_sessions(
        self, product: str, env: str, tag: str, *, session_id: str | None, identifier: str | None, now: datetime
    ) -> list[tuple[str, datetime]]:
        column, value = ("session_id", session_id) if session_id is not None else ("identifier", identifier)
        rows = await self.pool.fetch(
            f"UPDATE sessions SET revoked_at = $1 WHERE product = $2 AND env = $3 AND tag = $4 AND {column} = $5 "  # noqa: S608
            "AND revoked_at IS NULL RETURNING session_id, expires_at",
            now,
            product,
            env,
            tag,
            value,
        )
        return [(row["session_id"], row["expires_at"]) for row in rows]

    async def list_sessions(
        self,
        product: str,
        env: str,
        tag: str,
        identifier: str | None,
        now: datetime,
        *,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SessionRecord]:
        params: list[Any] = [product, env, tag, now]
        clauses = ["product = $1", "env = $2", "tag = $3", "revoked_at IS NULL", "expires_at > $4"]
        if identifier is not None:
            params.append(identifier)
            clauses.append(f"identifier = ${len(params)}")
        if after is not None:
            params += [after[0], after[1]]
            clauses.append(f"(started_at, session_id) < (${len(params) - 1}, ${len(params)})")
        params.append(limit)
        sql = (
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(clauses)} "  # noqa: S608
            f"ORDER BY started_at DESC, session_id DESC LIMIT ${len(params)}"
        )
        return [_session(row) for row in await self.pool.fetch(sql, *params)]

    async def revoked_since(self, since: datetime) -> list[tuple[str, datetime, datetime]]:
        rows = await self.pool.fetch(
            "SELECT session_id, revoked_at, expires_at FROM sessions WHERE revoked_at IS NOT NULL AND revoked_at >= $1 "
            "ORDER BY revoked_at",
            since,
        )
        return [(row["session_id"], row["revoked_at"], row["expires_at"]) for row in rows]

    async def purge_expired(self, now: datetime) -> int:
        removed = 0
        for table in ("auth_tokens", "cache_entries", "idempotency_keys"):
            status = await self.pool.execute(
                f"DELETE FROM {table} WHERE expires_at <= $1",  # noqa: S608 - fixed table names
                now,
            )
            removed += int(status.split()[-1])
        return removed

    async def listen(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._listen_conn is None:
            await self._connect_listener()

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(self._channel, self._notified)
        conn.add_termination_listener(self._listener_lost)
        self._listen_conn = conn

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        for listener in self._listeners:
            result = listener(payload)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)  # noqa: RUF006 - listeners are short and log their own errors

    def _listener_lost(self, _conn: Any) -> None:
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
