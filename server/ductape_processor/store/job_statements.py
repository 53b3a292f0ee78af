"""The store's SQL of jobs and their runs (store/jobs.py), written once for both back-ends, as statements.py is.

Due occurrences and runs are claimed with the statements every claim of due rows is built with (store/leases.py):
occurrences held by the transaction that steps them, runs under a lease while their target is called.
"""

from __future__ import annotations

import functools
from typing import Final

from ductape_processor.store.leases import claim_statement, hold_statement
from ductape_processor.store.statements import Dialect, Statement, insert, marks

JOB_COLUMNS: Final = (
    "job_id, product, env, name, target_kind, spec, status, next_run_at, runs, declared, idempotency_key, "
    "request_hash, created_at"
)
RUN_COLUMNS: Final = (
    "run_id, job_id, product, env, trigger, status, due_at, attempt_at, attempts, started_at, ended_at, owner, "
    "lease_until, reclaimed, result, error_reason, error_message, process_id"
)
_OPEN_COUNTS: Final = (
    # Counted on the open runs' index (job_runs_open: job_id, status), whatever number of runs a job has ended.
    "(SELECT count(*) FROM job_runs r WHERE r.job_id = claimed.job_id AND r.status IN (2, 3)), "
    "(SELECT count(*) FROM job_runs r WHERE r.job_id = claimed.job_id AND r.status = 1)"
)
INSERT_JOB: Final = insert("jobs", JOB_COLUMNS)
INSERT_NEW_JOB: Final = Statement(
    # Any unique index in the way (the active name, the idempotency key) makes it insert nothing: store/jobs.py then
    # reads who holds it.
    f"{INSERT_JOB.qmark} ON CONFLICT DO NOTHING"
)
JOB: Final = Statement(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?")  # noqa: S608
ACTIVE_JOB: Final = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE product = ? AND env = ? AND name = ? AND status IN (1, 2)"  # noqa: S608
)
JOB_BY_KEY: Final = Statement(
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE product = ? AND env = ? AND idempotency_key = ?"  # noqa: S608
)
SET_JOB_STATUS: Final = Statement(
    "UPDATE jobs SET status = ? WHERE job_id = ? AND status = ?"  # one allowed state per statement, see store/jobs.py
)
CANCEL_JOB: Final = Statement("UPDATE jobs SET status = 3, next_run_at = NULL WHERE job_id = ? AND status = ?")
CANCEL_WAITING_RUNS: Final = Statement(
    "UPDATE job_runs SET status = 7, ended_at = ?, attempt_at = NULL WHERE job_id = ? AND status IN (1, 3)"
)
ADVANCE_JOB: Final = Statement(
    # The job is held by the transaction that claimed it (hold_statement): nothing else changed it meanwhile.
    "UPDATE jobs SET next_run_at = ?, status = ?, runs = runs + ? WHERE job_id = ?"
)
INSERT_RUN: Final = insert("job_runs", RUN_COLUMNS)
RUN: Final = Statement(f"SELECT {RUN_COLUMNS} FROM job_runs WHERE run_id = ?")  # noqa: S608
END_RUN: Final = Statement(
    "UPDATE job_runs SET status = ?, ended_at = ?, attempt_at = ?, result = ?, error_reason = ?, "
    "error_message = ?, process_id = ?, owner = NULL, lease_until = NULL "
    "WHERE run_id = ? AND owner = ? AND status = 2 RETURNING job_id, product"
)
END_JOB: Final = Statement("UPDATE jobs SET status = ? WHERE job_id = ? AND status IN (1, 4)")
NEXT_JOB_MOMENTS: Final = Statement(
    # The earliest next occurrence (the due index's first entry), and the earliest moment a run falls due.
    "SELECT (SELECT min(next_run_at) FROM jobs WHERE status = 1), (SELECT min(moment) FROM ("
    # Runs of paused jobs wait for Resume (which wakes the scheduler): counting them would make it look again at once.
    "SELECT min(r.attempt_at) AS moment FROM job_runs r JOIN jobs j ON j.job_id = r.job_id "
    "WHERE r.status IN (1, 3) AND j.status NOT IN (2, 3) "
    "UNION ALL SELECT min(lease_until) FROM job_runs WHERE status = 2) AS due)"
)


def due_jobs(dialect: Dialect) -> Statement:
    """The scheduled jobs due at a moment, with their runs going and pending, held until the transaction ends:
    moment, limit."""
    return hold_statement(
        dialect,
        "jobs",
        f"{JOB_COLUMNS}, {_OPEN_COUNTS}",
        "claimed.status = 1 AND claimed.next_run_at <= ?",
        "claimed.next_run_at",
    )


@functools.cache
def renew_runs(count: int) -> Statement:
    """Extend a replica's leases of `count` running runs: lease end, owner, then the `count` run ids."""
    return Statement(
        f"UPDATE job_runs SET lease_until = ? WHERE owner = ? AND status = 2 AND run_id IN ({marks(count)}) "  # noqa: S608
        "RETURNING run_id"
    )


def claim_due_runs(dialect: Dialect) -> Statement:
    """Start the runs due at a moment: owner, lease end, moment (first start), moment, moment, limit. Due: pending or
    retrying ones whose `attempt_at` came, running ones whose lease ran out (their runner died), and buffered ones
    (pending without `attempt_at`) whose job has no run going; never those of a paused or cancelled job."""
    return claim_statement(
        dialect,
        "job_runs",
        "run_id",
        "status = 2, owner = ?, lease_until = ?, attempts = attempts + 1, started_at = coalesce(started_at, ?), "
        "attempt_at = NULL, reclaimed = (reclaimed OR status = 2)",
        "j.status NOT IN (2, 3) AND ("
        "(claimed.status IN (1, 3) AND claimed.attempt_at <= ?) "
        "OR (claimed.status = 2 AND claimed.lease_until <= ?) "
        "OR (claimed.status = 1 AND claimed.attempt_at IS NULL AND NOT EXISTS (SELECT 1 FROM job_runs going "
        "WHERE going.job_id = claimed.job_id AND going.status IN (2, 3))))",
        "claimed.due_at",
        RUN_COLUMNS,
        source="JOIN jobs j ON j.job_id = claimed.job_id",
    )
