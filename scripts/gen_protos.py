"""Regenerate every client's code from protos/: the Python stubs into clients/python/ and the TypeScript modules
into clients/typescript/src/gen/ (or into --out / --ts-out).

Run through `make gen`. The output is checked in; tests/test_generated_code.py regenerates into a temporary
folder and fails when the checked-in files differ, so a proto change without `make gen` cannot land.

The TypeScript modules are written by ts-proto (the version pinned in clients/typescript/package-lock.json, run
from its node_modules: `npm ci --prefix clients/typescript` first) through the same protoc as the Python stubs,
together with the google.rpc error types (third_party/googleapis) that the TypeScript client decodes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GOOGLEAPIS = ROOT / "third_party" / "googleapis"
PACKAGE_DIR = Path("ductape/processor/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
TS_PACKAGE = ROOT / "clients" / "typescript"
TS_PLUGIN = TS_PACKAGE / "node_modules" / ".bin" / "protoc-gen-ts_proto"
# ts-proto's options: grpc-js service clients, ESM imports (`.js` suffixes), Struct/Value as plain JS values,
# Timestamp as Date, int64 as number (exact up to 2^53), bytes as Buffer; no version comment (the lockfile pins it).
TS_OPTIONS = (
    "outputServices=grpc-js,esModuleInterop=true,importSuffix=.js,env=node,useDate=true,forceLong=number,"
    "useOptionals=none,oneof=properties,outputJsonMethods=false,outputTypeRegistry=false,"
    "exportCommonSymbols=false,useAbortSignal=false,emitImportedFiles=true,fileSuffix=,"
    "outputPartialMethods=true,comments=true,disableProto2Optionals=false"
)
TS_RPC_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def _protos() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def _run(args: list[str]) -> None:
    if protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{resources.files('grpc_tools') / '_proto'}", *args]):
        raise SystemExit("protoc failed")


def generate(out: Path) -> list[Path]:
    """Generate the Python stubs of every proto under protos/ into `out`; return the files written."""
    target = out / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    bin_dir = Path(sys.executable).parent
    _run(
        [
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *_protos(),
        ]
    )
    return sorted(p for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def generate_typescript(out: Path) -> list[Path]:
    """Generate the TypeScript modules into `out` (emptied first); return the files written."""
    if not TS_PLUGIN.exists():
        raise SystemExit(f"{TS_PLUGIN} is missing: run `npm ci --prefix {TS_PACKAGE.relative_to(ROOT)}` first")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _run(
        [
            f"-I{GOOGLEAPIS}",
            f"--plugin=protoc-gen-ts_proto={TS_PLUGIN}",
            f"--ts_proto_out={out}",
            f"--ts_proto_opt={TS_OPTIONS}",
            *_protos(),
            *TS_RPC_PROTOS,
        ]
    )
    return sorted(p for p in out.rglob("*.ts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "clients" / "python")
    parser.add_argument("--ts-out", type=Path, default=TS_PACKAGE / "src" / "gen")
    parser.add_argument("--only", choices=("python", "typescript"), help="generate one client's code only")
    args = parser.parse_args()
    if args.only != "typescript":
        for path in generate(args.out):
            print(path.relative_to(args.out))
        shutil.rmtree(args.out / PACKAGE_DIR / "__pycache__", ignore_errors=True)
    if args.only != "python":
        for path in generate_typescript(args.ts_out):
            print(path.relative_to(args.ts_out))


if __name__ == "__main__":
    main()
