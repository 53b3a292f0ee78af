"""runtime/policies/environments.py: one adapter per resource environment, shared, replaced when its settings change."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from ductape_processor.errors import FailedPrecondition
from ductape_processor.runtime.policies.environments import PER_ENVIRONMENT, EnvironmentAdapters, EnvironmentRef
from ductape_processor.runtime.policies.secrets import SecretSource


class Settings(BaseModel):
    url: str
    size: int = 1


class Adapter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def ref(version: int, tag: str = "db") -> EnvironmentRef:
    return EnvironmentRef("shop", version, "dev", tag)


@pytest.fixture
def adapters() -> EnvironmentAdapters[Adapter]:
    return EnvironmentAdapters[Adapter]("database", SecretSource({"PASSWORD": "hunter2"}, {}))


async def test_one_adapter_per_environment_and_settings_with_secrets_resolved(
    adapters: EnvironmentAdapters[Adapter],
) -> None:
    settings = Settings(url="postgres://u:$Secret{PASSWORD}@h/db")
    first = adapters.get(ref(1), settings, Adapter)
    assert first.settings.url == "postgres://u:hunter2@h/db"
    assert adapters.get(ref(1), settings, Adapter) is first
    assert adapters.get(ref(2), settings, Adapter) is first, "a new version with the same settings shares it"
    assert adapters.get(ref(2, "other"), settings, Adapter) is not first, "another resource has its own"


async def test_a_newer_version_with_other_settings_replaces_the_adapter_and_closes_the_old_one(
    adapters: EnvironmentAdapters[Adapter],
) -> None:
    old = adapters.get(ref(1), Settings(url="a"), Adapter)
    new = adapters.get(ref(2), Settings(url="b"), Adapter)
    assert new is not old
    await asyncio.sleep(0)  # closed in the background
    assert old.closed and not new.closed
    again = adapters.get(ref(1), Settings(url="a"), Adapter)  # a call naming the old version explicitly
    assert again is not old and not again.closed
    await asyncio.sleep(0)
    assert not new.closed, "a call of an older version never closes a newer version's adapter"


async def test_at_most_per_environment_adapters_stay_open(adapters: EnvironmentAdapters[Adapter]) -> None:
    opened = [adapters.get(ref(10 - n), Settings(url=str(n)), Adapter) for n in range(PER_ENVIRONMENT + 2)]
    await asyncio.sleep(0)
    assert [adapter.closed for adapter in opened] == [True, True] + [False] * PER_ENVIRONMENT


async def test_a_missing_secret_is_a_failed_precondition_naming_it(adapters: EnvironmentAdapters[Adapter]) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        adapters.get(ref(1), Settings(url="$Secret{NOPE}"), Adapter)
    assert caught.value.reason == "SECRET_NOT_FOUND"
    assert caught.value.metadata == {"database": "db", "secret": "NOPE"}


async def test_close_closes_every_adapter(adapters: EnvironmentAdapters[Adapter]) -> None:
    opened = [adapters.get(ref(1, tag), Settings(url="a"), Adapter) for tag in ("a", "b")]
    await adapters.close()
    assert all(adapter.closed for adapter in opened)
    reopened = adapters.get(ref(1, "a"), Settings(url="a"), Adapter)
    assert reopened is not opened[0] and not reopened.closed
