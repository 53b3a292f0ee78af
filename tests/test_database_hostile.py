"""Databases read as an attacker would: a manifest author or a caller trying to reach past their own database
(other files, other products, the processor's store), to turn a value into SQL, or to make the processor hold more
than its bounds."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from ductape.processor import (
    FailedPreconditionError,
    InvalidArgumentError,
    ProcessorError,
    ResourceExhaustedError,
    UnavailableError,
)
from ductape.processor.databases import Step

from ductape_processor.adapters.databases.base import RowBudget
from ductape_processor.runtime.databases.sql import Dialect, SqlProblem, compile_sql
from tests.conftest import ServerFactory, require_postgres
from tests.test_databases import Db, open_db, users_actions

# -- SQLite: one file per database, nothing else ----------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "ATTACH DATABASE :file AS other",
        "VACUUM INTO :file",
    ],
)
async def test_a_sqlite_statement_cannot_open_another_file(
    start_server: ServerFactory, tmp_path: Path, query: str
) -> None:
    actions: list[dict[str, Any]] = [
        {"tag": "reach", "type": "execute", "query": query, "params": {"file": "$Input{data}{file}"}},
        {"tag": "fixed", "type": "execute", "query": query.replace(":file", "'elsewhere.db'")},
        {"tag": "vacuum", "type": "execute", "query": "VACUUM"},
        {"tag": "pragma", "type": "execute", "query": f"PRAGMA temp_store_directory = '{tmp_path}'"},
    ]
    db = await open_db(start_server, "sqlite", actions)
    data_dir = Path(db.running.app.settings.data_dir)
    store = data_dir / "processor.db"
    assert store.exists()
    outside = tmp_path / "copy.db"
    for file in (str(store), str(outside)):
        with pytest.raises(FailedPreconditionError) as caught:
            await db.execute("reach", data={"file": file})
        assert caught.value.reason == "DB_QUERY_INVALID"
    with pytest.raises(FailedPreconditionError):
        await db.execute("fixed")
    with pytest.raises(FailedPreconditionError):
        await db.execute("pragma")
    assert not outside.exists()
    assert not list(Path.cwd().glob("elsewhere.db"))
    # The database's own statements still run, a plain VACUUM (which attaches a private temporary file) included.
    await db.execute("vacuum")
    await db.execute("create", data={"id": 1, "email": "a@x", "name": "A", "score": 1})
    assert (await db.execute("count", filter={"min": 0})).count == 1
    await db.execute("teardown")


# -- the SQL compiler reads quoting as each database does --------------------------------------------------------
# On MySQL the driver splices the escaped value into the text where the compiler put `%s`: a `%s` the server reads
# as part of a string literal would let the value's own text end that literal and run as SQL. So the compiler must
# never put a placeholder where the database sees a literal, a quoted name or a comment.


@pytest.mark.parametrize(
    ("query", "dialect"),
    [
        # MySQL's `--` starts a comment only when a blank follows: `1--'` is 1 minus minus a string that runs on.
        ("SELECT id FROM t WHERE id = 1--'\n OR name = {{name}} -- '", "mysql"),
        # MySQL runs the text of an executable comment as SQL.
        ("SELECT id FROM t WHERE name = {{name}} /*! AND 'x' = ' */ OR id = {{id}} /* ' */", "mysql"),
        ("SELECT id FROM t WHERE name = {{name}} /*M! AND 'x' = ' */ OR id = {{id}} /* ' */", "mysql"),
        # MySQL's double quotes make a string (with backslash escapes), not a name.
        ('SELECT id FROM t WHERE name = "{{name}}"', "mysql"),
        ('SELECT id FROM t WHERE name = "\\" OR id = {{id}} OR a = "', "mysql"),
        # A placeholder in a quoted name or a dollar-quoted string is text there, not a parameter.
        ('SELECT "{{name}}" FROM t', "postgresql"),
        ("SELECT $$ {{name}} $$", "postgresql"),
        ("SELECT $q$ {{name}} $q$", "postgresql"),
        ("SELECT `{{name}}` FROM t", "mysql"),
        ("SELECT [{{name}}] FROM t", "sqlite"),
        ("SELECT `{{name}}` FROM t", "sqlite"),
    ],
)
def test_a_placeholder_the_database_reads_as_text_is_refused(query: str, dialect: Dialect) -> None:
    with pytest.raises(SqlProblem):
        compile_sql(query, dialect)


@pytest.mark.parametrize(
    ("query", "dialect", "text"),
    [
        # PostgreSQL's block comments nest: the :x is inside the outer one.
        ("SELECT 1 /* a /* b */ :x */ + :y", "postgresql", "SELECT 1 /* a /* b */ :x */ + $1"),
        # On MySQL `--` followed by a blank is a comment, and `1--2` is arithmetic.
        ("SELECT 1--2, :y -- :x", "mysql", "SELECT 1--2, %s -- :x"),
        ("SELECT :y --\tx\n", "mysql", "SELECT %s --\tx"),
        ("SELECT :y --", "mysql", "SELECT %s --"),
        # SQLite's [name] and `name` are quoted names.
        ("SELECT [a:b], `c:d`, :y FROM t", "sqlite", "SELECT [a:b], `c:d`, ? FROM t"),
        # A MySQL optimizer hint is a comment.
        ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ :y", "mysql", "SELECT /*+ MAX_EXECUTION_TIME(1000) */ %s"),
        ('SELECT "a:b\\"c", :y', "mysql", 'SELECT "a:b\\"c", %s'),
    ],
)
def test_comments_and_quoted_names_are_read_as_the_database_reads_them(query: str, dialect: Dialect, text: str) -> None:
    assert compile_sql(query, dialect).text == text


def test_a_mysql_statement_cannot_change_how_quotes_are_read() -> None:
    for query in ("SET SESSION sql_mode = 'ANSI_QUOTES'", "SET @@sql_mode = CONCAT(@@sql_mode, ',ANSI')"):
        with pytest.raises(SqlProblem, match="sql_mode"):
            compile_sql(query, "mysql")
    assert compile_sql("SELECT @@sql_mode AS mode", "mysql").first_keyword == "select"


async def test_a_mysql_connection_left_without_backslash_escapes_runs_no_values(start_server: ServerFactory) -> None:
    # Without backslash escapes the server ends '\'' after the backslash: the compiler's placeholder would then sit in
    # a literal, and the value `OR 1=1 -- ` would run as SQL. EXECUTE IMMEDIATE hides the SET from the compiler.
    escape = {
        "tag": "no_escapes",
        "type": "execute",
        "query": "EXECUTE IMMEDIATE 'SET SESSION sql_mode = ''NO_BACKSLASH_ESCAPES'''",
    }
    db = await open_db(start_server, "mysql", [escape])
    try:
        await db.apply(
            [
                *users_actions(db.table),
                escape,
                {
                    "tag": "quote",
                    "type": "read",
                    "query": f"SELECT id FROM {db.table} WHERE name = '\\'' OR id = {{{{id}}}} -- '",
                },
            ],
            pool={"min": 0, "max": 1},
        )
        for i in (1, 2):
            await db.execute("create", data={"id": i, "email": f"u{i}@x", "name": "n", "score": i})
        assert (await db.execute("quote", filter={"id": 1})).rows == [{"id": 1}]
        await db.execute("no_escapes")
        with pytest.raises(FailedPreconditionError) as caught:
            await db.execute("quote", filter={"id": "OR 1=1 -- "})
        assert caught.value.reason == "DB_QUERY_INVALID" and "NO_BACKSLASH_ESCAPES" in str(caught.value)
        # The connection was dropped: the next one reads quotes the default way again.
        assert (await db.execute("quote", filter={"id": "OR 1=1 -- "})).rows == []
    finally:
        await db.execute("teardown")


# -- reads stay wrapped and bounded ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id FROM t) AS q UNION (SELECT 1",
        "SELECT id FROM (SELECT 1) AS q) AS r -- ",
        "SELECT id FROM (t",
    ],
)
def test_a_query_cannot_close_the_subquery_a_read_runs_in(query: str) -> None:
    with pytest.raises(SqlProblem, match="parenthesis"):
        compile_sql(query, "sqlite")


@pytest.mark.parametrize("comment", ["-- the end", "/* the end */"])
async def test_a_read_ending_in_a_comment_is_still_bounded(start_server: ServerFactory, comment: str) -> None:
    db = await open_db(start_server, "sqlite", database_max_rows=2)
    try:
        await db.apply(
            [
                *users_actions(db.table),
                {"tag": "all", "type": "read", "query": f"SELECT id FROM {db.table} ORDER BY id {comment}"},
                {"tag": "n", "type": "count", "query": f"SELECT id FROM {db.table} {comment}"},
            ]
        )
        for i in (1, 2):
            await db.execute("create", data={"id": i, "email": f"u{i}@x", "name": "n", "score": i})
        assert (await db.execute("all")).rows == [{"id": 1}, {"id": 2}]
        assert (await db.execute("n")).count == 2
        await db.execute("create", data={"id": 3, "email": "u3@x", "name": "n", "score": 3})
        with pytest.raises(ResourceExhaustedError):
            await db.execute("all")
    finally:
        await db.execute("teardown")


# -- results are bounded while they are fetched ------------------------------------------------------------------

MANY_ROWS = {
    # 200,000 rows of 1 KB: about 200 MB if fetched whole.
    "postgresql": "SELECT g AS n, repeat('x', 1000) AS pad FROM generate_series(1, 200000) AS g",
    "mysql": "SELECT seq AS n, REPEAT('x', 1000) AS pad FROM seq_1_to_200000",
    "sqlite": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200000) "
    "SELECT n, printf('%.1000c', 'x') AS pad FROM c",
}


@pytest.mark.parametrize("system", ["sqlite", "postgresql", "mysql"])
async def test_an_execute_answering_too_much_stops_fetching_at_the_bound(
    start_server: ServerFactory, system: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await open_db(start_server, system, database_max_rows=1000, database_max_result_bytes=64 * 1024)
    try:
        await db.apply([*users_actions(db.table), {"tag": "many", "type": "execute", "query": MANY_ROWS[system]}])
        fetched = _count_rows_fetched(monkeypatch)
        with pytest.raises(ResourceExhaustedError) as caught:
            await db.execute("many")
        assert caught.value.reason == "DB_RESULT_TOO_LARGE" and caught.value.metadata["limit"] == "bytes"
        # The adapter stopped within a chunk of the bound (64 KiB is about 64 rows), not after 200,000 rows.
        assert 0 < fetched() <= 1000
        assert (await db.execute("count", filter={"min": 0})).count == 0  # the pool still serves
    finally:
        await db.execute("teardown")


def _count_rows_fetched(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the rows the adapters hand to their result budget (every row they fetch passes through it)."""
    seen = [0]
    take = RowBudget.take

    def counting(self: RowBudget, rows: Sequence[Sequence[Any]]) -> None:
        seen[0] += len(rows)
        take(self, rows)

    monkeypatch.setattr(RowBudget, "take", counting)
    return lambda: seen[0]


# -- connection failures name no part of the DSN -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nobody-x:hunter2-secret@127.0.0.1:5432/test",  # a role the server does not know
        "postgresql://postgres:hunter2-secret@127.0.0.1:5432/nowhere_x",  # a database it does not have
        "postgresql://nobody-x:hunter2-secret@127.0.0.1:notaport/test",  # a DSN asyncpg parses only when connecting
    ],
)
async def test_a_postgresql_connection_refused_is_unavailable_and_names_nothing_of_the_dsn(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    await require_postgres()
    running = await start_server()
    db = Db(running, "postgresql", "t_x", "t_x")
    await db.apply([{"tag": "ping", "type": "read", "query": "SELECT 1 AS one"}], url=url)
    with pytest.raises(UnavailableError) as caught:
        await db.execute("ping", retries=0)
    assert caught.value.reason == "DB_UNREACHABLE"
    with pytest.raises(UnavailableError):
        await running.client.migration.status(product="shop", env="dev", database="main")
    shown = f"{caught.value} {caught.value.metadata} {caught.value.field_violations}"
    for part in ("hunter2", "nobody-x", "nowhere_x", "notaport"):
        assert part not in shown
    # The processor's own records of the manifest aside (aiosqlite's debug lines), no log line holds the DSN.
    logged = [r.getMessage() for r in caplog.records if not r.name.startswith("aiosqlite")]
    assert not [line for line in logged if "hunter2" in line or "notaport" in line]


# -- values the response cannot carry as they are ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [31, 32, 60, 900, 3000])
async def test_a_json_column_nested_too_deep_for_protobuf_comes_back_as_its_text(
    start_server: ServerFactory, depth: int
) -> None:
    db = await open_db(start_server, "postgresql")
    try:
        nested = {
            "tag": "nested",
            "type": "read",
            "query": "SELECT CAST(repeat('{\"a\":', :n) || '1' || repeat('}', :n) AS jsonb) AS j",
            "params": {"n": "$Input{filter}{n}"},
        }
        await db.apply([*users_actions(db.table), nested])
        value = (await db.execute("nested", filter={"n": depth})).rows[0]["j"]
        if depth <= 31:
            expected: Any = 1
            for _ in range(depth):
                expected = {"a": expected}
            assert value == expected
        else:
            assert isinstance(value, str) and value.replace(" ", "") == '{"a":' * depth + "1" + "}" * depth
    finally:
        await db.execute("teardown")


# -- page tokens -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ["sqlite", "postgresql", "mysql"])
async def test_a_page_token_forged_with_an_offset_past_64_bits_is_refused_as_a_page_token(
    start_server: ServerFactory, system: str
) -> None:
    # A token is not signed (it holds nothing a caller could not reach by paging); its offset is still bounded.
    db = await open_db(start_server, system)
    try:
        for i in (1, 2):
            await db.execute("create", data={"id": i, "email": f"u{i}@x", "name": "n", "score": i})
        token = (await db.execute("list", filter={"min": 0}, page_size=1)).next_page_token
        fingerprint = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))[0]
        for offset in (2**63, 10**30):
            raw = json.dumps([fingerprint, offset]).encode()
            forged = base64.urlsafe_b64encode(raw).decode().rstrip("=")
            with pytest.raises(InvalidArgumentError) as caught:
                await db.execute("list", filter={"min": 0}, page_size=1, page_token=forged)
            assert caught.value.field_violations[0].field == "page_token"
    finally:
        await db.execute("teardown")


async def test_paging_a_single_row_read_says_why_it_does_not_page(start_server: ServerFactory) -> None:
    db = await open_db(start_server, "sqlite")
    with pytest.raises(InvalidArgumentError) as caught:
        await db.execute("one", filter={"id": 1}, page_size=5)
    assert caught.value.field_violations[0].field == "page_size" and "single" in str(caught.value)
    await db.execute("teardown")


# -- the bound is on the answer as it is sent ---------------------------------------------------------------------


def _wide(rows: int) -> str:
    """`rows` rows of 20 one-letter columns holding 'x': small in JSON, about 2.5 times as large as protobuf."""
    columns = ", ".join(f"'x' AS {chr(97 + i)}" for i in range(20))
    return f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {rows}) SELECT {columns} FROM c"


async def test_a_result_within_the_bound_fits_in_one_response_message(start_server: ServerFactory) -> None:
    # 600 such rows were counted as 48,000 bytes, under a bound of 48 KiB, but take about 120 KB as a response: the
    # call failed when the server sent it (RESOURCE_EXHAUSTED with no reason of ours).
    db = await open_db(start_server, "sqlite", max_message_bytes=64 * 1024, database_max_result_bytes=48 * 1024)
    try:
        await db.apply(
            [
                *users_actions(db.table),
                {"tag": "wide", "type": "read", "query": _wide(600)},
                {"tag": "some", "type": "read", "query": _wide(100)},
            ]
        )
        assert len((await db.execute("some")).rows) == 100
        with pytest.raises(ResourceExhaustedError) as caught:
            await db.execute("wide")
        assert caught.value.reason == "DB_RESULT_TOO_LARGE" and caught.value.metadata["limit"] == "bytes"
    finally:
        await db.execute("teardown")


async def test_a_batch_is_bounded_as_a_whole_and_rolled_back_past_the_bound(start_server: ServerFactory) -> None:
    # Each step is under the bound; the three together were not, and the batch committed before its answer failed.
    db = await open_db(start_server, "sqlite", max_message_bytes=64 * 1024, database_max_result_bytes=48 * 1024)
    try:
        await db.apply([*users_actions(db.table), {"tag": "part", "type": "read", "query": _wide(150)}])
        assert len((await db.batch(Step("part")))[0].rows) == 150
        add = Step("create", {"data": {"id": 1, "email": "a@x", "name": "A", "score": 1}})
        with pytest.raises(ResourceExhaustedError) as caught:
            await db.batch(add, Step("part", tag="one"), Step("part", tag="two"), Step("part", tag="three"))
        assert caught.value.reason == "DB_RESULT_TOO_LARGE"
        assert (await db.execute("count", filter={"min": 0})).count == 0  # the write was rolled back
    finally:
        await db.execute("teardown")


# -- environments ------------------------------------------------------------------------------------------------


async def test_each_environment_of_a_sqlite_database_has_its_own_file(start_server: ServerFactory) -> None:
    # With no path, dev and prd shared `<database>.db`: a dev call wrote production's rows.
    running = await start_server()
    table = f"t_{secrets.token_hex(5)}"
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}, {"slug": "prd"}],
        "databases": [
            {
                "tag": "main",
                "envs": {"dev": {"type": "sqlite"}, "prd": {"type": "sqlite"}},
                "actions": users_actions(table),
            }
        ],
    }
    await running.client.product.apply(json.dumps(document).encode())
    database = running.client.database

    async def call(env: str, action: str, **given: Any) -> Any:
        return await database.execute(product="shop", env=env, database="main", action=action, input=given)

    await call("dev", "setup")
    await call("dev", "create", data={"id": 1, "email": "dev@x", "name": "dev", "score": 1})
    await call("prd", "setup")  # its own file: the table is not there yet
    assert (await call("prd", "count", filter={"min": 0})).count == 0
    assert (await call("dev", "count", filter={"min": 0})).count == 1
    folder = Path(running.app.settings.data_dir) / "databases" / "shop"
    assert sorted(p.name for p in folder.glob("*.db")) == ["main.dev.db", "main.prd.db"]


# -- a call abandoned while it waits ------------------------------------------------------------------------------


async def test_a_sqlite_migration_abandoned_while_waiting_for_the_lock_leaves_no_transaction_open(
    start_server: ServerFactory,
) -> None:
    # The caller gave up while SQLite's BEGIN IMMEDIATE waited for another writer; the connection went back to the
    # pool and, once the other writer finished, that BEGIN took the write lock and kept it: every later write waited
    # for it, and the connection's own writes were never committed.
    running = await start_server()
    run = f"t_{secrets.token_hex(5)}"
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}],
        "databases": [
            {
                "tag": "main",
                "envs": {"dev": {"type": "sqlite", "path": f"{run}.db", "statement_timeout": "3s"}},
                "migrations": [
                    {"tag": "create", "up": [f"CREATE TABLE {run} (id INTEGER)"], "down": [f"DROP TABLE {run}"]}
                ],
            }
        ],
    }
    await running.client.product.apply(json.dumps(document).encode())
    migration = running.client.migration
    target = {"product": "shop", "env": "dev", "database": "main"}
    assert [m.state for m in await migration.status(**target)] == ["pending"]  # the file exists
    other = sqlite3.connect(Path(running.app.settings.data_dir) / "databases" / "shop" / f"{run}.db")
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        with pytest.raises(ProcessorError):
            await migration.run(**target, timeout=1.0)
        other.execute("COMMIT")
    finally:
        other.close()
    assert [m.tag for m in await migration.run(**target, timeout=20.0)] == ["create"]
    assert [m.state for m in await migration.status(**target, timeout=20.0)] == ["applied"]
