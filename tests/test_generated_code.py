"""The checked-in Python stubs and TypeScript modules are what `make gen` produces from the protos: a proto change
without `make gen` fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, _missing

PACKAGE = Path("ductape/processor/v1")


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / PACKAGE).iterdir() if p.is_file()}
    checked_in = {
        p.name: p.read_bytes()
        for p in (ROOT / "clients" / "python" / PACKAGE).iterdir()
        if p.is_file() and p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    }
    assert sorted(fresh) == sorted(checked_in), "stubs were added or removed: run `make gen` and commit"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code: {stale}; run `make gen` and commit"


def test_generated_typescript_matches_the_protos(tmp_path: Path) -> None:
    if not (ROOT / "clients" / "typescript" / "node_modules" / ".bin" / "protoc-gen-ts_proto").exists():
        _missing(
            "clients/typescript/node_modules is missing: run `npm ci --prefix clients/typescript` (make test does)"
        )
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--only", "typescript", "--ts-out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    checked_in_root = ROOT / "clients" / "typescript" / "src" / "gen"
    fresh = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*.ts")}
    checked_in = {str(p.relative_to(checked_in_root)): p.read_bytes() for p in checked_in_root.rglob("*.ts")}
    assert sorted(fresh) == sorted(checked_in), "TypeScript modules were added or removed: run `make gen` and commit"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated TypeScript: {stale}; run `make gen` and commit"
