"""Session edges a mutation run showed no test would notice (docs/mutation.md): the exact instant a token expires,
one spelling per token, revocations another replica wrote with a slightly slower clock, the refresh race's grace
period, and how root keys are read."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ductape_processor.errors import InvalidArgument, Unauthenticated
from ductape_processor.runtime.registry.loader import ManifestFormat
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.sessions import SessionKeys, SessionManager, new_root_key, parse_root_key
from ductape_processor.runtime.sessions.manager import REFRESH_RACE_GRACE_S
from ductape_processor.store.sqlite import SqliteStore
from tests.test_sessions import DATA, Clock, product


class Replicas:
    """Managers sharing one store and one key ring, each with its own clock (replicas of one deployment)."""

    def __init__(self, registry: Registry, store: SqliteStore, keys: SessionKeys) -> None:
        self.registry, self.store, self.keys = registry, store, keys

    def manager(self, clock: Clock) -> SessionManager:
        return SessionManager(self.registry, self.store, self.keys, clock=clock)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    store = SqliteStore(tmp_path / "sessions.db")
    await store.open()
    registry = Registry(store)
    await registry.apply(product(), ManifestFormat.JSON)
    yield Replicas(registry, store, SessionKeys.load([new_root_key("k1")], tmp_path)[0])
    await store.close()


async def refused(manager: SessionManager, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await manager.verify("shop", "dev", "user", token)
    return str(caught.value.reason)


async def test_a_token_is_refused_at_the_exact_second_it_expires(replicas: Replicas) -> None:
    clock = Clock()
    manager = replicas.manager(clock)
    pair = await manager.start("shop", "dev", "user", DATA)
    assert (await manager.verify("shop", "dev", "user", pair.token)).identifier == "u-1"  # now remembered
    clock.now = pair.expires_at.timestamp()
    assert await refused(manager, pair.token) == "SESSION_EXPIRED", "the remembered token"
    assert await refused(replicas.manager(clock), pair.token) == "SESSION_EXPIRED", "a token opened afresh"


async def test_a_token_has_one_spelling(replicas: Replicas) -> None:
    manager = replicas.manager(Clock())
    pair = await manager.start("shop", "dev", "user", DATA)
    prefix, kid, body = pair.token.split(".")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    spellings = [f"{prefix}.{kid}.{body}" + "=" * (-len(body) % 4 or 4)]  # padded
    if len(raw) % 3:  # the last character carries unused bits: set them, the bytes stay the same
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(body[-1])
        spare = 0b1111 if len(raw) % 3 == 1 else 0b11
        spellings.append(f"{prefix}.{kid}.{body[:-1]}{alphabet[last | spare]}")
    for spelling in spellings:
        assert await refused(manager, spelling) == "SESSION_INVALID", spelling
    assert (await manager.verify("shop", "dev", "user", pair.token)).identifier == "u-1"


async def test_a_revocation_written_by_a_replica_with_a_slower_clock_is_seen(replicas: Replicas) -> None:
    fast, slow = Clock(), Clock()
    slow.now -= 3  # within the few seconds of skew the revocation window overlaps by
    watcher, ahead, behind = replicas.manager(fast), replicas.manager(fast), replicas.manager(slow)
    first = await ahead.start("shop", "dev", "user", DATA)
    second = await behind.start("shop", "dev", "user", DATA)
    await ahead.revoke("shop", "dev", "user", session_id=first.session_id, identifier=None)
    await watcher.start_watching()
    await watcher.stop_watching()
    assert await refused(watcher, first.token) == "SESSION_REVOKED"
    await behind.revoke("shop", "dev", "user", session_id=second.session_id, identifier=None)  # written "earlier"
    await watcher.start_watching()
    await watcher.stop_watching()
    assert await refused(watcher, second.token) == "SESSION_REVOKED"


async def test_reusing_a_refresh_token_exactly_at_the_end_of_the_grace_period_revokes(replicas: Replicas) -> None:
    clock = Clock()
    manager = replicas.manager(clock)
    first = await manager.start("shop", "dev", "user", DATA)
    await manager.refresh("shop", "dev", "user", first.refresh_token)
    clock.now += REFRESH_RACE_GRACE_S
    with pytest.raises(Unauthenticated) as caught:
        await manager.refresh("shop", "dev", "user", first.refresh_token)
    assert caught.value.reason == "SESSION_REVOKED"


KEY = base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (f"{'k' * 33}:{KEY}", "at most 32"),
        (f"k!:{KEY}", "letters, digits"),
        (f":{KEY}", "'id:key'"),
        ("k1", "'id:key'"),
        ("k1:clé", "not base64url"),
        ("k1:" + KEY[:-4], "must be 32 bytes"),
    ],
)
def test_a_malformed_root_key_is_refused_with_the_reason(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_root_key(spec)


def test_root_keys_read_and_whether_they_were_generated(tmp_path: Path) -> None:
    assert parse_root_key(f"{'k' * 32}:{KEY}") == ("k" * 32, bytes(32))
    assert parse_root_key(f"a-b_c:{KEY}")[0] == "a-b_c"
    configured: Any = SessionKeys.load([new_root_key("k1")], tmp_path)
    assert configured[0].current == "k1" and configured[1] is False
    generated: Any = SessionKeys.load([], tmp_path)
    assert generated[0].current == "local" and generated[1] is True
    assert SessionKeys.load([], tmp_path)[0].root_keys() == generated[0].root_keys(), "read back, not made again"


async def test_a_session_needs_a_non_empty_identifier(replicas: Replicas) -> None:
    manager = replicas.manager(Clock())
    with pytest.raises(InvalidArgument) as caught:
        await manager.start("shop", "dev", "user", {**DATA, "userId": ""})
    assert [v.field for v in caught.value.violations] == ["data.userId"]


async def test_a_page_token_of_one_users_sessions_does_not_page_anothers(replicas: Replicas) -> None:
    manager = replicas.manager(Clock())
    for _ in range(2):
        await manager.start("shop", "dev", "user", DATA)
    _, token = await manager.list_active("shop", "dev", "user", DATA["userId"], 1, "")
    assert token
    for other in ("someone-else", None):
        with pytest.raises(InvalidArgument) as caught:
            await manager.list_active("shop", "dev", "user", other, 1, token)
        assert [v.field for v in caught.value.violations] == ["page_token"], other
