"""Every error reason the server can raise is in docs/api.md's error table (callers branch on them)."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

PACKAGE = ROOT / "server" / "ductape_processor"
# The generic bases in errors.py carry a default reason that their subclasses or callers replace.
GENERIC = {"ProcessorError", "NotFound", "FailedPrecondition", "Unauthenticated", "Unavailable"}


def raised_reasons() -> dict[str, str]:
    """Reason -> where it is set: `reason="X"` arguments (also through a module constant) and `reason = "X"` class
    attributes of error classes."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        if "/v1/" in path.as_posix():
            continue
        tree = ast.parse(path.read_text(), str(path))
        constants: dict[str, str] = {}
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            value = getattr(node, "value", None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                constants.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "reason":
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    found[node.value.value] = where
                elif isinstance(node.value, ast.Name) and node.value.id in constants:
                    found[constants[node.value.id]] = where
            if isinstance(node, ast.ClassDef) and node.name not in GENERIC:
                for item in node.body:
                    target = item.targets[0] if isinstance(item, ast.Assign) else getattr(item, "target", None)
                    value = getattr(item, "value", None)
                    if (
                        isinstance(target, ast.Name)
                        and target.id == "reason"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        found[value.value] = f"{where} ({node.name})"
    return {reason: where for reason, where in found.items() if re.fullmatch(r"[A-Z][A-Z0-9_]+", reason)}


def documented_reasons() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| code | reason | when |") :]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return {reason for row in rows for reason in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[2])}


def test_the_scan_finds_reasons_raised_in_several_ways() -> None:
    reasons = raised_reasons()
    assert {"IDEMPOTENCY_KEY_REUSED", "PRODUCT_NOT_FOUND", "INVALID_INPUT", "CIRCUIT_OPEN"} <= set(reasons)


def test_every_reason_the_server_raises_is_in_the_error_table() -> None:
    missing = {reason: where for reason, where in raised_reasons().items() if reason not in documented_reasons()}
    assert not missing, f"reasons missing from docs/api.md's error table: {missing}"
