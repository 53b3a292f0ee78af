"""One adapter (a pool of connections) per (product, environment, database), through the one policy every resource
kind uses for its adapters (`runtime/policies/environments.py`): opened on first use from the environment's settings
with secrets resolved, replaced (and the old pool closed once its connections come back) when a newer manifest
version changes the settings, all closed at shutdown. An SQLite database's file lives in the product's folder under
`<data dir>/databases/`.
"""

from __future__ import annotations

from pathlib import Path

from ductape_processor.adapters.databases.base import DatabaseAdapter, Place
from ductape_processor.adapters.databases.registry import DATABASE_TYPES
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.environments import EnvironmentAdapters, EnvironmentRef
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.databases import Database
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.registry import Resolved


def named_database(resolved: Resolved, tag: str) -> Database:
    """The database a call names by its tag; DATABASE_NOT_FOUND when the product has none by that tag."""
    return named(resolved.product, resolved.manifest.databases, "database", tag, Reason.DATABASE_NOT_FOUND)


class DatabasePools:
    """The adapters of every database environment in use."""

    def __init__(self, secrets: SecretSource, data_dir: Path) -> None:
        self._folder = data_dir / "databases"
        self._adapters: EnvironmentAdapters[DatabaseAdapter] = EnvironmentAdapters("database", secrets)

    def adapter(self, resolved: Resolved, database: Database) -> DatabaseAdapter:
        """The (lazily opened, shared) adapter of `database` in the resolved environment."""
        ref = EnvironmentRef(resolved.product, resolved.version, resolved.env.slug, database.tag)
        place = Place(ref.name, self._folder / resolved.product, database.tag, ref.env)
        return self._adapters.get(
            ref, database.envs[ref.env], lambda settings: DATABASE_TYPES[settings.type].open(settings, place)
        )

    async def close(self) -> None:
        """Close every adapter (at shutdown)."""
        await self._adapters.close()
