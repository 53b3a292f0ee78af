"""One adapter (a pool of connections) per (product, environment, database), opened lazily.

The adapter of a database environment is keyed by its settings with secrets resolved: when a newer manifest version
changes the DSN (or the pool size, the timeout), the next call opens a new adapter and the old one is closed in the
background once its connections come back. Everything is closed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ductape_processor.adapters.databases.base import DatabaseAdapter, Place
from ductape_processor.adapters.databases.registry import DATABASE_TYPES
from ductape_processor.errors import FailedPrecondition
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.databases import Database
from ductape_processor.runtime.registry.registry import Resolved

log = logging.getLogger(__name__)

ADAPTERS_BY_VERSION = 1024
"""Product versions whose database environments map straight to their adapter (no settings rebuilt per call)."""

_Key = tuple[str, str, str]  # product, environment slug, database tag


class DatabasePools:
    """The adapters of every database environment in use."""

    def __init__(self, secrets: SecretSource, data_dir: Path) -> None:
        self._secrets = secrets
        self._folder = data_dir / "databases"
        self._current: dict[_Key, tuple[str, DatabaseAdapter]] = {}
        self._by_version: BoundedCache[tuple[str, int, str, str], DatabaseAdapter] = BoundedCache(ADAPTERS_BY_VERSION)
        self._opening: dict[_Key, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def _settings(self, database: Database, slug: str) -> dict[str, Any]:
        """The environment's settings as JSON, secrets resolved: what its adapter is built from and keyed by."""
        config = database.envs[slug].model_dump(mode="json")

        def missing(name: str) -> FailedPrecondition:
            return FailedPrecondition(
                f"database {database.tag!r}: secret {name} is not defined on this processor",
                reason=Reason.SECRET_NOT_FOUND,
                metadata={"database": database.tag, "secret": name},
            )

        return {
            key: self._secrets.resolve(value, missing) if isinstance(value, str) else value
            for key, value in config.items()
        }

    async def adapter(self, resolved: Resolved, database: Database) -> DatabaseAdapter:
        """The (lazily opened, shared) adapter of `database` in the resolved environment."""
        known = (resolved.product, resolved.version, resolved.env.slug, database.tag)
        key = (resolved.product, resolved.env.slug, database.tag)
        adapter = self._by_version.get(known)
        current = self._current.get(key)
        if adapter is not None and current is not None and current[1] is adapter:
            return adapter
        adapter = await self._open(resolved, database, key)
        self._by_version.put(known, adapter)
        return adapter

    async def _open(self, resolved: Resolved, database: Database, key: _Key) -> DatabaseAdapter:
        slug = resolved.env.slug
        settings = self._settings(database, slug)
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        current = self._current.get(key)
        if current is not None and current[0] == fingerprint:
            return current[1]
        async with self._opening.setdefault(key, asyncio.Lock()):
            current = self._current.get(key)
            if current is not None and current[0] == fingerprint:
                return current[1]
            env = database.envs[slug]
            typed = env.model_copy(update={"url": settings["url"]}) if "url" in settings else env  # secrets resolved
            place = Place(f"{resolved.product}/{slug}/{database.tag}", self._folder / resolved.product, database.tag)
            adapter = DATABASE_TYPES[typed.type].open(typed, place)
            self._current[key] = (fingerprint, adapter)
            if current is not None:
                log.info("database settings changed: closing the old pool", extra={"database": place.name})
                self._retire(current[1])
            return adapter

    def _retire(self, adapter: DatabaseAdapter) -> None:
        task = asyncio.get_running_loop().create_task(adapter.close(), name="database-pool-close")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Close every adapter (at shutdown)."""
        adapters = [adapter for _, adapter in self._current.values()]
        self._current.clear()
        self._by_version.clear()
        for adapter in adapters:
            with contextlib.suppress(Exception):
                await adapter.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
