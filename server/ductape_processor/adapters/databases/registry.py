"""The database types a manifest may name: type name -> typed settings model + factory.

Adding a database system is one module (an adapter implementing `base.DatabaseAdapter`) and one entry in
`DATABASE_TYPES`. A factory imports its module when first called, so a processor loads only the drivers its
manifests use (`make run` with an SQLite database never imports asyncmy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ductape_processor.adapters.databases.base import DatabaseAdapter, Place
from ductape_processor.runtime.registry.databases import MysqlDatabaseEnv, PostgresDatabaseEnv, SqliteDatabaseEnv

SettingsT = TypeVar("SettingsT")


@dataclass(frozen=True, slots=True)
class DatabaseType(Generic[SettingsT]):
    """One database system: the manifest model of its environment settings and what builds its adapter."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, Place], DatabaseAdapter]
    """(settings with secrets resolved, where it lives) -> an adapter; it connects on first use."""

    def open(self, settings: Any, place: Place) -> DatabaseAdapter:
        """The adapter of one database environment; `settings` must be an instance of `self.settings`."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__} settings, got {type(settings).__name__}")
        return self.factory(settings, place)


def _postgresql(settings: PostgresDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.postgres import PostgresDatabase

    return PostgresDatabase(settings, place)


def _mysql(settings: MysqlDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.mysql import MysqlDatabase

    return MysqlDatabase(settings, place)


def _sqlite(settings: SqliteDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.sqlite import SqliteDatabase

    return SqliteDatabase(settings, place)


DATABASE_TYPES: dict[str, DatabaseType[Any]] = {
    "postgresql": DatabaseType(PostgresDatabaseEnv, _postgresql),
    "mysql": DatabaseType(MysqlDatabaseEnv, _mysql),
    "sqlite": DatabaseType(SqliteDatabaseEnv, _sqlite),
}
