"""DatabaseService through a real server, once per database system: SQLite, PostgreSQL and MariaDB (MySQL).

Every system passes the same behaviour tests (the contract); the few that differ by system say how. Table names are
unique per test (`t_<random>`), so runs from several worktrees on the same servers never collide.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from ductape.processor import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ductape.processor.databases import DatabaseResult, Step

from tests.conftest import POSTGRES_DSN, Running, ServerFactory, require_postgres, require_tcp

MYSQL_URL = "mysql://root@127.0.0.1:3306/test"
SYSTEMS = ["sqlite", "postgresql", "mysql"]


def env_config(system: str, run: str, **extra: Any) -> dict[str, Any]:
    if system == "sqlite":
        return {"type": "sqlite", "path": f"{run}.db", **extra}
    if system == "postgresql":
        separator = "&" if "?" in POSTGRES_DSN else "?"
        return {"type": "postgresql", "url": f"{POSTGRES_DSN}{separator}application_name={run}", **extra}
    return {"type": "mysql", "url": MYSQL_URL, **extra}


async def require(system: str) -> None:
    if system == "postgresql":
        await require_postgres()
    elif system == "mysql":
        await require_tcp("MariaDB", "127.0.0.1", 3306)


def users_actions(table: str) -> list[dict[str, Any]]:
    """Every action type on one table of users."""
    return [
        {
            "tag": "setup",
            "type": "execute",
            "query": f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, email VARCHAR(100) NOT NULL UNIQUE, "
            "name VARCHAR(200), score INTEGER CHECK (score >= 0))",
        },
        {"tag": "teardown", "type": "execute", "query": f"DROP TABLE IF EXISTS {table}"},
        {
            "tag": "create",
            "type": "create",
            "query": f"INSERT INTO {table} (id, email, name, score) VALUES (:id, :email, :name, :score)",
            "params": {
                "id": "$Input{data}{id}",
                "email": "$Input{data}{email}",
                "name": "$Input{data}{name}",
                "score": "$Input{data}{score}",
            },
            "input": {"data": {"id": {"type": "integer", "required": True}, "email": {"type": "string"}}},
        },
        {
            "tag": "list",
            "type": "read",
            "query": f"SELECT id, email, name, score FROM {table} WHERE score >= :min ORDER BY id",
            "params": {"min": "$Input{filter}{min}"},
        },
        {"tag": "by_name", "type": "read", "query": f"SELECT id, name FROM {table} WHERE name = {{{{name}}}}"},
        {"tag": "one", "type": "read", "single": True, "query": f"SELECT * FROM {table} WHERE id = {{{{id}}}}"},
        {
            "tag": "count",
            "type": "count",
            "query": f"SELECT id FROM {table} WHERE score >= :min",
            "params": {"min": "$Input{filter}{min}"},
        },
        {
            "tag": "rename",
            "type": "update",
            "query": f"UPDATE {table} SET name = :name WHERE score >= :min",
            "params": {"name": "$Input{data}{name}", "min": "$Input{filter}{min}"},
        },
        {"tag": "remove", "type": "delete", "query": f"DELETE FROM {table} WHERE id = {{{{id}}}}"},
        {
            "tag": "stats",
            "type": "aggregate",
            "query": f"SELECT name, COUNT(*) AS n, MAX(score) AS top FROM {table} GROUP BY name ORDER BY name",
        },
        {"tag": "missing_table", "type": "read", "query": f"SELECT * FROM {table}_nowhere"},
        {
            "tag": "name_like_found",
            "type": "update",
            "query": f"UPDATE {table} SET name = :name WHERE id = :id",
            "params": {"name": "$Sequence{batch}{found}{rows}{[0]}{name}", "id": "$Input{filter}{id}"},
        },
    ]


@dataclass
class Db:
    """A running processor with one database (`main`) on one system, and a table of users."""

    running: Running
    system: str
    run: str
    table: str

    async def execute(self, action: str, data: Any = None, filter: Any = None, **options: Any) -> DatabaseResult:
        given = {k: v for k, v in (("data", data), ("filter", filter)) if v is not None}
        # Ductape's names (`processor.db.run`); other tests call `database.execute`, the same method
        return await self.running.client.db.run(
            product="shop", env="dev", database="main", action=action, input=given, **options
        )

    async def batch(self, *steps: Step, **options: Any) -> list[DatabaseResult]:
        return await self.running.client.database.batch(
            product="shop", env="dev", database="main", steps=steps, **options
        )

    async def apply(self, actions: list[dict[str, Any]], **env: Any) -> None:
        document = {
            "product": "shop",
            "environments": [{"slug": "dev"}],
            "caches": [{"tag": "short", "ttl": "60s"}],
            "databases": [
                {"tag": "main", "envs": {"dev": env_config(self.system, self.run, **env)}, "actions": actions}
            ],
        }
        await self.running.client.product.apply(json.dumps(document).encode())


async def open_db(
    start_server: ServerFactory, system: str, actions: list[dict[str, Any]] | None = None, **settings: Any
) -> Db:
    await require(system)
    run = f"t_{secrets.token_hex(5)}"
    db = Db(await start_server(**settings), system, run, run)
    await db.apply(users_actions(db.table) + (actions or []))
    await db.execute("setup")
    return db


@pytest.fixture(params=SYSTEMS)
async def db(request: pytest.FixtureRequest, start_server: ServerFactory) -> AsyncIterator[Db]:
    opened = await open_db(start_server, request.param)
    yield opened
    await opened.execute("teardown")


async def add_users(db: Db, count: int, name: str = "same") -> None:
    for i in range(1, count + 1):
        await db.execute("create", data={"id": i, "email": f"u{i}@example.com", "name": name, "score": i * 10})


# -- every action type ------------------------------------------------------------------------------------------


async def test_each_action_type_runs(db: Db) -> None:
    created = await db.execute("create", data={"id": 1, "email": "ada@example.com", "name": "Ada", "score": 10})
    assert created.affected_rows == 1 and created.rows == [] and created.process_id
    await db.execute("create", data={"id": 2, "email": "bob@example.com", "name": "Bob", "score": 20})
    await db.execute("create", data={"id": 3, "email": "cy@example.com", "name": "Bob", "score": 30})

    listed = await db.execute("list", filter={"min": 20})
    assert listed.rows == [
        {"id": 2, "email": "bob@example.com", "name": "Bob", "score": 20},
        {"id": 3, "email": "cy@example.com", "name": "Bob", "score": 30},
    ]
    assert listed.affected_rows == 0
    one = await db.execute("one", filter={"id": 1})
    assert [row["email"] for row in one.rows] == ["ada@example.com"]
    assert (await db.execute("one", filter={"id": 99})).rows == []
    assert (await db.execute("count", filter={"min": 20})).count == 2

    renamed = await db.execute("rename", data={"name": "Robert"}, filter={"min": 20})
    assert renamed.affected_rows == 2
    stats = await db.execute("stats")
    assert stats.rows == [{"name": "Ada", "n": 1, "top": 10}, {"name": "Robert", "n": 2, "top": 30}]

    removed = await db.execute("remove", filter={"id": 2})
    assert removed.affected_rows == 1
    assert (await db.execute("count", filter={"min": 0})).count == 2


async def test_a_read_pages_through_every_row_with_the_page_token(db: Db) -> None:
    await add_users(db, 5)
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        result = await db.execute("list", filter={"min": 0}, page_size=2, page_token=token)
        seen += [row["id"] for row in result.rows]
        pages += 1
        token = result.next_page_token
        if not token:
            break
    assert seen == [1, 2, 3, 4, 5] and pages == 3
    with pytest.raises(InvalidArgumentError) as caught:
        await db.execute("list", filter={"min": 10}, page_size=2, page_token=result.next_page_token or "eyJ4IjoxfQ")
    assert caught.value.field_violations[0].field == "page_token"


async def test_the_same_token_for_other_input_is_refused(db: Db) -> None:
    await add_users(db, 3)
    first = await db.execute("list", filter={"min": 0}, page_size=1)
    with pytest.raises(InvalidArgumentError):
        await db.execute("list", filter={"min": 20}, page_size=1, page_token=first.next_page_token)


# -- values -----------------------------------------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE users; --",
    "x' OR '1'='1",
    "1 OR 1=1",
    ":id",
    "{{id}}",
    "$1",
    "?",
    "%s %% %(name)s",
    "\\'; SELECT 1; --",
    '" OR ""="',
    "$$; DROP TABLE x; $$",
    "\x00 nul",
    "é ✓ 😀",
]


async def test_injection_attempts_through_every_input_stay_data(db: Db) -> None:
    for i, text in enumerate(HOSTILE, start=1):
        if text.startswith("\x00") and db.system == "postgresql":
            continue  # PostgreSQL text cannot hold NUL: refused as a value, checked below
        await db.execute("create", data={"id": i, "email": text + f"#{i}", "name": text, "score": i})
    for i, text in enumerate(HOSTILE, start=1):
        if text.startswith("\x00") and db.system == "postgresql":
            continue
        found = await db.execute("by_name", filter={"name": text})
        assert found.rows == [{"id": i, "name": text}], text
        assert (await db.execute("one", filter={"id": i})).rows[0]["email"] == text + f"#{i}"
    # Values meant to widen a filter select nothing.
    assert (await db.execute("by_name", filter={"name": "nobody' OR '1'='1"})).rows == []
    if db.system == "postgresql":  # the parameter is an integer: text is refused
        with pytest.raises(InvalidArgumentError):
            await db.execute("one", filter={"id": "1 OR 1=1"})
    else:  # compared as a value (MariaDB reads the text's leading number): at most the one row, never every row
        assert len((await db.execute("one", filter={"id": "1 OR 1=1"})).rows) <= 1
    # The table is still there, with every row.
    expected = len(HOSTILE) - (1 if db.system == "postgresql" else 0)
    assert (await db.execute("count", filter={"min": 0})).count == expected
    if db.system == "postgresql":
        with pytest.raises(InvalidArgumentError) as caught:
            await db.execute("create", data={"id": 99, "email": "nul@x", "name": "a\x00b", "score": 1})
        assert caught.value.reason == "INVALID_INPUT"


async def test_types_round_trip(start_server: ServerFactory, request: pytest.FixtureRequest) -> None:
    for system in SYSTEMS:
        await _types_round_trip(start_server, system)


async def _types_round_trip(start_server: ServerFactory, system: str) -> None:
    try:
        await require(system)
    except pytest.skip.Exception:
        return
    run = f"t_{secrets.token_hex(5)}"
    columns = {
        "postgresql": "big BIGINT, amount NUMERIC(20,4), moment TIMESTAMPTZ, birthday DATE, raw BYTEA, doc JSONB, "
        "flag BOOLEAN, note TEXT, ratio DOUBLE PRECISION, small INTEGER",
        "mysql": "big BIGINT, amount DECIMAL(20,4), moment TIMESTAMP(6) NULL, birthday DATE, raw BLOB, doc JSON, "
        "flag BOOLEAN, note TEXT, ratio DOUBLE, small INTEGER",
        "sqlite": "big INTEGER, amount TEXT, moment TEXT, birthday TEXT, raw BLOB, doc TEXT, flag BOOLEAN, note TEXT, "
        "ratio REAL, small INTEGER",
    }[system]
    raw = {"postgresql": ":raw", "mysql": "FROM_BASE64(:raw)", "sqlite": "X'0001ff'"}[system]
    params = {
        name: f"$Input{{data}}{{{name}}}"
        for name in ("big", "amount", "moment", "birthday", "doc", "flag", "note", "ratio", "small")
    }
    if system != "sqlite":
        params["raw"] = "$Input{data}{raw}"
    actions = [
        {"tag": "make", "type": "execute", "query": f"CREATE TABLE {run}_types (id INTEGER PRIMARY KEY, {columns})"},
        {"tag": "drop", "type": "execute", "query": f"DROP TABLE {run}_types"},
        {
            "tag": "put",
            "type": "create",
            "query": f"INSERT INTO {run}_types (id, big, amount, moment, birthday, raw, doc, flag, note, ratio, small) "
            f"VALUES (1, :big, :amount, :moment, :birthday, {raw}, :doc, :flag, :note, :ratio, :small)",
            "params": params,
        },
        {"tag": "get", "type": "read", "query": f"SELECT * FROM {run}_types"},
    ]
    db = Db(await start_server(), system, run, run)
    await db.apply(actions)
    await db.execute("make")
    try:
        await db.execute(
            "put",
            data={
                "big": "9007199254740993",
                "amount": "12345.6789",
                "moment": "2024-05-06T07:08:09.123456Z",
                "birthday": "1990-01-02",
                "raw": base64.b64encode(b"\x00\x01\xff").decode(),
                "doc": {"a": [1, "x"], "b": None},
                "flag": True,
                "note": "héllo ✓ 'quoted'",
                "ratio": 0.5,
                "small": 42,
            },
        )
        row = (await db.execute("get")).rows[0]
    finally:
        await db.execute("drop")
    assert row["big"] == "9007199254740993"  # beyond 2^53: text, exact
    assert row["amount"] == "12345.6789"  # a decimal: text, never rounded through a float
    assert row["moment"] == "2024-05-06T07:08:09.123456Z"
    assert row["birthday"] == "1990-01-02"
    assert base64.b64decode(row["raw"]) == b"\x00\x01\xff"
    doc = row["doc"]
    # MariaDB keeps JSON as LONGTEXT and SQLite as TEXT: the text comes back, and holds the same JSON.
    assert (json.loads(doc) if isinstance(doc, str) else doc) == {"a": [1, "x"], "b": None}
    assert row["flag"] in (True, 1)
    assert row["note"] == "héllo ✓ 'quoted'"
    assert row["ratio"] == 0.5
    assert row["small"] == 42 and isinstance(row["small"], int)


# -- errors -----------------------------------------------------------------------------------------------------


async def test_constraint_violations_are_named(db: Db) -> None:
    await db.execute("create", data={"id": 1, "email": "ada@example.com", "name": "Ada", "score": 1})
    with pytest.raises(AlreadyExistsError) as unique:
        await db.execute("create", data={"id": 2, "email": "ada@example.com", "name": "Other", "score": 1})
    assert unique.value.reason == "DB_CONSTRAINT_VIOLATION"
    assert unique.value.metadata["constraint_kind"] == "unique"
    assert "email" in unique.value.metadata["constraint"]
    with pytest.raises(AlreadyExistsError):
        await db.execute("create", data={"id": 1, "email": "new@example.com", "name": "Same id", "score": 1})
    with pytest.raises(FailedPreconditionError) as check:
        await db.execute("create", data={"id": 3, "email": "neg@example.com", "name": "Neg", "score": -1})
    assert check.value.reason == "DB_CONSTRAINT_VIOLATION"
    assert check.value.metadata["constraint_kind"] == "check"
    assert (await db.execute("count", filter={"min": -100})).count == 1


async def test_an_unknown_table_is_query_invalid(db: Db) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        await db.execute("missing_table")
    assert caught.value.reason == "DB_QUERY_INVALID"
    assert caught.value.metadata == {"database": "main", "action": "missing_table"}


async def test_unknown_database_action_and_bad_input_are_refused(db: Db) -> None:
    with pytest.raises(NotFoundError) as action:
        await db.execute("nope")
    assert action.value.reason == "ACTION_NOT_FOUND"
    with pytest.raises(NotFoundError) as database:
        await db.running.client.database.execute(product="shop", env="dev", database="other", action="list")
    assert database.value.reason == "DATABASE_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as contract:
        await db.execute("create", data={"id": "one", "email": "x@example.com"})
    assert [v.field for v in contract.value.field_violations] == ["input.data.id"]
    with pytest.raises(InvalidArgumentError) as braced:
        await db.execute("one")
    assert braced.value.reason == "INVALID_INPUT"
    with pytest.raises(InvalidArgumentError) as unresolved:
        await db.execute("list", filter={})
    assert unresolved.value.reason == "TEMPLATE_UNRESOLVED"


# -- transactions -----------------------------------------------------------------------------------------------


async def test_a_batch_commits_every_step_and_later_steps_read_earlier_results(db: Db) -> None:
    results = await db.batch(
        Step("create", {"data": {"id": 1, "email": "ada@example.com", "name": "Ada", "score": 5}}),
        Step("one", {"filter": {"id": 1}}, tag="found"),
        Step("rename", {"data": {"name": "Ada L."}, "filter": {"min": 0}}),
        Step("count", {"filter": {"min": 0}}),
    )
    assert [r.affected_rows for r in results] == [1, 0, 1, 0]
    assert results[1].rows[0]["name"] == "Ada" and results[3].count == 1
    assert (await db.execute("one", filter={"id": 1})).rows[0]["name"] == "Ada L."


async def test_a_batch_step_reads_an_earlier_steps_row_by_its_tag(db: Db) -> None:
    await db.execute("create", data={"id": 1, "email": "ada@example.com", "name": "Ada", "score": 5})
    await db.execute("create", data={"id": 2, "email": "bob@example.com", "name": "Bob", "score": 5})
    results = await db.batch(
        Step("one", {"filter": {"id": 1}}, tag="found"), Step("name_like_found", {"filter": {"id": 2}})
    )
    assert results[1].affected_rows == 1
    assert (await db.execute("one", filter={"id": 2})).rows[0]["name"] == "Ada"
    with pytest.raises(InvalidArgumentError) as outside:  # outside a batch there is no earlier step to read
        await db.execute("name_like_found", filter={"id": 2})
    assert outside.value.reason == "TEMPLATE_UNRESOLVED"


async def test_a_failing_step_rolls_the_whole_batch_back(db: Db) -> None:
    await db.execute("create", data={"id": 1, "email": "ada@example.com", "name": "Ada", "score": 5})
    with pytest.raises(AlreadyExistsError):
        await db.batch(
            Step("create", {"data": {"id": 2, "email": "bob@example.com", "name": "Bob", "score": 5}}),
            Step("rename", {"data": {"name": "Renamed"}, "filter": {"min": 0}}),
            Step("create", {"data": {"id": 3, "email": "ada@example.com", "name": "Dup", "score": 5}}, tag="dup"),
        )
    listed = await db.execute("list", filter={"min": 0})
    assert listed.rows == [{"id": 1, "email": "ada@example.com", "name": "Ada", "score": 5}]


# -- policies ---------------------------------------------------------------------------------------------------


async def test_an_idempotency_key_writes_once(db: Db) -> None:
    data = {"id": 1, "email": "ada@example.com", "name": "Ada", "score": 5}
    first = await db.execute("create", data=data, idempotency_key="create-ada")
    again = await db.execute("create", data=data, idempotency_key="create-ada")
    assert first.affected_rows == again.affected_rows == 1
    with pytest.raises(FailedPreconditionError) as reused:
        await db.execute("create", data={**data, "id": 2}, idempotency_key="create-ada")
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (await db.execute("count", filter={"min": 0})).count == 1


async def test_a_cached_read_is_served_without_the_database(db: Db) -> None:
    await add_users(db, 1)
    first = await db.execute("list", filter={"min": 0}, cache="short")
    await db.execute("remove", filter={"id": 1})
    cached = await db.execute("list", filter={"min": 0}, cache="short")
    assert not first.cached and cached.cached and cached.rows == first.rows
    assert (await db.execute("list", filter={"min": 0})).rows == []
    with pytest.raises(InvalidArgumentError):
        await db.execute("remove", filter={"id": 1}, cache="short")


async def test_executions_are_recorded(db: Db) -> None:
    result = await db.execute("count", filter={"min": 0})
    await db.running.app.components.recorder.flush()
    page = await db.running.client.logs.list_executions(product="shop", resource="main:count")
    assert [e.process_id for e in page.executions] == [result.process_id]
    assert page.executions[0].kind == "database"
