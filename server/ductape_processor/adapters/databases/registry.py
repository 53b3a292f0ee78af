"""The database types a manifest may name: type name -> typed settings model + factory (`adapters/registry.py`), the
place an adapter is opened with being where the database lives (`base.Place`).

Adding a database system is one module (an adapter implementing `base.DatabaseAdapter`) and one entry in
`DATABASE_TYPES`. Factories import their module on first use: `make run` with an SQLite database never imports
asyncmy.
"""

from __future__ import annotations

from typing import Any

from ductape_processor.adapters.databases.base import DatabaseAdapter, Place
from ductape_processor.adapters.registry import AdapterType
from ductape_processor.runtime.registry.databases import MysqlDatabaseEnv, PostgresDatabaseEnv, SqliteDatabaseEnv


def _postgresql(settings: PostgresDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.postgres import PostgresDatabase

    return PostgresDatabase(settings, place)


def _mysql(settings: MysqlDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.mysql import MysqlDatabase

    return MysqlDatabase(settings, place)


def _sqlite(settings: SqliteDatabaseEnv, place: Place) -> DatabaseAdapter:
    from ductape_processor.adapters.databases.sqlite import SqliteDatabase

    return SqliteDatabase(settings, place)


DATABASE_TYPES: dict[str, AdapterType[Any, Place, DatabaseAdapter]] = {
    "postgresql": AdapterType(PostgresDatabaseEnv, _postgresql),
    "mysql": AdapterType(MysqlDatabaseEnv, _mysql),
    "sqlite": AdapterType(SqliteDatabaseEnv, _sqlite),
}
