"""The store's SQL of jobs and their runs (store/jobs.py), written once for both back-ends, as statements.py is.

Due occurrences and runs are claimed with the statement every claim under a lease is built with (store/leases.py).
"""

from __future__ import annotations

import functools
from typing import Final

from ductape_processor.store.leases import claim_statement
from ductape_processor.store.statements import Dialect, Statement

JOB_COLUMNS: Final = (
    "job_id, product, env, name, target_kind, spec, status, next_run_at, runs, declared, idempotency_key, "
    "request_hash, created_at, lease_owner, lease_until"
)
RUN_COLUMNS: Final = (
    "run_id, job_id, product, env, trigger, status, due_at, attempt_at, attempts, started_at, ended_at, owner, "
    "lease_until, reclaimed, result, error_reason, error_message, process_id"
)
_OPEN_COUNTS: Final = (
    "(SELECT count(*) FROM job_runs r WHERE r.job_id = jobs.job_id AND r.status IN (2, 3)), "
    "(SELECT count(*) FROM job_runs r WHERE r.job_id = jobs.job_id AND r.status = 1)"
)
INSERT_JOB: Final = Statement(
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"  # noqa: S608
)
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
CANCEL_JOB: Final = Statement(
    "UPDATE jobs SET status = 3, next_run_at = NULL, lease_owner = NULL, lease_until = NULL "
    "WHERE job_id = ? AND status = ?"
)
CANCEL_WAITING_RUNS: Final = Statement(
    "UPDATE job_runs SET status = 7, ended_at = ?, attempt_at = NULL WHERE job_id = ? AND status IN (1, 3)"
)
ADVANCE_JOB: Final = Statement(
    "UPDATE jobs SET next_run_at = ?, status = ?, runs = runs + ?, lease_owner = NULL, lease_until = NULL "
    "WHERE job_id = ? AND lease_owner = ? AND status = 1"
)
INSERT_RUN: Final = Statement(
    f"INSERT INTO job_runs ({RUN_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
RUN: Final = Statement(f"SELECT {RUN_COLUMNS} FROM job_runs WHERE run_id = ?")  # noqa: S608
END_RUN: Final = Statement(
    "UPDATE job_runs SET status = ?, ended_at = ?, attempt_at = ?, result = ?, error_reason = ?, "  # noqa: S608
    "error_message = ?, process_id = ?, owner = NULL, lease_until = NULL "
    f"WHERE run_id = ? AND owner = ? AND status = 2 RETURNING {RUN_COLUMNS}"
)
END_JOB: Final = Statement("UPDATE jobs SET status = ? WHERE job_id = ? AND status IN (1, 4)")
NEXT_JOB_MOMENT: Final = Statement(
    "SELECT min(moment) FROM ("
    "SELECT min(CASE WHEN lease_until > next_run_at THEN lease_until ELSE next_run_at END) AS moment "
    "FROM jobs WHERE status = 1 "
    # Runs of paused jobs wait for Resume (which wakes the scheduler): counting them would make it look again at once.
    "UNION ALL SELECT min(r.attempt_at) FROM job_runs r JOIN jobs j ON j.job_id = r.job_id "
    "WHERE r.status IN (1, 3) AND j.status NOT IN (2, 3) "
    "UNION ALL SELECT min(lease_until) FROM job_runs WHERE status = 2) AS due"
)


def claim_due_jobs(dialect: Dialect) -> Statement:
    """Lease the scheduled jobs due at a moment, with their runs going and pending: owner, lease end, moment,
    moment, limit."""
    return claim_statement(
        dialect,
        "jobs",
        "job_id",
        "lease_owner = ?, lease_until = ?",
        "claimed.status = 1 AND claimed.next_run_at <= ? AND (claimed.lease_until IS NULL OR claimed.lease_until <= ?)",
        "claimed.next_run_at",
        f"{JOB_COLUMNS}, {_OPEN_COUNTS}",
    )


@functools.cache
def held_jobs(lock_rows: str, count: int) -> Statement:
    """Which of `count` scheduled jobs a replica holds the lease of, locked until the transaction ends (`lock_rows`:
    the dialect's): owner, then the `count` job ids."""
    marks = ", ".join("?" * count)
    return Statement(
        f"SELECT job_id FROM jobs WHERE lease_owner = ? AND status = 1 AND job_id IN ({marks}){lock_rows}"  # noqa: S608
    )


@functools.cache
def renew_runs(count: int) -> Statement:
    """Extend a replica's leases of `count` running runs: lease end, owner, then the `count` run ids."""
    marks = ", ".join("?" * count)
    return Statement(
        f"UPDATE job_runs SET lease_until = ? WHERE owner = ? AND status = 2 AND run_id IN ({marks}) RETURNING run_id"  # noqa: S608
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
