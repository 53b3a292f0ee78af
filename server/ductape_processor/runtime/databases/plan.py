"""Database actions compiled for running, once per product version, while its manifest is validated.

For each action: its SQL compiled for every dialect its database's environments use (`sql.compile_sql`), and its
parameters' templates compiled. A placeholder without a parameter, a parameter without a placeholder, a `{{key}}`
inside a quoted string, several statements, or a read that is not a SELECT are apply-time problems, reported with
their path in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ductape_processor.runtime.databases.sql import CompiledSql, Dialect, SqlProblem, compile_sql
from ductape_processor.runtime.registry.databases import READ_TYPES, Database, DatabaseAction
from ductape_processor.runtime.registry.manifest import Manifest
from ductape_processor.runtime.templates import Template, TemplateError, compile_template

WRAPPED_TYPES = frozenset({"read", "count", "aggregate"})
"""Types whose query runs as a subquery: bounded and paged (read, aggregate) or counted (count)."""


@dataclass(frozen=True, slots=True)
class DatabaseActionPlan:
    """One database action, ready to bind and run."""

    database: Database
    action: DatabaseAction
    sql: Mapping[str, CompiledSql]
    """Dialect -> the compiled query."""
    params: Mapping[str, Template]
    """Placeholder name -> its template; a `{{name}}` without one reads the input's field of that name."""
    uses_session: bool

    @property
    def resource(self) -> str:
        """`database:action`, the way the execution log names it."""
        return f"{self.database.tag}:{self.action.tag}"

    @property
    def reads_only(self) -> bool:
        """Whether the action only reads (it may be cached and retried after a broken connection)."""
        return self.action.type in READ_TYPES


DatabasePlans = Mapping[tuple[str, str], DatabaseActionPlan]
"""(database tag, action tag) -> plan."""


def _dialects(database: Database) -> list[Dialect]:
    found: list[Dialect] = []
    for env in database.envs.values():
        if env.type not in found:
            found.append(env.type)
    return found


def _compile_action(
    database: Database, action: DatabaseAction, where: str, problems: list[tuple[str, str]]
) -> DatabaseActionPlan | None:
    compiled: dict[str, CompiledSql] = {}
    for dialect in _dialects(database):
        try:
            compiled[dialect] = compile_sql(action.query, dialect)
        except SqlProblem as exc:
            problems.append((f"{where}.query", f"{exc} ({dialect})"))
            return None
    if not compiled:
        return None
    sql = next(iter(compiled.values()))
    for name in sorted(sql.placeholders - set(action.params) - sql.braced):
        example = f"$Input{{filter}}{{{name}}}"
        problems.append((f"{where}.query", f":{name} has no value: add params.{name} (a template, e.g. {example})"))
    for name in sorted(set(action.params) - sql.placeholders):
        problems.append((f"{where}.params.{name}", f"the query has no placeholder :{name}"))
    if action.type in WRAPPED_TYPES and not sql.selects:
        problems.append((f"{where}.query", f"a {action.type} query is a SELECT (or WITH … SELECT); use type execute"))
    if action.single and action.type not in ("read", "aggregate"):
        problems.append((f"{where}.single", "applies to read and aggregate actions"))
    params: dict[str, Template] = {}
    for name, value in action.params.items():
        try:
            params[name] = compile_template(value, f"{where}.params.{name}")
        except TemplateError as exc:
            problems.append((exc.path, exc.reason))
    return DatabaseActionPlan(
        database=database,
        action=action,
        sql=compiled,
        params=params,
        uses_session=any("Session" in t.selectors for t in params.values()),
    )


def _migration_problems(database: Database, sql: str) -> list[str]:
    problems: list[str] = []
    for dialect in _dialects(database):
        try:
            compiled = compile_sql(sql, dialect)
        except SqlProblem as exc:
            problems.append(f"{exc} ({dialect})")
            break
        if compiled.placeholders:
            problems.append("a migration binds no parameters: write its values in the statement")
            break
    return problems


def compile_databases(manifest: Manifest) -> tuple[dict[tuple[str, str], DatabaseActionPlan], list[tuple[str, str]]]:
    """Every database action of a manifest compiled, and every problem found (path in the manifest, why)."""
    plans: dict[tuple[str, str], DatabaseActionPlan] = {}
    problems: list[tuple[str, str]] = []
    for d, database in enumerate(manifest.databases):
        for m, migration in enumerate(database.migrations):
            for direction in ("up", "down"):
                for s, sql in enumerate(getattr(migration, direction)):
                    where = f"databases[{d}].migrations[{m}].{direction}[{s}]"
                    problems.extend((where, why) for why in _migration_problems(database, sql))
        for a, action in enumerate(database.actions):
            before = len(problems)
            plan = _compile_action(database, action, f"databases[{d}].actions[{a}]", problems)
            if plan is not None and len(problems) == before:
                plans[(database.tag, action.tag)] = plan
    return plans, problems
