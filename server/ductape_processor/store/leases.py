"""Claims of due rows, written once: the statements that take due rows for one replica, in the two forms a claim
takes.

Both pick the first due rows with one SELECT that PostgreSQL locks with `FOR UPDATE ... SKIP LOCKED`
(`Dialect.skip_locked`: replicas claim different rows and none waits for another); SQLite runs one writer at a time.

- `claim_statement`, a claim under a lease, for work that outlives the claim's transaction (a delivery's attempt, a
  job's run): one UPDATE gives the rows to their claimer (an owner and a lease's end); a claimer that dies leaves a
  lease that runs out, and the WHERE of the next claim takes the row again. Used by jobs' runs
  (store/job_statements.py), webhook deliveries and received webhooks' dispatches (store/webhooks.py,
  webhook_statements.py).
- `hold_statement`, a claim held by its transaction, for work done inside it (stepping a job past its due
  occurrence): the rows stay locked until the transaction ends, and a claimer that dies ends it (its connection
  closes), which frees them at once. No lease is written. Used by jobs' due occurrences (store/job_statements.py).
"""

from __future__ import annotations

from ductape_processor.store.statements import Dialect, Statement


def _due_rows(dialect: Dialect, table: str, columns: str, due: str, order: str, source: str) -> str:
    """The first rows of `table` (aliased `claimed`, joined with `source`) that are `due`, by `order`, at most a
    limit (the last parameter), locked against the other replicas' claims."""
    return (
        f"SELECT {columns} FROM {table} claimed {source} WHERE {due} ORDER BY {order} LIMIT ?"  # noqa: S608
        f"{dialect.skip_locked}"
    )


def claim_statement(
    dialect: Dialect, table: str, key: str, assign: str, due: str, order: str, returning: str, source: str = ""
) -> Statement:
    """`UPDATE table SET assign WHERE key IN (the due rows) RETURNING returning`. Parameters: those of `assign`, then
    those of `due`, then the limit. Every part is a fixed fragment of the store's; values are bound parameters."""
    rows = _due_rows(dialect, table, f"claimed.{key}", due, order, source)
    return Statement(f"UPDATE {table} SET {assign} WHERE {key} IN ({rows}) RETURNING {returning}")  # noqa: S608


def hold_statement(dialect: Dialect, table: str, columns: str, due: str, order: str, source: str = "") -> Statement:
    """`SELECT columns` of the due rows, which stay locked until the transaction that runs it ends (on SQLite, its
    write transaction holds the whole file). Parameters: those of `due`, then the limit."""
    return Statement(_due_rows(dialect, table, columns, due, order, source))
