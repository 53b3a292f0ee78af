"""The manifest's `databases` section: what is refused at apply time, with its path, and how SQL is compiled."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ductape_processor.errors import InvalidManifest
from ductape_processor.runtime.databases.sql import SqlProblem, compile_sql
from ductape_processor.runtime.registry.loader import load_manifest


def manifest(actions: list[dict[str, Any]] | None = None, env: dict[str, Any] | None = None, **database: Any) -> bytes:
    return json.dumps(
        {
            "product": "shop",
            "environments": [{"slug": "dev"}],
            "databases": [
                {"tag": "main", "envs": {"dev": env or {"type": "sqlite"}}, "actions": actions or [], **database}
            ],
        }
    ).encode()


def problems(source: bytes) -> dict[str, str]:
    with pytest.raises(InvalidManifest) as caught:
        load_manifest(source)
    return {p.field: p.description for p in caught.value.problems}


def action(query: str, **fields: Any) -> dict[str, Any]:
    return {"tag": "a", "type": fields.pop("type", "read"), "query": query, **fields}


def test_a_valid_database_section_loads_with_its_plan() -> None:
    loaded = load_manifest(
        manifest(
            [action("SELECT * FROM users WHERE id = :id AND email = {{email}}", params={"id": "$Input{filter}{id}"})],
            migrations=[{"tag": "init", "up": ["CREATE TABLE users (id INTEGER)"], "down": ["DROP TABLE users"]}],
        )
    )
    plan = loaded.compiled.databases[("main", "a")]
    assert plan.sql["sqlite"].text == "SELECT * FROM users WHERE id = ? AND email = ?"
    assert plan.sql["sqlite"].names == ("id", "email")


def test_mongodb_is_refused_with_the_reason() -> None:
    found = problems(manifest(env={"type": "mongodb", "url": "mongodb://x"}))
    assert "out of scope until a MongoDB server is at hand" in found["databases[0].envs.dev"]


def test_a_placeholder_without_a_param_and_a_param_without_a_placeholder_are_refused() -> None:
    found = problems(manifest([action("SELECT * FROM t WHERE id = :id", params={"other": "$Input{filter}{x}"})]))
    assert ":id has no value" in found["databases[0].actions[0].query"]
    assert "no placeholder :other" in found["databases[0].actions[0].params.other"]


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT * FROM t WHERE email = '{{email}}'", "inside a quoted SQL string"),
        ("SELECT * FROM t WHERE a = '{{ email }}' AND b = 1", "inside a quoted SQL string"),
        ("SELECT 1; DROP TABLE t", "more than one statement"),
        ("SELECT * FROM t WHERE id = ?", "positional parameter"),
        ("SELECT * FROM t WHERE name = 'open", "is not closed"),
        ("DELETE FROM t", "is a SELECT"),
    ],
)
def test_unsafe_or_ambiguous_queries_are_refused(query: str, why: str) -> None:
    found = problems(manifest([action(query)]))
    assert why in found["databases[0].actions[0].query"]


@pytest.mark.parametrize("path", ["../escape.db", "a/../../b.db", "/etc/passwd", "C:/x.db", "file:x.db", "a\\b.db"])
def test_a_sqlite_path_cannot_leave_the_data_directory(path: str) -> None:
    found = problems(manifest(env={"type": "sqlite", "path": path}))
    assert "databases[0].envs.dev.path" in found


def test_a_dsn_problem_never_quotes_the_password() -> None:
    found = problems(manifest(env={"type": "postgresql", "url": "http://user:hunter2@db/x"}))
    assert all("hunter2" not in text for text in found.values())
    assert "databases[0].envs.dev.url" in found


def test_environments_tags_and_pool_bounds_are_checked() -> None:
    source = json.dumps(
        {
            "product": "shop",
            "environments": [{"slug": "dev"}, {"slug": "prd"}],
            "databases": [
                {
                    "tag": "main",
                    "envs": {"dev": {"type": "sqlite"}},
                    "actions": [action("SELECT 1"), action("SELECT 2")],
                }
            ],
        }
    ).encode()
    found = problems(source)
    assert "no configuration for environment 'prd'" in found["databases[0].envs"]
    assert "already used" in found["databases[0].actions[1].tag"]
    pool = problems(manifest(env={"type": "sqlite", "pool": {"min": 5, "max": 2}}))
    assert "min is greater than max" in pool["databases[0].envs.dev.pool"]


def test_the_sql_scanner_keeps_literals_comments_and_casts() -> None:
    pg = compile_sql("SELECT ':x', $$ :y $$, a::int, \"c:z\" FROM t -- :w\nWHERE b = :b AND c = :b", "postgresql")
    assert pg.text == "SELECT ':x', $$ :y $$, a::int, \"c:z\" FROM t -- :w\nWHERE b = $1 AND c = $1"
    assert pg.names == ("b",)
    my = compile_sql("SELECT `a:b`, '50%' FROM t WHERE x LIKE :p # :q", "mysql")
    assert my.text == "SELECT `a:b`, '50%%' FROM t WHERE x LIKE %s # :q"
    lite = compile_sql("INSERT INTO t VALUES (:a, {{b}}, :a) RETURNING id;", "sqlite")
    assert lite.text == "INSERT INTO t VALUES (?, ?, ?) RETURNING id"
    assert lite.names == ("a", "b", "a") and lite.returns_rows and lite.braced == {"b"}
    with pytest.raises(SqlProblem):
        compile_sql("SELECT E'\\' {{x}}'", "postgresql")


def test_migration_statements_are_checked_at_apply_time() -> None:
    found = problems(
        manifest(
            migrations=[
                {"tag": "one", "up": ["CREATE TABLE t (id INTEGER); DROP TABLE u"]},
                {"tag": "two", "up": ["INSERT INTO t VALUES (:id)"], "down": ["DELETE FROM t WHERE x = '{{id}}'"]},
            ]
        )
    )
    assert "more than one statement" in found["databases[0].migrations[0].up[0]"]
    assert "binds no parameters" in found["databases[0].migrations[1].up[0]"]
    assert "inside a quoted SQL string" in found["databases[0].migrations[1].down[0]"]
    twice = problems(manifest(migrations=[{"tag": "one", "up": ["SELECT 1"]}, {"tag": "one", "up": ["SELECT 2"]}]))
    assert "already used" in twice["databases[0].migrations[1].tag"]
