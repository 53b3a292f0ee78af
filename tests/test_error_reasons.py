"""One list of error reasons (`ductape_processor.reasons.Reason`): docs/api.md's error table documents exactly that
list, and no module of the server writes a reason as a string of its own."""

from __future__ import annotations

import ast
import re

from ductape_processor.reasons import Reason
from tests.conftest import ROOT

PACKAGE = ROOT / "server" / "ductape_processor"
REASONS = PACKAGE / "reasons.py"
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9_]+")


def _error_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| code | reason | when |") :]
    return [line.split("|") for line in table.splitlines()[2:] if line.startswith("|")]


def documented_reasons() -> set[str]:
    return {reason for row in _error_rows() for reason in re.findall(r"`([A-Z][A-Z0-9_]+)`", row[2])}


def documented_statuses() -> set[tuple[str, str]]:
    """The (status code, reason) pairs docs/api.md's error table documents: a row's every code with its every
    reason, except the row of the codes' own names, where a code goes with its own name only."""
    pairs: set[tuple[str, str]] = set()
    for row in _error_rows():
        codes = re.findall(r"\b[A-Z][A-Z_]+\b", row[1])
        reasons = re.findall(r"`([A-Z][A-Z0-9_]+)`", row[2])
        if set(codes) == set(reasons):
            pairs |= {(code, code) for code in codes}
        else:
            pairs |= {(code, reason) for code in codes for reason in reasons}
    return pairs


def literal_reasons(source: str, where: str) -> list[str]:
    """Where `source` writes a reason as a string: a `reason=` argument or a `reason` attribute given an UPPER_SNAKE
    string, or any string that is one of the listed reasons (a module constant standing in for one)."""
    listed = {reason.value for reason in Reason}
    found: list[str] = []
    for node in ast.walk(ast.parse(source, where)):
        given: list[ast.expr] = []
        if isinstance(node, ast.keyword) and node.arg == "reason":
            given.append(node.value)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", getattr(t, "attr", None)) == "reason" for t in targets):
                given.append(node.value)
        for value in given:
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and UPPER_SNAKE.fullmatch(value.value):
                found.append(f"{where}:{value.lineno} reason {value.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in listed:
            found.append(f"{where}:{node.lineno} {node.value!r}")
    return sorted(set(found))


def test_the_error_table_documents_exactly_the_listed_reasons() -> None:
    listed = {reason.value for reason in Reason}
    documented = documented_reasons()
    assert not listed - documented, f"reasons missing from docs/api.md's error table: {sorted(listed - documented)}"
    assert not documented - listed, f"docs/api.md documents reasons reasons.py does not list: {documented - listed}"


def test_the_table_pairs_each_code_with_its_reasons() -> None:
    pairs = documented_statuses()
    assert ("NOT_FOUND", "FEATURE_RUN_NOT_FOUND") in pairs
    assert ("ALREADY_EXISTS", "DB_CONSTRAINT_VIOLATION") in pairs and ("UNAVAILABLE", "UNAVAILABLE") in pairs
    assert ("NOT_FOUND", "FEATURE_RUN_NOT_RUNNING") not in pairs and ("NOT_FOUND", "UNAVAILABLE") not in pairs
    assert not any(code == "none" for code, _ in pairs)


def test_a_reason_is_its_own_upper_snake_name() -> None:
    for reason in Reason:
        assert reason.value == reason.name and UPPER_SNAKE.fullmatch(reason.value), reason


def test_the_scan_finds_a_reason_written_as_a_string_in_each_way() -> None:
    source = (
        'raise NotFound("x", reason="APP_NOT_FOUND")\n'
        'class Gone(NotFound):\n    reason = "GONE_AWAY"\n'
        'error.reason = "BROKEN"\n'
        'CACHE_MISSING = "CACHE_NOT_FOUND"\n'
        'raise NotFound("x", reason=Reason.APP_NOT_FOUND)\n'
        'log.info("not found: %s", reason)\n'
        'class Lost(NotFound, reason="LOST_FOR_GOOD"):\n    """Gone."""\n'
    )
    assert literal_reasons(source, "example.py") == [
        "example.py:1 'APP_NOT_FOUND'",
        "example.py:1 reason 'APP_NOT_FOUND'",
        "example.py:3 reason 'GONE_AWAY'",
        "example.py:4 reason 'BROKEN'",
        "example.py:5 'CACHE_NOT_FOUND'",
        "example.py:8 reason 'LOST_FOR_GOOD'",
    ]


def test_no_module_writes_a_reason_of_its_own() -> None:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "/v1/" in path.as_posix() or path == REASONS:
            continue
        found += literal_reasons(path.read_text(), path.relative_to(ROOT).as_posix())
    assert not found, f"reasons written as strings instead of reasons.Reason members: {found}"
