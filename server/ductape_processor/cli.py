"""`ductape-processor`: serve, validate manifests, print the manifest JSON Schema, hash an API key."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict

from pydantic import JsonValue, ValidationError
from pydantic.json_schema import GenerateJsonSchema

from ductape_processor import __version__
from ductape_processor.api.auth import hash_key
from ductape_processor.app import ProcessorApp, StartupError, manifest_files
from ductape_processor.errors import InvalidManifest, ManifestTooLarge
from ductape_processor.migrate_command import add_parser as add_migrate_parser
from ductape_processor.migrate_command import migrate
from ductape_processor.runtime.policies.periodic import cancel_and_wait
from ductape_processor.runtime.registry.durations import format_duration
from ductape_processor.runtime.registry.loader import ManifestFormat, load_manifest
from ductape_processor.runtime.registry.manifest import Manifest
from ductape_processor.runtime.sessions import new_root_key, parse_root_key
from ductape_processor.settings import Settings
from ductape_processor.telemetry.logging import configure_logging
from ductape_processor.threads import HelperThreads

log = logging.getLogger("ductape_processor")


class _Flag(TypedDict, total=False):
    """The `add_argument` options of one `serve` flag."""

    dest: str
    action: str
    help: str
    type: type[int | float]
    choices: list[str]


# flag -> settings field; only flags given on the command line override the environment.
_FLAGS: dict[str, _Flag] = {
    "address": {"help": "host:port to listen on (PROCESSOR_ADDRESS, default 127.0.0.1:50051)"},
    "data_dir": {"help": "folder for the embedded store (PROCESSOR_DATA_DIR, default .data)"},
    "store": {"help": "sqlite, sqlite:///file.db or a postgresql:// DSN (PROCESSOR_STORE)"},
    "store_schema": {"help": "PostgreSQL schema of the store (PROCESSOR_STORE_SCHEMA, default processor)"},
    "manifest": {
        "dest": "manifests",
        "action": "append",
        "help": "manifest file or folder to apply at start",
    },
    "secrets_file": {"help": "KEY=VALUE file of secrets (PROCESSOR_SECRETS_FILE)"},
    "log_level": {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    "event_loop": {"choices": ["auto", "asyncio", "uvloop"]},
    "log_format": {"choices": ["json", "text"]},
    "helper_thread_nice": {"type": int},
    "max_message_bytes": {"type": int},
    "max_concurrent_rpcs": {"type": int},
    "keepalive_time_s": {"type": float},
    "keepalive_timeout_s": {"type": float},
    "shutdown_grace_s": {"type": float, "help": "seconds calls in flight get on SIGTERM (default 15)"},
    "api_key_hash": {
        "dest": "api_key_hashes",
        "action": "append",
        "help": "hex SHA-256 of an accepted API key",
    },
    "tls_cert": {},
    "tls_key": {},
    "tls_client_ca": {"help": "CA bundle that client certificates must chain to (mTLS)"},
    "registry_poll_s": {"type": float},
    "job_lease_s": {"type": float},
    "job_poll_s": {"type": float},
    "feature_lease_s": {"type": float},
    "feature_poll_s": {"type": float},
    "feature_max_wait_s": {"type": float},
    "manifest_max_bytes": {"type": int},
    "max_upstream_response_bytes": {"type": int},
    "idempotency_retention_s": {"type": float},
    "execution_flush_s": {"type": float},
    "session_key": {"dest": "session_keys", "action": "append", "help": "session root key id:key (newest first)"},
    "session_revocation_poll_s": {"type": float},
    "broker_max_message_bytes": {"type": int},
    "storage_max_file_bytes": {"type": int},
    "stream_idle_s": {"type": float},
    "database_max_rows": {"type": int},
    "database_max_result_bytes": {"type": int},
    "storage_http_address": {"help": "host:port serving fs storages' signed URLs (off when unset)"},
    "webhook_http_address": {"help": "host:port receiving provider webhooks (empty: off)"},
    "webhook_dispatch_lease_s": {"type": float},
    "webhook_retention_s": {"type": float},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ductape-processor", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gRPC API")
    for name, options in _FLAGS.items():
        serve.add_argument(f"--{name.replace('_', '-')}", default=None, **options)
    serve.add_argument("--insecure", action="store_true", default=None, help="allow an exposed bind without TLS/auth")
    validate = commands.add_parser("validate", help="validate manifest files and list every problem")
    validate.add_argument("paths", nargs="+", type=Path)
    validate.add_argument(
        "--manifest-max-bytes", type=int, default=None, help="largest manifest accepted (PROCESSOR_MANIFEST_MAX_BYTES)"
    )
    commands.add_parser("schema", help="print the manifest JSON Schema")
    session_key = commands.add_parser("new-session-key", help="print a new session root key (id:key)")
    session_key.add_argument("--id", default="k1", help="the key's id, e.g. the date it was made (default k1)")
    add_migrate_parser(commands)
    key = commands.add_parser("hash-key", help="print the SHA-256 of an API key read from standard input")
    key.add_argument("--key", help="the key (prefer standard input: arguments show in process lists)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line taking precedence."""
    overrides = {
        field: value
        for field in (*(o.get("dest", n) for n, o in _FLAGS.items()), "insecure")
        if (value := getattr(args, field, None)) is not None
    }
    return Settings(**overrides)


async def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT, then drain."""
    app = ProcessorApp(settings)
    try:
        await app.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    # What start-up built (modules, the product models, the servers) lives as long as the process: frozen out of the
    # collector's reach, a full collection no longer walks its ~85 000 objects (about 45 ms a time under load).
    gc.collect()
    gc.freeze()
    helpers = HelperThreads(settings.helper_thread_nice)
    helpers.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(app.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutdown requested")
    helpers.stop()
    await app.stop()
    for task in (waiter, stopper):
        await cancel_and_wait(task)
    return 0


def _validate(paths: list[Path], max_bytes: int) -> int:
    status = 0
    for path in manifest_files(paths):
        fmt = ManifestFormat.JSON if path.suffix == ".json" else ManifestFormat.YAML
        try:
            with path.open("rb") as file:
                source = file.read(max_bytes + 1)  # a larger file is refused unread, as the server does
                if len(source) > max_bytes:
                    raise ManifestTooLarge("bytes", max_bytes, os.fstat(file.fileno()).st_size)
            loaded = load_manifest(source, fmt, max_bytes=max_bytes)
        except OSError as exc:
            status = 1
            print(f"{path}: unreadable: {exc.strerror}")
            continue
        except ManifestTooLarge as exc:
            status = 1
            print(f"{path}: invalid\n  (document): {exc.violations[0].description}")
            continue
        except InvalidManifest as exc:
            status = 1
            print(f"{path}: invalid")
            for v in exc.problems:
                print(f"  {v.field or '(document)'}: {v.description}")
            if exc.total > len(exc.problems):
                print(f"  … and {exc.total - len(exc.problems)} more problems")
            continue
        print(f"{path}: valid (product {loaded.model.product}, checksum {loaded.checksum})")
    return status


class _SchemaGenerator(GenerateJsonSchema):
    """Writes duration defaults the way manifests write them (`30s`), not in ISO 8601."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def manifest_schema() -> dict[str, JsonValue]:
    """The manifest's JSON Schema, generated from the models."""
    schema = Manifest.model_json_schema(by_alias=True, schema_generator=_SchemaGenerator)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ductape processor product manifest"
    return schema


def _run(main: Coroutine[Any, Any, int], loop: str) -> int:
    """Run `main` on the configured event loop: uvloop when asked for or, with `auto`, when installed."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise StartupError("event_loop is uvloop, but uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(manifest_schema(), indent=2, sort_keys=True))
        return
    if args.command == "new-session-key":
        try:
            spec = new_root_key(args.id)
            parse_root_key(spec)  # checks the id
        except ValueError as exc:
            sys.exit(f"new-session-key: {exc}")
        print(spec)
        return
    if args.command == "migrate":
        sys.exit(migrate(args))
    if args.command == "hash-key":
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            sys.exit("hash-key: no key given on standard input")
        print(hash_key(key))
        return
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        sys.exit(f"ductape-processor: invalid configuration: {problems}")
    if args.command == "validate":
        try:
            sys.exit(_validate(args.paths, settings.manifest_max_bytes))
        except StartupError as exc:
            sys.exit(f"validate: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    try:
        sys.exit(_run(serve(settings), settings.event_loop))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
