"""The store's feature SQL (store/features.py), written once for both back-ends, as statements.py is."""

from __future__ import annotations

import functools
from typing import Final

from ductape_processor.store.leases import claim_statement
from ductape_processor.store.statements import Dialect, Statement, insert, marks, upsert

RUN_COLUMNS: Final = (
    "run_id, product, env, feature, version, status, input, session_tag, session_token, idempotency_key, "
    "request_hash, output, error_reason, error_message, failed_step, replay_of, parent_run, takeovers, created_at, "
    "ended_at, expires_at, owner, lease_until"
)
STEP_COLUMNS: Final = (
    "run_id, sequence, event, phase, status, attempts, iteration, position, started_at, ended_at, output, "
    "error_reason, error_message"
)
_GOING: Final = "status IN (1, 6)"

INSERT_RUN: Final = insert("feature_runs", RUN_COLUMNS)
INSERT_NEW_RUN: Final = Statement(f"{INSERT_RUN.qmark} ON CONFLICT DO NOTHING")
RUN_BY_KEY: Final = Statement(
    f"SELECT {RUN_COLUMNS} FROM feature_runs WHERE product = ? AND env = ? AND idempotency_key = ?"  # noqa: S608
)
RUN: Final = Statement(f"SELECT {RUN_COLUMNS} FROM feature_runs WHERE run_id = ?")  # noqa: S608
STEPS: Final = Statement(f"SELECT {STEP_COLUMNS} FROM feature_steps WHERE run_id = ?")  # noqa: S608
PUT_STEP: Final = upsert("feature_steps", STEP_COLUMNS, "run_id, sequence, event, phase")
CHANGE_RUN: Final = Statement(
    "UPDATE feature_runs SET status = ?, output = ?, error_reason = ?, error_message = ?, failed_step = ?, "  # noqa: S608
    "ended_at = ?, expires_at = ?, "
    "owner = CASE WHEN ? THEN NULL ELSE owner END, lease_until = CASE WHEN ? THEN NULL ELSE lease_until END "
    f"WHERE run_id = ? AND owner = ? AND {_GOING}"
)
CANCEL_RUN: Final = Statement(
    "UPDATE feature_runs SET status = 5, ended_at = ?, expires_at = ?, owner = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE run_id = ? AND {_GOING} RETURNING {RUN_COLUMNS}"
)
RESUME_RUN: Final = Statement(
    "UPDATE feature_runs SET status = 1, output = '', error_reason = '', error_message = '', failed_step = '', "  # noqa: S608
    "ended_at = NULL, expires_at = NULL, owner = ?, lease_until = ? "
    "WHERE run_id = ? AND status IN (3, 5) "
    "AND NOT EXISTS (SELECT 1 FROM feature_steps s WHERE s.run_id = feature_runs.run_id AND s.phase = 1) "
    f"RETURNING {RUN_COLUMNS}"
)
DROP_FAILED_STEPS: Final = Statement("DELETE FROM feature_steps WHERE run_id = ? AND status = 4")
RELEASE_RUNS: Final = Statement(f"UPDATE feature_runs SET lease_until = ? WHERE owner = ? AND {_GOING}")  # noqa: S608
NEXT_MOMENT: Final = Statement(f"SELECT min(lease_until) FROM feature_runs WHERE {_GOING}")  # noqa: S608
PURGE_STEPS: Final = Statement(
    "DELETE FROM feature_steps WHERE run_id IN (SELECT run_id FROM feature_runs WHERE expires_at <= ?)"
)
PURGE_RUNS: Final = Statement("DELETE FROM feature_runs WHERE expires_at <= ?")


@functools.cache
def held_runs(lock_rows: str, count: int) -> Statement:
    """Which of `count` going runs a replica holds, locked until the transaction ends: owner, then the run ids."""
    return Statement(
        f"SELECT run_id FROM feature_runs WHERE owner = ? AND {_GOING} AND run_id IN ({marks(count)}){lock_rows}"  # noqa: S608
    )


@functools.cache
def renew_runs(count: int) -> Statement:
    """Extend a replica's leases of `count` going runs: lease end, owner, then the run ids."""
    return Statement(
        f"UPDATE feature_runs SET lease_until = ? WHERE owner = ? AND {_GOING} "  # noqa: S608
        f"AND run_id IN ({marks(count)}) RETURNING run_id"
    )


def claim_runs(dialect: Dialect) -> Statement:
    """Lease the going runs whose lease ran out: owner, lease end, moment, limit."""
    return claim_statement(
        dialect,
        "feature_runs",
        "run_id",
        "owner = ?, lease_until = ?, takeovers = takeovers + 1",
        f"claimed.{_GOING} AND claimed.lease_until <= ?",
        "claimed.lease_until",
        RUN_COLUMNS,
    )
