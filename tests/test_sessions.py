"""Sessions: tokens, refresh rotation, revocation, key rotation, and sessions used by actions."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ductape.processor import InvalidArgumentError, NotFoundError, ProcessorError, UnauthenticatedError

from ductape_processor.app import ProcessorApp, StartupError
from ductape_processor.errors import Unauthenticated
from ductape_processor.runtime.registry.loader import ManifestFormat
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.sessions import RefreshConflict, SessionKeys, SessionManager, new_root_key
from ductape_processor.settings import Settings
from ductape_processor.store.postgres import PostgresStore
from ductape_processor.store.sqlite import SqliteStore
from ductape_processor.telemetry.logging import configure_logging
from tests.conftest import POSTGRES_DSN, Running, ServerFactory
from tests.upstream import Upstream, json_answer

SCHEMA = {
    "userId": {"type": "string", "required": True},
    "email": {"type": "email"},
    "age": {"type": "integer"},
    "score": {"type": "number"},
    "admin": {"type": "boolean"},
    "key": {"type": "uuid"},
    "born": {"type": "date"},
    "roles": {"type": "array", "max_length": 3},
    "prefs": {"type": "object"},
}
DATA = {
    "userId": "u-1",
    "email": "ada@example.com",
    "age": 36,
    "score": 9.5,
    "admin": False,
    "key": "6f1c2a4e-8d3b-4b7a-9c1e-2f5d6a7b8c9d",
    "born": "1815-12-10",
    "roles": ["author"],
    "prefs": {"theme": "dark", "n": 0},
}


def product(base_url: str = "http://127.0.0.1:9", name: str = "shop") -> bytes:
    document: dict[str, Any] = {
        "product": name,
        "environments": [{"slug": "dev"}, {"slug": "prd", "name": "production"}],
        "sessions": [
            {"tag": "user", "schema": SCHEMA, "selector": "$Session{userId}", "expiry": "15m", "refresh_expiry": "1d"},
            {"tag": "admin", "schema": {"id": {"type": "string"}}, "selector": "$Session{id}"},
        ],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": base_url}, "prd": {"base_url": base_url}},
                "actions": [
                    {
                        "tag": "profile",
                        "method": "GET",
                        "path": "/profile",
                        "headers": {"X-User": "$Session{userId}", "X-Theme": "$Session{prefs}{theme}"},
                    }
                ],
            }
        ],
        "caches": [{"tag": "short", "ttl": "60s"}],
    }
    return json.dumps(document).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def managed(tmp_path: Path) -> AsyncIterator[tuple[SessionManager, Clock, Registry, SqliteStore]]:
    store = SqliteStore(tmp_path / "sessions.db")
    await store.open()
    registry = Registry(store)
    await registry.apply(product(), ManifestFormat.JSON)
    clock = Clock()
    manager = SessionManager(registry, store, SessionKeys.load([new_root_key("k1")], tmp_path)[0], clock=clock)
    yield manager, clock, registry, store
    await store.close()


@pytest.fixture
async def server(start_server: ServerFactory) -> Running:
    running = await start_server(session_keys=[new_root_key("k1")])
    await running.client.product.apply(product())
    return running


async def start(running: Running, data: dict[str, Any] | None = None, tag: str = "user"):  # type: ignore[no-untyped-def]
    return await running.client.session.start(product="shop", env="dev", tag=tag, data=data or DATA)


async def test_start_and_verify_roundtrip_every_schema_type(server: Running) -> None:
    pair = await start(server)
    assert pair.token and pair.refresh_token and pair.session_id
    assert pair.token.split(".")[1] == "k1"
    session = await server.client.session.verify(product="shop", env="dev", tag="user", token=pair.token)
    assert session.data == DATA
    assert session.identifier == "u-1" and session.session_id == pair.session_id
    assert (session.expires_at - pair.expire_time.ToDatetime(session.expires_at.tzinfo)).total_seconds() == 0


async def test_the_token_hides_the_data(server: Running) -> None:
    pair = await start(server)
    for token in (pair.token, pair.refresh_token):
        # Neither in the token's text nor in its decoded parts: a short value like "u-1" may turn up by chance in
        # random base64 text (it did), but not in the decoded bytes of a sealed payload.
        assert "ada@example.com" not in token
        for part in token.split("."):
            decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
            assert b"ada@example.com" not in decoded and b"u-1" not in decoded and b"dark" not in decoded, part


async def test_schema_violations_name_each_field(server: Running) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await start(server, {"email": "nope", "age": "old", "roles": [1, 2, 3, 4]})
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {"data.userId", "data.email", "data.age", "data.roles"}
    with pytest.raises(NotFoundError) as missing:
        await start(server, tag="guest")
    assert missing.value.reason == "SESSION_TYPE_NOT_FOUND"


async def test_flipping_any_byte_of_a_token_invalidates_it(managed: Any) -> None:
    manager, _, _, _ = managed
    pair = await manager.start("shop", "dev", "user", DATA)
    token = pair.token
    for index in range(len(token)):
        flipped = token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1 :]
        with pytest.raises(Unauthenticated) as caught:
            await manager.verify("shop", "dev", "user", flipped)
        assert caught.value.reason == "SESSION_INVALID", index


async def test_a_token_opens_only_where_it_was_made(server: Running) -> None:
    await server.client.product.apply(product(name="blog"))
    pair = await start(server)
    for where in ({"product": "blog", "env": "dev", "tag": "user"}, {"product": "shop", "env": "prd", "tag": "user"}):
        with pytest.raises(UnauthenticatedError) as caught:
            await server.client.session.verify(token=pair.token, **where)
        assert caught.value.reason == "SESSION_INVALID"
    admin = await start(server, {"id": "a-1"}, tag="admin")
    with pytest.raises(UnauthenticatedError) as caught:
        await server.client.session.verify(product="shop", env="dev", tag="user", token=admin.token)
    assert caught.value.reason == "SESSION_INVALID"
    with pytest.raises(UnauthenticatedError) as caught:
        await server.client.session.refresh(product="shop", env="dev", tag="user", refresh_token=pair.token)
    assert caught.value.reason == "SESSION_INVALID", "a session token is not a refresh token"


async def test_tokens_expire(managed: Any) -> None:
    manager, clock, _, _ = managed
    pair = await manager.start("shop", "dev", "user", DATA)
    clock.now += 14 * 60
    assert (await manager.verify("shop", "dev", "user", pair.token)).identifier == "u-1"
    clock.now += 2 * 60
    with pytest.raises(Unauthenticated) as caught:
        await manager.verify("shop", "dev", "user", pair.token)
    assert caught.value.reason == "SESSION_EXPIRED"
    renewed = await manager.refresh("shop", "dev", "user", pair.refresh_token)
    assert (await manager.verify("shop", "dev", "user", renewed.token)).session_id == pair.session_id
    clock.now += 86400
    with pytest.raises(Unauthenticated) as caught:
        await manager.refresh("shop", "dev", "user", renewed.refresh_token)
    assert caught.value.reason == "SESSION_EXPIRED"


async def test_refresh_rotates_and_reuse_revokes_the_family(managed: Any) -> None:
    manager, clock, _, _ = managed
    first = await manager.start("shop", "dev", "user", DATA)
    second = await manager.refresh("shop", "dev", "user", first.refresh_token)
    assert second.token != first.token and second.refresh_token != first.refresh_token
    clock.now += 60  # well after the rotation: presenting the old refresh token again is reuse
    with pytest.raises(Unauthenticated) as caught:
        await manager.refresh("shop", "dev", "user", first.refresh_token)
    assert caught.value.reason == "SESSION_REVOKED"
    for token in (second.token, first.token):
        with pytest.raises(Unauthenticated) as caught:
            await manager.verify("shop", "dev", "user", token)
        assert caught.value.reason == "SESSION_REVOKED"
    with pytest.raises(Unauthenticated):
        await manager.refresh("shop", "dev", "user", second.refresh_token)


async def test_concurrent_refreshes_with_one_token_have_one_winner(server: Running) -> None:
    pair = await start(server)
    results = await asyncio.gather(
        *(
            server.client.session.refresh(product="shop", env="dev", tag="user", refresh_token=pair.refresh_token)
            for _ in range(4)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, ProcessorError)]
    assert len(winners) == 1 and len(losers) == 3
    assert {e.reason for e in losers} == {"REFRESH_CONFLICT"}
    session = await server.client.session.verify(product="shop", env="dev", tag="user", token=winners[0].token)
    assert session.identifier == "u-1", "the winner's tokens stay valid"


async def test_revoke_one_and_revoke_by_identifier(server: Running) -> None:
    a = await start(server)
    b = await start(server)
    other = await start(server, {**DATA, "userId": "u-2"})
    listed = await server.client.session.list_active(product="shop", env="dev", tag="user")
    assert [s.session_id for s in listed.sessions] == [other.session_id, b.session_id, a.session_id]
    assert await server.client.session.revoke(product="shop", env="dev", tag="user", session_id=a.session_id) == 1
    with pytest.raises(UnauthenticatedError) as caught:
        await server.client.session.verify(product="shop", env="dev", tag="user", token=a.token)
    assert caught.value.reason == "SESSION_REVOKED"
    assert (await server.client.session.verify(product="shop", env="dev", tag="user", token=b.token)).identifier
    assert await server.client.session.revoke(product="shop", env="dev", tag="user", identifier="u-1") == 1
    with pytest.raises(UnauthenticatedError):
        await server.client.session.verify(product="shop", env="dev", tag="user", token=b.token)
    mine = await server.client.session.list_active(product="shop", env="dev", tag="user", identifier="u-1")
    assert list(mine.sessions) == []
    everyone = await server.client.session.list_active(product="shop", env="dev", tag="user", page_size=1)
    assert [s.identifier for s in everyone.sessions] == ["u-2"] and not everyone.next_page_token


async def test_list_active_pages(server: Running) -> None:
    started = [await start(server, {**DATA, "userId": f"u-{n}"}) for n in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await server.client.session.list_active(
            product="shop", env="dev", tag="user", page_size=2, page_token=token
        )
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [p.session_id for p in reversed(started)]
    with pytest.raises(InvalidArgumentError):
        await server.client.session.list_active(product="shop", env="dev", tag="user", page_token="junk")


async def test_key_rotation_keeps_old_tokens_valid(managed: Any, tmp_path: Path) -> None:
    _, clock, registry, store = managed
    k1, k2 = new_root_key("k1"), new_root_key("k2")

    def manager(*specs: str) -> SessionManager:
        return SessionManager(registry, store, SessionKeys.load(list(specs), tmp_path)[0], clock=clock)

    old = await manager(k1).start("shop", "dev", "user", DATA)
    rotated = manager(k2, k1)
    assert (await rotated.verify("shop", "dev", "user", old.token)).session_id == old.session_id
    new = await rotated.start("shop", "dev", "user", DATA)
    assert new.token.split(".")[1] == "k2" and old.token.split(".")[1] == "k1"
    with pytest.raises(Unauthenticated) as caught:
        await manager(k2).verify("shop", "dev", "user", old.token)
    assert caught.value.reason == "SESSION_INVALID", "a retired key's tokens stop opening"


async def test_a_revoke_is_seen_by_another_replica_within_the_poll(start_server: ServerFactory, pg_schema: str) -> None:
    keys = [new_root_key("k1")]
    a = await start_server(
        store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=keys, session_revocation_poll_s=0.2
    )
    b = await start_server(
        store=PostgresStore(POSTGRES_DSN, pg_schema), session_keys=keys, session_revocation_poll_s=0.2
    )
    await a.client.product.apply(product())
    pair = await start(a)
    assert (await b.client.session.verify(product="shop", env="dev", tag="user", token=pair.token)).identifier
    await a.client.session.revoke(product="shop", env="dev", tag="user", session_id=pair.session_id)
    await asyncio.sleep(0.6)
    with pytest.raises(UnauthenticatedError) as caught:
        await b.client.session.verify(product="shop", env="dev", tag="user", token=pair.token)
    assert caught.value.reason == "SESSION_REVOKED"


async def test_session_values_reach_the_upstream_and_never_the_logs(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    running = await start_server(session_keys=[new_root_key("k1")], execution_flush_s=0.05)
    await running.client.product.apply(product(upstream.url))
    upstream.on("GET /profile", lambda r: json_answer({"user": r.headers["X-User"], "theme": r.headers["X-Theme"]}))
    stream = io.StringIO()
    handler = configure_logging("DEBUG", "json", stream)
    try:
        pair = await start(running)
        other = await start(running, {**DATA, "userId": "u-2", "prefs": {"theme": "light"}})
        call = {"product": "shop", "env": "dev", "app": "api", "event": "profile", "cache": "short"}
        mine = await running.client.action.run(**call, session={"tag": "user", "token": pair.token})
        theirs = await running.client.action.run(**call, session=("user", other.token))
        assert mine.body == {"user": "u-1", "theme": "dark"}
        assert theirs.body == {"user": "u-2", "theme": "light"} and not theirs.cached, "a cache entry is per session"
        with pytest.raises(InvalidArgumentError) as caught:
            await running.client.action.run(product="shop", env="dev", app="api", event="profile")
        assert caught.value.reason == "TEMPLATE_UNRESOLVED" and "$Session{userId}" in caught.value.message
        with pytest.raises(UnauthenticatedError) as bad:
            await running.client.action.run(**call, session={"tag": "user", "token": pair.token[:-2] + "xx"})
        assert bad.value.reason == "SESSION_INVALID"
    finally:
        logging.getLogger().removeHandler(handler)
    records = await running.client.logs.list_executions(product="shop")
    assert "X-User: [redacted]" in records.executions[-1].detail
    text = stream.getvalue() + str(records)
    for secret in (pair.token, pair.refresh_token, other.token, "ada@example.com", "u-2"):
        assert secret not in text


async def test_an_exposed_bind_needs_session_keys_even_when_insecure(tmp_path: Path) -> None:
    app = ProcessorApp(Settings(address="0.0.0.0:0", data_dir=tmp_path, insecure=True))
    with pytest.raises(StartupError, match="no session keys"):
        await app.start()


async def test_a_generated_key_survives_a_restart(tmp_path: Path) -> None:
    settings = Settings(address="127.0.0.1:0", data_dir=tmp_path)
    first = ProcessorApp(settings)
    await first.start()
    await first.components.registry.apply(product(), ManifestFormat.JSON)
    pair = await first.components.sessions.start("shop", "dev", "user", DATA)
    await first.stop(grace=0)
    assert oct((tmp_path / "session-keys").stat().st_mode & 0o777) == "0o600"
    second = ProcessorApp(settings)
    await second.start()
    try:
        assert (await second.components.sessions.verify("shop", "dev", "user", pair.token)).identifier == "u-1"
    finally:
        await second.stop(grace=0)


async def test_refresh_conflict_is_aborted(managed: Any) -> None:
    manager, _, _, _ = managed
    pair = await manager.start("shop", "dev", "user", DATA)
    await manager.refresh("shop", "dev", "user", pair.refresh_token)
    with pytest.raises(RefreshConflict):
        await manager.refresh("shop", "dev", "user", pair.refresh_token)
