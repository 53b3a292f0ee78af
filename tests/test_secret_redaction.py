"""Secrets at rest: what the execution log, the store and the data directory keep of a secret (nothing readable)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from ductape.processor import InvalidArgumentError, ProcessorError

from ductape_processor.store.postgres import PostgresStore
from ductape_processor.store.sqlite import SqliteStore
from tests.conftest import POSTGRES_DSN, Running, ServerFactory
from tests.upstream import Upstream, json_answer

LOGIN_KEY = "lk-Zq8wP3vXr7Tn2Yb5"
API_KEY = "ak-Hs4mK9cVe1Ld6Ju0"
MINTED = "minted-Wd3fQ7gA2sR8kP"


def product(base_url: str) -> bytes:
    """A product whose credential auth puts a secret in the login URL's path and query, and in its headers."""
    app: dict[str, Any] = {
        "tag": "api",
        "envs": {"dev": {"base_url": base_url}},
        "auths": [
            {"tag": "key", "type": "token", "query": {"key": "$Secret{API_KEY}"}},
            {
                "tag": "login",
                "type": "credential",
                "action": "token",
                "expiry": "1h",
                "input": {
                    "params": {"key": "$Secret{LOGIN_KEY}", "inner": "/x/$Secret{LOGIN_KEY}/y"},
                    "query": {"k": "$Secret{LOGIN_KEY}", "client": "shop"},
                    "headers": {"X-Login": "Bearer $Secret{LOGIN_KEY}"},
                },
                "headers": {"Authorization": "Bearer $Response{body}{access_token}"},
                "query": {"sig": "$Response{body}{access_token}"},
            },
        ],
        "actions": [
            {
                "tag": "token",
                "method": "POST",
                "path": "/login/:key/at/:inner",
                "input": {
                    "params": {"key": {"type": "string"}, "inner": {"type": "string"}},
                    "query": {"k": {"type": "string"}, "client": {"type": "string"}},
                    "headers": {"X-Login": {"type": "string"}},
                },
            },
            {
                "tag": "me",
                "method": "GET",
                "path": "/me/:id",
                "headers": {
                    "Authorization": "$Auth{login}{headers}{Authorization}",
                    "X-Shout": "$Uppercase($Secret{API_KEY})",
                    "X-Plain": "plain",
                },
                "query": {
                    "sig": "$Auth{login}{query}{sig}",
                    "key": "$Auth{key}{query}{key}",
                    "wrapped": "/x/$Secret{API_KEY}/y",
                    "q": "$Input{query}{q}",
                },
                "input": {"params": {"id": {"type": "string"}}, "query": {"q": {"type": "string"}}},
            },
        ],
    }
    document = {"product": "vault", "environments": [{"slug": "dev"}], "apps": [app]}
    return json.dumps(document).encode()


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_LOGIN_KEY", LOGIN_KEY)
    monkeypatch.setenv("PROCESSOR_SECRET_API_KEY", API_KEY)


def answer_login(upstream: Upstream) -> None:
    upstream.on(f"POST /login/{LOGIN_KEY}/at//x/{LOGIN_KEY}/y", lambda r: json_answer({"access_token": MINTED}))
    upstream.on("GET /me/42", lambda r: json_answer({"ok": True}))


async def call_me(server: Running) -> None:
    result = await server.client.action.run(
        product="vault", env="dev", app="api", event="me", input={"params": {"id": "42"}, "query": {"q": "hello"}}
    )
    assert result.status_code == 200


def secret_forms() -> list[str]:
    return [LOGIN_KEY, API_KEY, API_KEY.upper(), MINTED]


async def test_secrets_in_login_paths_queries_and_headers_never_reach_the_execution_log(
    secrets_env: None, start_server: ServerFactory, upstream: Upstream
) -> None:
    server = await start_server(execution_flush_s=0.05)
    await server.client.product.apply(product(upstream.url))
    answer_login(upstream)
    await call_me(server)
    # The upstream got every secret where the manifest put it: the log must hide each of them.
    [login] = upstream.hits(f"/login/{LOGIN_KEY}/at//x/{LOGIN_KEY}/y")
    assert login.query == {"k": [LOGIN_KEY], "client": ["shop"]} and login.headers["X-Login"] == f"Bearer {LOGIN_KEY}"
    [me] = upstream.hits("/me/42")
    assert me.query["sig"] == [MINTED] and me.query["key"] == [API_KEY] and me.query["wrapped"] == [f"/x/{API_KEY}/y"]
    assert me.headers["X-Shout"] == API_KEY.upper()

    await server.app.components.recorder.flush()
    listed = await server.client.logs.list_executions(product="vault")
    details = {record.resource: record.detail for record in listed.executions}
    assert set(details) == {"api:token", "api:me"}
    for detail in details.values():
        for secret in secret_forms():
            assert secret not in detail, detail
    assert details["api:token"].startswith(f"POST {upstream.url}/login/[redacted]/at/[redacted]?")
    assert "k=[redacted]" in details["api:token"] and "client=shop" in details["api:token"]
    assert "X-Login: [redacted]" in details["api:token"]
    assert details["api:me"].startswith(f"GET {upstream.url}/me/42?")
    for shown in ("sig=[redacted]", "key=[redacted]", "wrapped=[redacted]", "q=hello"):
        assert shown in details["api:me"], details["api:me"]
    for shown in ("Authorization: [redacted]", "X-Shout: [redacted]", "X-Plain"):
        assert shown in details["api:me"], details["api:me"]
    assert "X-Plain: [redacted]" not in details["api:me"]

    # Nor the store's files: the execution records and the minted token in the SQLite database and its WAL.
    data_dir = server.app.settings.data_dir
    for path in data_dir.iterdir():
        content = path.read_bytes()
        for secret in secret_forms():
            assert secret.encode() not in content, (path.name, secret)


async def test_a_login_input_that_breaks_its_contract_withholds_the_reason(
    secrets_env: None, start_server: ServerFactory, upstream: Upstream
) -> None:
    document = json.loads(product(upstream.url))
    document["apps"][0]["actions"][0]["input"]["params"]["key"] = {"type": "string", "max_length": 5}
    server = await start_server()
    await server.client.product.apply(json.dumps(document).encode())
    with pytest.raises(InvalidArgumentError) as caught:
        await call_me(server)
    error = caught.value
    assert [v.field for v in error.field_violations] == ["input.params.key"]
    everything = f"{error.message} {error.field_violations} {error.metadata}"
    assert str(len(LOGIN_KEY)) not in everything and LOGIN_KEY not in everything
    assert "withheld" in error.field_violations[0].description
    assert upstream.seen == []


def _stored_tokens_sqlite(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [str(row[0]) for row in db.execute("SELECT token_values FROM auth_tokens")]


async def test_a_minted_token_is_sealed_in_sqlite_and_opened_after_a_restart(
    secrets_env: None, start_server: ServerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    first = await start_server(data_dir=data_dir)
    await first.client.product.apply(product(upstream.url))
    answer_login(upstream)
    await call_me(first)
    [stored] = _stored_tokens_sqlite(data_dir / "processor.db")
    assert stored.startswith("sealed.v1.") and MINTED not in stored and "access_token" not in stored
    await first.app.stop(grace=0)
    again = await start_server(data_dir=data_dir)  # a restart: same data directory, same generated root key
    await call_me(again)
    assert len(upstream.seen) == 3, "the stored token was opened and reused: one login for two calls"
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {MINTED}"


async def test_a_minted_token_is_sealed_in_postgres_and_shared_by_replicas(
    pg_schema: str, secrets_env: None, start_server: ServerFactory, upstream: Upstream
) -> None:
    keys = "k1:" + "A" * 43  # one root key for both replicas, as PROCESSOR_SESSION_KEYS configures it
    a = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=[keys])
    b = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=[keys])
    await a.client.product.apply(product(upstream.url))
    answer_login(upstream)
    await call_me(a)
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        rows = await conn.fetch(f'SELECT key, token_values FROM "{pg_schema}".auth_tokens')
    finally:
        await conn.close()
    assert [row["key"] for row in rows] == ["vault/dev/api/login"]
    assert MINTED not in rows[0]["token_values"] and rows[0]["token_values"].startswith("sealed.v1.k1.")
    await call_me(b)
    assert len(upstream.hits(f"/login/{LOGIN_KEY}/at//x/{LOGIN_KEY}/y")) == 1, "replica b opened a's token"
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {MINTED}"


async def test_a_replica_with_other_root_keys_mints_its_own_token(
    pg_schema: str, secrets_env: None, start_server: ServerFactory, upstream: Upstream
) -> None:
    a = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=["k1:" + "A" * 43])
    b = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=["k2:" + "B" * 43])
    await a.client.product.apply(product(upstream.url))
    answer_login(upstream)
    await call_me(a)
    await call_me(b)
    assert len(upstream.hits(f"/login/{LOGIN_KEY}/at//x/{LOGIN_KEY}/y")) == 2


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common umask 022, under which files are created world-readable unless the processor says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_data_directory_is_0700_and_every_file_in_it_0600(
    open_umask: None, secrets_env: None, start_server: ServerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "new" / "data"
    server = await start_server(data_dir=data_dir, execution_flush_s=0.05)
    await server.client.product.apply(product(upstream.url))
    answer_login(upstream)
    await call_me(server)
    await server.app.components.recorder.flush()
    written = {path.name: mode(path) for path in data_dir.iterdir()}
    assert {"processor.db", "processor.db-wal", "processor.db-shm", "session-keys"} <= set(written)
    assert written == dict.fromkeys(written, 0o600)
    assert mode(data_dir) == 0o700 and mode(data_dir.parent) == 0o700


async def test_an_existing_data_directory_and_files_open_to_others_are_tightened(
    open_umask: None, start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    for name in ("processor.db", "processor.db-wal", "session-keys"):
        (data_dir / name).touch(mode=0o644)
        (data_dir / name).chmod(0o644)
    (data_dir / "session-keys").write_text("local:" + "A" * 43 + "\n")
    caplog.set_level(logging.WARNING)
    await start_server(data_dir=data_dir)
    assert mode(data_dir) == 0o700
    assert {path.name: mode(path) for path in data_dir.iterdir()} == {
        "processor.db": 0o600,
        "processor.db-wal": 0o600,
        "processor.db-shm": 0o600,
        "session-keys": 0o600,
    }
    assert any("tightened" in record.getMessage() and str(data_dir) in record.getMessage() for record in caplog.records)


async def test_a_store_file_named_elsewhere_is_0600_and_its_existing_folder_left_alone(
    open_umask: None, start_server: ServerFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    database = shared / "elsewhere.db"
    await start_server(store=SqliteStore(database), session_keys=["k1:" + "A" * 43])
    assert mode(database) == 0o600 and mode(shared) == 0o755


# -- connection URLs with a password: errors and logs never quote it -----------------------------------------------

# Base64 passwords carry '/' and '+': written raw into a URL, the '/' ends the authority and parsers quote the rest.
URL_PASSWORDS = ["Pw0rd/Zq8w+P3v", "Pw0rd@Zq8w:P3v", "Pw0rd%2FZq8wP3v"]


@pytest.mark.parametrize("password", URL_PASSWORDS)
@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("nats", "nats://app:$Secret{BROKER_PASSWORD}@127.0.0.1:1"),
        ("redis", "redis://app:$Secret{BROKER_PASSWORD}@127.0.0.1:1/0"),
        ("rabbitmq", "amqp://app:$Secret{BROKER_PASSWORD}@127.0.0.1:1/"),
    ],
)
async def test_a_broker_error_never_quotes_the_password_of_its_url(
    kind: str,
    url: str,
    password: str,
    start_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_BROKER_PASSWORD", password)
    caplog.set_level(logging.DEBUG)
    server = await start_server()
    config: dict[str, Any] = {"type": kind, "url": url}
    document = {
        "product": "vault",
        "environments": [{"slug": "dev"}],
        "brokers": [{"tag": "events", "envs": {"dev": config}, "topics": [{"tag": "orders", "name": "orders"}]}],
    }
    await server.client.product.apply(json.dumps(document).encode())
    with pytest.raises(ProcessorError) as caught:
        await server.client.message_broker.publish(product="vault", env="dev", event="events:orders", data=b"x")
    assert caught.value.reason == "BROKER_UNAVAILABLE", caught.value
    seen = f"{caught.value.message} {caught.value.metadata} {caplog.text}"
    for piece in ("Pw0rd", "Zq8w", "P3v"):
        assert piece not in seen, seen


@pytest.mark.parametrize(
    ("password", "reason"), [(URL_PASSWORDS[0], "CACHE_URL_INVALID"), (URL_PASSWORDS[1], "CACHE_UNAVAILABLE")]
)
async def test_a_redis_cache_that_fails_never_quotes_its_url(
    password: str,
    reason: str,
    secrets_env: None,
    start_server: ServerFactory,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_REDIS_URL", f"redis://app:{password}@127.0.0.1:6379/0")
    caplog.set_level(logging.DEBUG)
    server = await start_server()
    document = json.loads(product(upstream.url))
    document["caches"] = [{"tag": "hot", "ttl": "5s", "backend": "redis", "url": "$Secret{REDIS_URL}"}]
    await server.client.product.apply(json.dumps(document).encode())
    answer_login(upstream)
    with pytest.raises(ProcessorError) as caught:
        await server.client.action.run(
            product="vault", env="dev", app="api", event="me", input={"params": {"id": "42"}}, cache="hot"
        )
    assert caught.value.reason == reason
    seen = f"{caught.value.message} {caught.value.metadata} {caplog.text}"
    for piece in ("Pw0rd", "Zq8w", "P3v"):
        assert piece not in seen, seen


async def test_a_secret_that_cannot_be_sent_in_a_header_is_never_quoted(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_LOGIN_KEY", LOGIN_KEY)
    monkeypatch.setenv("PROCESSOR_SECRET_API_KEY", "Yx5nB1k\r\nX-Evil: Rt7uJ2m")
    caplog.set_level(logging.DEBUG)
    server = await start_server(execution_flush_s=0.05)
    await server.client.product.apply(product(upstream.url))
    answer_login(upstream)
    with pytest.raises(ProcessorError) as caught:
        await call_me(server)
    assert upstream.hits("/me/42") == []
    await server.app.components.recorder.flush()
    listed = await server.client.logs.list_executions(product="vault")
    seen = f"{caught.value.message} {caught.value.metadata} {caught.value.field_violations} {caplog.text} {listed}"
    for piece in ("Yx5nB1k", "Rt7uJ2m", "X-Evil"):
        assert piece not in seen, seen
