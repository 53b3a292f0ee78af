"""Claims under leases, written once: the statement that takes due rows for one replica.

A claim is one UPDATE of the rows an inner SELECT picks: PostgreSQL locks them with `FOR UPDATE ... SKIP LOCKED`
(`Dialect.skip_locked`: replicas claim different rows and none waits for another), SQLite runs one writer at a time.
The SET gives the rows to their claimer (an owner and a lease's end); a claimer that dies leaves a lease that runs
out, and the WHERE of the next claim takes the row again. Used by jobs (their due occurrences and runs,
store/job_statements.py), webhook deliveries and received webhooks' dispatches (store/webhooks.py,
webhook_statements.py).
"""

from __future__ import annotations

from ductape_processor.store.statements import Dialect, Statement


def claim_statement(
    dialect: Dialect, table: str, key: str, assign: str, due: str, order: str, returning: str, source: str = ""
) -> Statement:
    """`UPDATE table SET assign WHERE key IN (the first rows of `table` (aliased `claimed`, joined with `source`)
    that are `due`, by `order`, at most a limit) RETURNING returning`. Parameters: those of `assign`, then those
    of `due`, then the limit. Every part is a fixed fragment of the store's; values are bound parameters."""
    return Statement(
        f"UPDATE {table} SET {assign} WHERE {key} IN ("  # noqa: S608 - fixed fragments
        f"SELECT claimed.{key} FROM {table} claimed {source} WHERE {due} ORDER BY {order} LIMIT ?"
        f"{dialect.skip_locked}) RETURNING {returning}"
    )
