"""Mutation testing of the security-critical modules with cosmic-ray: `make mutate` (or `--module auth` for one).

Each module is mutated in its own scratch copy of the tree (under .mutate/, so the working tree is never touched and
several modules run at once), and each mutant runs only the fast tests that cover that module. The operators are
narrowed to those that change behaviour a test can see (comparisons, boolean logic, exceptions, loops, arithmetic
sign); the cross products of arithmetic operators and number tweaks are left out, which is what keeps a run to
minutes. Surviving mutants are printed with their diff; docs/mutation.md lists the verdict on each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutate"
BIN = Path(sys.executable).parent
PYTEST = "python -m pytest -x -q -p no:cacheprovider --timeout 60"
ACTION_TESTS = "tests/test_actions.py -k 'not redis and not replicas and not credential and not xml'"


@dataclass(frozen=True)
class Target:
    """A module to mutate and the tests that should notice any change of its behaviour."""

    name: str
    module: str
    tests: str


TARGETS = (
    Target(
        "auth",
        "server/ductape_processor/api/auth.py",
        "tests/test_security_regressions.py tests/test_server.py -k api_key",
    ),
    Target(
        "sessions",
        "server/ductape_processor/runtime/sessions",
        "tests/test_sessions.py tests/test_session_edges.py tests/test_security_regressions.py",
    ),
    Target(
        "http",
        "server/ductape_processor/adapters/http",
        f"tests/test_security_regressions.py tests/test_http_hardening.py {ACTION_TESTS}",
    ),
    Target(
        "policies",
        "server/ductape_processor/runtime/policies",
        f"tests/test_policies.py tests/test_policy_rules.py {ACTION_TESTS}",
    ),
)

EXCLUDED_OPERATORS = [
    # Arithmetic: one swap per operator is enough to see whether a computation is tested; the other nine are noise.
    r"core/ReplaceBinaryOperator_(?!Add_Sub|Sub_Add|Mul_Div|Div_Mul|BitOr_BitAnd|Pow_Mul)\w+$",
    # `x < y` into `x is y` and friends: never a plausible slip.
    r"core/ReplaceComparisonOperator_(?!Is_|IsNot_)\w+_(Is|IsNot)$",
    # Keep the boundary (< into <=) and negation (< into >=) mutants of an ordering; drop the rest.
    r"core/ReplaceComparisonOperator_(Lt_Gt|LtE_GtE|Gt_Lt|GtE_LtE|(Lt|LtE|Gt|GtE)_(Eq|NotEq))$",
    r"core/ReplaceComparisonOperator_(Eq|NotEq)_(Lt|LtE|Gt|GtE)$",
    r"core/ReplaceUnaryOperator_\w+$",
    r"core/NumberReplacer$",
    r"core/RemoveDecorator$",
]


def _copy_tree(into: Path) -> None:
    if into.exists():
        shutil.rmtree(into)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _config(target: Target, tree: Path) -> Path:
    config = tree / "cosmic-ray.toml"
    excluded = ", ".join(json.dumps(pattern) for pattern in EXCLUDED_OPERATORS)
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target.module}"\n'
        "timeout = 120.0\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(f'{PYTEST} {target.tests}')}\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = [{excluded}]\n"
    )
    return config


def _run(target: Target) -> tuple[Target, Path]:
    tree = SCRATCH / target.name
    _copy_tree(tree)
    config = _config(target, tree)
    session = tree / "session.sqlite"
    # The copy's own package comes first on the path, ahead of the editable install of the working tree.
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree / 'server'}{os.pathsep}{tree}",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("CI", None)
    for command in (
        ["cosmic-ray", "init", str(config), str(session)],
        ["cr-filter-operators", str(session), str(config)],
        ["cosmic-ray", "baseline", str(config)],
        ["cosmic-ray", "exec", str(config), str(session)],
    ):
        subprocess.run(command, cwd=tree, env=env, check=True)
    return target, session


def _summary(session: Path) -> tuple[int, int, list[str]]:
    """(mutants run, killed, diffs of the survivors); mutants left out by the operator filter are not counted."""
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT r.test_outcome, r.diff FROM work_results r JOIN mutation_specs s USING (job_id) "
            "WHERE r.worker_outcome != 'SKIPPED' ORDER BY s.start_pos_row, s.start_pos_col"
        ).fetchall()
    survived = [diff for outcome, diff in rows if outcome == "SURVIVED"]
    return len(rows), sum(1 for outcome, _ in rows if outcome == "KILLED"), survived


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=[t.name for t in TARGETS], help="only these modules")
    parser.add_argument("--jobs", type=int, default=2, help="modules mutated at once (each in its own copy)")
    args = parser.parse_args()
    targets = [t for t in TARGETS if not args.module or t.name in args.module]
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(_run, targets))
    total_killed = total = 0
    for target, session in finished:
        count, killed, survived = _summary(session)
        total, total_killed = total + count, total_killed + killed
        print(f"\n== {target.module}: {count} mutants, {killed} killed, {len(survived)} survived")
        for diff in survived:
            print(diff)
    print(f"\n== all: {total} mutants, {total_killed} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
