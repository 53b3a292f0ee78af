"""The manifest's `databases` section: each database's connection per environment, its actions and its migrations.

A database environment names its system by `type`; each type has its own settings model, so a manifest naming a type
is validated at apply time (the adapter registry, `adapters/databases/registry.py`, maps the same type names to
factories). Queries are checked (placeholders, quoting, one statement) when the manifest's plan is compiled
(`runtime/databases/plan.py`), with the rest of the apply-time problems.
"""

from __future__ import annotations

import posixpath
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, JsonValue, field_validator, model_validator

from ductape_processor.runtime.registry.durations import PositiveDuration
from ductape_processor.runtime.registry.fields import ManifestModel, NamedResource, Schema, Tag

ActionType = Literal["read", "count", "create", "update", "delete", "aggregate", "execute"]
READ_TYPES = frozenset({"read", "count", "aggregate"})
"""Action types that only read: they may be cached, paged (read, aggregate) and retried after a broken connection."""
MAX_QUERY_CHARS = 65_536


class DatabasePool(ManifestModel):
    """How many connections one processor keeps to one database environment."""

    min: int = Field(0, ge=0, le=100, description="Connections opened with the pool and kept while idle.")
    max: int = Field(10, ge=1, le=1000, description="Most connections at once; further calls wait for one.")

    @model_validator(mode="after")
    def _bounds(self) -> DatabasePool:
        if self.min > self.max:
            raise ValueError("min is greater than max")
        return self


def _dsn(value: str, schemes: tuple[str, ...]) -> str:
    if value.startswith("$Secret{") and value.endswith("}"):
        return value
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        # Only the scheme is quoted: the rest of a DSN may hold a password.
        raise ValueError(f"a URL of scheme {parts.scheme or '(none)'!r} is not one of {allowed} (or $Secret{{NAME}})")
    return value


class _ServerEnv(ManifestModel):
    schemes: ClassVar[tuple[str, ...]]
    """The URL schemes of the system's DSNs."""
    url: str = Field(description="The DSN; may be `$Secret{NAME}` or contain one (a password, usually).")
    pool: DatabasePool = Field(default_factory=DatabasePool)
    statement_timeout: PositiveDuration = Field(
        timedelta(seconds=30), description="Longest one statement may run; the caller's deadline may cut it shorter."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _dsn(value, cls.schemes)


class PostgresDatabaseEnv(_ServerEnv):
    """PostgreSQL through asyncpg."""

    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")
    type: Literal["postgresql"]


class MysqlDatabaseEnv(_ServerEnv):
    """MySQL or MariaDB through asyncmy."""

    schemes: ClassVar[tuple[str, ...]] = ("mysql", "mariadb")
    type: Literal["mysql"]


class SqliteDatabaseEnv(ManifestModel):
    """An SQLite file under the processor's data directory (`<data dir>/databases/<product>/<path>`)."""

    type: Literal["sqlite"]
    path: str = Field(
        "",
        max_length=255,
        description="A relative path inside the product's database folder; default `<database tag>.<env>.db`.",
    )
    pool: DatabasePool = Field(default_factory=lambda: DatabasePool(min=0, max=4))
    statement_timeout: PositiveDuration = Field(timedelta(seconds=30))

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value:
            return value
        if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":"):
            raise ValueError("must be a relative path: a database lives under the processor's data directory")
        if "\\" in value or "\x00" in value or value.startswith("file:"):
            raise ValueError("must be a plain relative path with '/' separators")
        if ".." in value.split("/") or posixpath.normpath(value).startswith(".."):
            raise ValueError("must not contain '..': a database cannot leave the product's database folder")
        return value


def _refuse_unsupported(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "mongodb":
        raise ValueError(
            "type mongodb is not supported yet: it is out of scope until a MongoDB server is at hand to test against "
            "(use postgresql, mysql or sqlite)"
        )
    return value


DatabaseEnv = Annotated[
    PostgresDatabaseEnv | MysqlDatabaseEnv | SqliteDatabaseEnv,
    Field(discriminator="type"),
    BeforeValidator(_refuse_unsupported),
]


class DatabaseActionInput(ManifestModel):
    """The input contract of a database action: the row's values (`data`) and what selects rows (`filter`)."""

    data: Schema = Field(default_factory=dict)
    filter: Schema = Field(default_factory=dict)


class DatabaseAction(ManifestModel):
    """One query of a database, with its named placeholders bound from templates."""

    tag: Tag
    description: str = ""
    type: ActionType
    query: str = Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="One SQL statement; `:name` and `{{name}}` placeholders are bound as parameters, never spliced.",
    )
    params: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")], JsonValue] = Field(
        default_factory=dict, description="Placeholder name -> template (`$Input{filter}{id}`, `$Session{userId}`)."
    )
    input: DatabaseActionInput = Field(default_factory=DatabaseActionInput)
    single: bool = Field(False, description="Return one row or none (read, aggregate).")


class Migration(ManifestModel):
    """A change of a database's schema: statements to apply it and to revert it, run in the order listed."""

    tag: Tag
    up: list[Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]] = Field(min_length=1)
    down: list[Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]] = Field(default_factory=list)


class Database(NamedResource):
    """A database: where it is in each environment, its actions and its migrations."""

    envs: dict[str, DatabaseEnv] = Field(description="Per product environment slug: type and connection.")
    actions: list[DatabaseAction] = Field(default_factory=list)
    migrations: list[Migration] = Field(default_factory=list)
