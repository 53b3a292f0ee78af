"""From a caller's input to the statement an adapter runs: the input checked against the action's contract, each
parameter rendered from its template (or, for a `{{name}}`, read from the input), the query wrapped to bound, page
or count it. Values only ever travel as bound parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ductape_processor.adapters.databases.base import Bounds, Outcome, Statement
from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.contract import check_input
from ductape_processor.runtime.databases.plan import DatabaseActionPlan
from ductape_processor.runtime.databases.sql import Dialect, wrap_select
from ductape_processor.runtime.databases.values import ResultBudget, rows_to_json
from ductape_processor.runtime.templates import Scope

INPUT_PARTS: Final = ("data", "filter")


@dataclass(frozen=True, slots=True)
class Page:
    """Which rows of a read to return: `limit` rows after skipping `offset` (None: every row, up to the bound)."""

    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one action answered, as the caller sees it."""

    rows: list[dict[str, Any]]
    affected_rows: int = 0
    count: int | None = None
    last_insert_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The form `$Sequence{batch}{step}…` reads and the idempotency record keeps."""
        return {
            "rows": self.rows,
            "affected_rows": self.affected_rows,
            "count": self.count,
            "last_insert_id": self.last_insert_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepResult:
        """The inverse of `as_json`."""
        return cls(data["rows"], data["affected_rows"], data["count"], data["last_insert_id"])


def check_database_input(plan: DatabaseActionPlan, given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """The input's `data` and `filter` checked against the action's contract; one InvalidArgument lists every bad
    field (`input.filter.id`)."""
    given = given or {}
    unknown = [part for part in given if part not in INPUT_PARTS]
    if unknown:
        raise InvalidArgument(
            f"{where}.{unknown[0]}: is not a part of a database action's input (data, filter)",
            reason=Reason.INVALID_INPUT,
            violations=[FieldViolation(f"{where}.{part}", "is not data or filter") for part in unknown],
        )
    contract = plan.action.input
    violations: list[FieldViolation] = []
    checked: dict[str, Any] = {}
    for part in INPUT_PARTS:
        try:
            checked[part] = check_input(getattr(contract, part), given.get(part), part, root=where)
        except InvalidArgument as exc:
            violations += exc.violations
    if violations:
        first = violations[0]
        raise InvalidArgument(
            f"invalid input: {first.field}: {first.description}", reason=Reason.INVALID_INPUT, violations=violations
        )
    return checked


def parameters(plan: DatabaseActionPlan, dialect: Dialect, checked: Mapping[str, Any], scope: Scope) -> list[Any]:
    """The values bound at the query's placeholders, in order. A `{{name}}` without a template reads the input's
    `filter.name`, else `data.name`; neither there is INVALID_INPUT."""
    compiled = plan.sql[dialect]
    values: dict[str, Any] = {}
    for name in dict.fromkeys(compiled.names):
        template = plan.params.get(name)
        if template is not None:
            values[name] = template.render(scope)
            continue
        for part in ("filter", "data"):
            if name in checked[part]:
                values[name] = checked[part][name]
                break
        else:
            raise InvalidArgument(
                f"invalid input: the query's {{{{{name}}}}} reads input.filter.{name} or input.data.{name}; neither "
                "was given",
                reason=Reason.INVALID_INPUT,
                violations=[FieldViolation(f"input.filter.{name}", "is required: the query reads it")],
            )
    return [values[name] for name in compiled.names]


def statement(
    plan: DatabaseActionPlan, dialect: Dialect, args: list[Any], page: Page, max_rows: int, bounds: Bounds
) -> Statement:
    """The statement to run: reads and aggregates bounded (`max_rows` + 1, to tell "more" from "exactly") or paged,
    counts wrapped in COUNT(*), the rest as written. The adapter stops fetching rows past `bounds`."""
    compiled = plan.sql[dialect]
    names = list(compiled.names)
    kind = plan.action.type
    if kind == "count":
        return Statement(wrap_select(compiled, dialect, "COUNT(*)", 0), args, True, names, bounds, limited=True)
    if kind in ("read", "aggregate"):
        if plan.action.single:
            limit, offset = 1, 0
        elif page.limit is not None:
            limit, offset = page.limit + 1, page.offset
        else:
            limit, offset = max_rows + 1, 0
        tail = [limit] if offset == 0 else [limit, offset]
        text = wrap_select(compiled, dialect, "*", len(tail))
        named = [*names, "limit", "offset"][: len(names) + len(tail)]
        return Statement(text, [*args, *tail], True, named, bounds, limited=True)
    return Statement(compiled.text, args, compiled.returns_rows, names, bounds)


def step_result(plan: DatabaseActionPlan, outcome: Outcome, budget: ResultBudget) -> StepResult:
    """The caller's form of an outcome; ResultTooLarge past the bounds."""
    if plan.action.type == "count":
        number = outcome.rows[0][0] if outcome.rows else 0
        return StepResult([], count=int(number))
    rows = rows_to_json(outcome.columns, outcome.rows, budget, plan.resource)
    affected = 0 if plan.reads_only else outcome.affected
    # Drivers keep the last id per connection: only an insert's own is meaningful.
    inserted = outcome.last_insert_id if plan.action.type == "create" else None
    return StepResult(rows, affected, None, inserted)
