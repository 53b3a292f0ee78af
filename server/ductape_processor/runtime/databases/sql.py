"""Compiling a manifest's SQL: named placeholders (`:email`) and Ductape's `{{email}}` become the driver's bound
parameters, once, at apply time. Values are never spliced into the text.

The scanner knows each dialect's quoting (string literals, quoted identifiers, comments, PostgreSQL's dollar quotes
and `::` casts), so a `:name` inside a string literal stays text (`'12:30'`), while a `{{name}}` inside one is a
problem: a manifest ported from Ductape that quoted a placeholder (`'{{email}}'`) would otherwise silently compare
with the text `{{email}}`, and splicing it in would be an injection. One statement per query: a `;` followed by more
SQL is refused (a batch or a migration holds several).

It must read quoting exactly as the database does: MySQL's driver splices each escaped value into the text where a
`%s` stands, so a `%s` that the server reads as inside a literal would let the value's text close that literal and
run as SQL. Hence MySQL's rules are followed to the letter (`--` is a comment only before a blank, `"` quotes a string
with backslash escapes, `/*! … */` runs as SQL and is refused), as are PostgreSQL's nested comments and SQLite's
`[name]` and `` `name` ``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

Dialect = Literal["postgresql", "mysql", "sqlite"]
NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DOUBLE_BRACES: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]{0,62})\s*\}\}")
_WORD: Final = re.compile(r"[A-Za-z_]+")
ROW_KEYWORDS: Final = frozenset({"select", "with", "values", "show", "explain", "table", "pragma", "describe", "desc"})
"""A statement starting with one of these returns rows."""
SELECT_KEYWORDS: Final = frozenset({"select", "with", "values", "table"})
"""A statement starting with one of these can be wrapped as a subquery (paging, counting, bounding)."""


class SqlProblem(ValueError):
    """A query the processor will not run, with why (reported with its path in the manifest)."""


@dataclass(frozen=True, slots=True)
class CompiledSql:
    """A query for one dialect: its text with the driver's placeholders, and the name bound at each."""

    text: str
    names: tuple[str, ...]
    """The parameter bound at each placeholder, in order (PostgreSQL: once per distinct name, as `$1`, `$2`...)."""
    placeholders: frozenset[str]
    """Every name the query uses."""
    braced: frozenset[str]
    """Names written `{{name}}` (Ductape's form): their value defaults to the input's field of that name."""
    first_keyword: str
    returning: bool

    @property
    def returns_rows(self) -> bool:
        """Whether the statement answers rows (a SELECT, or a write with RETURNING)."""
        return self.returning or self.first_keyword in ROW_KEYWORDS

    @property
    def selects(self) -> bool:
        """Whether the statement can be wrapped as `SELECT … FROM (<it>)`."""
        return self.first_keyword in SELECT_KEYWORDS


def _line_comment(sql: str, i: int, dialect: Dialect) -> bool:
    """Whether a comment to the end of the line starts at `i`. MySQL reads `--` as one only when a blank or a control
    character (or the end) follows: `1--2` is arithmetic, and `1--'` starts a string."""
    if dialect == "mysql":
        if sql[i] == "#":
            return True
        return sql.startswith("--", i) and (i + 2 >= len(sql) or sql[i + 2] <= " ")
    return sql.startswith("--", i)


def _end_of_comment(sql: str, start: int, *, nested: bool) -> int:
    """The index after the `*/` closing the block comment opened at `start` (PostgreSQL's nest)."""
    depth = 0
    i = start
    while i < len(sql):
        if sql.startswith("/*", i):
            depth = depth + 1 if nested or depth == 0 else depth
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise SqlProblem(f"a comment opened at character {start} is not closed")


def _escape_string_prefix(sql: str, i: int) -> bool:
    """Whether the quote at `i` opens a PostgreSQL escape string (`E'…'`), where backslashes escape."""
    return i > 0 and sql[i - 1] in "eE" and not (i > 1 and (sql[i - 2].isalnum() or sql[i - 2] in "_$"))


def _quoted(text: str, where: str) -> str:
    """`text`, a literal, a quoted name or a dollar-quoted string, if it holds no `{{name}}`: there it would be text,
    never a parameter."""
    found = _DOUBLE_BRACES.search(text)
    if found is not None:
        raise SqlProblem(
            f"{{{{{found.group(1)}}}}} is inside {where}, where it would be text, not a parameter: remove the quotes "
            "around it (it is bound as a parameter, so it needs none)"
        )
    return text


def _end_of_quote(sql: str, start: int, quote: str, backslash: bool, what: str) -> int:
    """The index after the closing `quote` of a literal opened at `start`; doubled quotes escape it."""
    i = start + 1
    while i < len(sql):
        char = sql[i]
        if backslash and char == "\\":
            i += 2
            continue
        if char == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    raise SqlProblem(f"a quoted {what} opened at character {start} is not closed")


_DOLLAR_TAG: Final = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def compile_sql(sql: str, dialect: Dialect) -> CompiledSql:
    """Compile `sql` for `dialect`; SqlProblem says what is wrong."""
    out: list[str] = []
    names: list[str] = []
    numbers: dict[str, int] = {}
    used: set[str] = set()
    braced: set[str] = set()
    words: list[str] = []
    ended = False  # a ';' was seen: only blanks and comments may follow
    depth = 0  # parentheses open: a query closing more than it opens could close the subquery a read is wrapped in
    i = 0
    n = len(sql)

    def placeholder(name: str) -> str:
        used.add(name)
        if dialect == "postgresql":
            if name not in numbers:
                numbers[name] = len(numbers) + 1
                names.append(name)
            return f"${numbers[name]}"
        names.append(name)
        return "%s" if dialect == "mysql" else "?"

    def literal(text: str) -> None:
        # asyncmy formats the query with `%` when parameters are given: a literal % must be doubled.
        out.append(text.replace("%", "%%") if dialect == "mysql" else text)

    while i < n:
        char = sql[i]
        rest2 = sql[i : i + 2]
        if char in " \t\r\n":
            out.append(char)
            i += 1
            continue
        if _line_comment(sql, i, dialect):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            literal(sql[i:end])
            i = end
            continue
        if rest2 == "/*":
            if dialect == "mysql" and sql.startswith(("/*!", "/*M!"), i):
                raise SqlProblem(
                    f"holds an executable comment (/*! … */) at character {i}: MySQL runs its text as SQL; write it "
                    "as SQL"
                )
            end = _end_of_comment(sql, i, nested=dialect == "postgresql")
            literal(sql[i:end])
            i = end
            continue
        if ended:
            raise SqlProblem("holds more than one statement: a query is one statement (a batch runs several)")
        if char == ";":
            ended = True
            i += 1
            continue
        if char == "'" or (char == '"' and dialect == "mysql"):
            backslash = dialect == "mysql" or (dialect == "postgresql" and _escape_string_prefix(sql, i))
            end = _end_of_quote(sql, i, char, backslash, "string")
            literal(_quoted(sql[i:end], "a quoted SQL string"))
            i = end
            continue
        if char == '"' or (char == "`" and dialect in ("mysql", "sqlite")):
            end = _end_of_quote(sql, i, char, False, "identifier")
            literal(_quoted(sql[i:end], "a quoted name"))
            i = end
            continue
        if char == "[" and dialect == "sqlite":
            end = sql.find("]", i + 1)
            if end < 0:
                raise SqlProblem(f"a quoted identifier opened at character {i} is not closed")
            literal(_quoted(sql[i : end + 1], "a quoted name"))
            i = end + 1
            continue
        if char == "$" and dialect == "postgresql":
            tag = _DOLLAR_TAG.match(sql, i)
            if tag is not None and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                end = sql.find(tag.group(0), tag.end())
                if end < 0:
                    raise SqlProblem(f"a dollar-quoted string opened at character {i} is not closed")
                literal(_quoted(sql[i : end + len(tag.group(0))], "a dollar-quoted string"))
                i = end + len(tag.group(0))
                continue
            if i + 1 < n and sql[i + 1].isdigit():
                raise SqlProblem("uses a positional parameter ($1): name it (:name) and give it in params")
        if char == "?" and dialect == "sqlite":
            raise SqlProblem("uses a positional parameter (?): name it (:name) and give it in params")
        if rest2 == "{{":
            match = _DOUBLE_BRACES.match(sql, i)
            if match is None:
                raise SqlProblem(f"'{{{{' at character {i} does not open a placeholder {{{{name}}}}")
            braced.add(match.group(1))
            out.append(placeholder(match.group(1)))
            i = match.end()
            continue
        if char == ":":
            if rest2 == "::":
                out.append("::")
                i += 2
                continue
            match = NAME.match(sql, i + 1)
            previous = sql[i - 1] if i else " "
            if match is not None and not (previous.isalnum() or previous == "_"):
                out.append(placeholder(match.group(0)))
                i = match.end()
                continue
        word = _WORD.match(sql, i)
        if word is not None and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")):
            words.append(word.group(0).lower())
            literal(word.group(0))
            i = word.end()
            continue
        if char in "()":
            depth += 1 if char == "(" else -1
            if depth < 0:
                raise SqlProblem(f"closes a parenthesis at character {i} that it did not open")
        literal(char)
        i += 1
    if depth:
        raise SqlProblem("leaves a parenthesis open")
    if not words:
        raise SqlProblem("holds no SQL statement")
    if dialect == "mysql" and words[0] == "set" and "sql_mode" in words:
        raise SqlProblem(
            "changes sql_mode, which decides how MySQL reads quotes: the processor's quoting needs the default"
        )
    return CompiledSql(
        text="".join(out).strip(),
        names=tuple(names),
        placeholders=frozenset(used),
        braced=frozenset(braced),
        first_keyword=words[0],
        returning="returning" in words,
    )


def wrap_select(compiled: CompiledSql, dialect: Dialect, head: str, tail_params: int) -> str:
    """`SELECT <head> FROM (<the query>) AS _ductape <tail>`: the query as a subquery, with `tail_params` more
    placeholders after it (a LIMIT and an OFFSET), numbered after the query's own."""
    # Only the processor's own text and the manifest's compiled query: no value is ever spliced in.
    # The newline ends a line comment the query may end with, which would otherwise swallow the closing parenthesis
    # and the bound after it.
    text = f"SELECT {head} FROM ({compiled.text}\n) AS _ductape"  # noqa: S608
    if tail_params:
        if dialect == "postgresql":
            first = len(compiled.names) + 1
            marks = [f"${first + k}" for k in range(tail_params)]
        else:
            marks = ["%s" if dialect == "mysql" else "?"] * tail_params
        text += " LIMIT " + marks[0] + ("" if tail_params == 1 else " OFFSET " + marks[1])
    return text
