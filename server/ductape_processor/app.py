"""The composition root: builds the object graph from the settings, serves, and drains on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from ductape.processor.v1 import (
    action_pb2,
    action_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    log_pb2,
    log_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ductape_processor.adapters.http import HttpClientPool
from ductape_processor.api.action import ActionServicer
from ductape_processor.api.auth import ApiKeyAuthenticator
from ductape_processor.api.broker import BrokerServicer
from ductape_processor.api.interceptor import ProcessorInterceptor
from ductape_processor.api.log import LogServicer
from ductape_processor.api.product import ProductServicer
from ductape_processor.api.reflection import enable_reflection
from ductape_processor.api.session import SessionServicer
from ductape_processor.errors import InvalidManifest, ProcessorError
from ductape_processor.runtime.actions.executor import ActionExecutor
from ductape_processor.runtime.brokers import BrokerRuntime
from ductape_processor.runtime.cache import ResultCache
from ductape_processor.runtime.logs import ExecutionQueries, ExecutionRecorder
from ductape_processor.runtime.manifest_loader import ManifestFormat
from ductape_processor.runtime.registry import Registry
from ductape_processor.runtime.secrets import SecretsFileError, SecretSource, TokenVault, referenced_secrets
from ductape_processor.runtime.sessions import SessionKeys, SessionManager
from ductape_processor.settings import Settings
from ductape_processor.store import Store, open_store
from ductape_processor.store.files import private_directory
from ductape_processor.telemetry.setup import Telemetry, setup_telemetry

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
SERVICE_NAMES = (
    product_pb2.DESCRIPTOR.services_by_name["ProductService"].full_name,
    action_pb2.DESCRIPTOR.services_by_name["ActionService"].full_name,
    log_pb2.DESCRIPTOR.services_by_name["LogService"].full_name,
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name,
)
PURGE_INTERVAL_S = 60.0


class StartupError(Exception):
    """The processor refuses to start; the message says why and what to change."""


def manifest_files(paths: list[Path]) -> list[Path]:
    """The manifest files named: files as given, folders expanded to their *.yaml, *.yml, *.json (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise StartupError(f"manifest {path} does not exist")
    return files


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise StartupError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class ProcessorApp:
    """One processor instance: store, registry, gRPC server with health and reflection."""

    def __init__(self, settings: Settings, *, store: Store | None = None, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.store = (
            store if store is not None else open_store(settings.store, settings.data_dir, settings.store_schema)
        )
        self.telemetry = telemetry if telemetry is not None else setup_telemetry()
        self.registry = Registry(
            self.store, poll_interval=settings.registry_poll_s, manifest_max_bytes=settings.manifest_max_bytes
        )
        self.secrets = SecretSource()
        self.http = HttpClientPool(max_response_bytes=settings.max_upstream_response_bytes)
        self.recorder = ExecutionRecorder(self.store, flush_interval=settings.execution_flush_s)
        self.health = health.aio.HealthServicer()
        self._purger: asyncio.Task[None] | None = None
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self._stopped = False

    async def start(self) -> int:
        """Open the store, apply start-up manifests, bind and serve. Returns the bound port."""
        problems = self.settings.exposure_problems()
        if problems:
            transport = any("TLS is off" in p or "client authentication" in p for p in problems)
            hint = " Pass --insecure to serve like this anyway." if transport else ""
            raise StartupError("refusing to serve: " + "; ".join(problems) + "." + hint)
        try:
            self.secrets = SecretSource.from_settings(self.settings.secrets_file)
        except SecretsFileError as exc:
            raise StartupError(str(exc)) from None
        files = manifest_files(self.settings.manifests)
        if self.settings.store == "sqlite" or not self.settings.session_keys:
            try:  # the data directory is in use: the store's files or the generated session key live there
                private_directory(self.settings.data_dir, tighten=True)
            except OSError as exc:
                where = self.settings.data_dir
                raise StartupError(f"cannot prepare the data directory {where}: {exc.strerror}") from None
        try:
            await self.store.open()
        except Exception as exc:  # any driver error: the operator needs the cause, not a traceback
            raise StartupError(f"cannot open the {self.store.dialect} store: {type(exc).__name__}: {exc}") from None
        try:
            keys, generated = SessionKeys.load(self.settings.session_keys, self.settings.data_dir)
        except (OSError, ValueError) as exc:
            raise StartupError(f"session keys: {exc}") from None
        if generated:
            log.warning(
                "no session keys configured: using a key generated for this data directory (set "
                "PROCESSOR_SESSION_KEYS for replicas that share sessions)",
                extra={"key_file": str(self.settings.data_dir / "session-keys")},
            )
        self.sessions = SessionManager(
            self.registry, self.store, keys, revocation_poll_s=self.settings.session_revocation_poll_s
        )
        self.brokers = BrokerRuntime(
            self.registry,
            self.store,
            self.secrets,
            max_message_bytes=self.settings.broker_max_message_bytes,
            idempotency_retention=timedelta(seconds=self.settings.idempotency_retention_s),
        )
        self.cache = ResultCache(self.store, self.secrets)
        self.actions = ActionExecutor(
            self.registry,
            self.store,
            self.http,
            self.secrets,
            self.recorder,
            self.cache,
            self.sessions,
            TokenVault(keys.root_keys()),
            idempotency_retention=timedelta(seconds=self.settings.idempotency_retention_s),
        )
        try:
            await self.registry.start()
            await self.sessions.start_watching()
            self.recorder.start()
            self._purger = asyncio.get_running_loop().create_task(self._purge(), name="store-purge")
            for path in files:
                await self._apply_file(path)
            self.server = self._build_server()
            address = self.settings.address
            credentials = _server_credentials(self.settings)
            try:
                if credentials is not None:
                    self.port = self.server.add_secure_port(address, credentials)
                else:
                    self.port = self.server.add_insecure_port(address)
            except RuntimeError as exc:
                raise StartupError(f"cannot listen on {address}: {exc}") from None
            await self.server.start()
        except BaseException:
            await self._release()
            raise
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "address": self.settings.address,
                "port": self.port,
                "store": self.store.dialect,
                "tls": self.settings.tls_enabled,
                "api_keys": len(self.settings.api_key_hashes),
            },
        )
        return self.port

    async def _apply_file(self, path: Path) -> None:
        source = await asyncio.to_thread(path.read_bytes)
        fmt = ManifestFormat.JSON if path.suffix == ".json" else ManifestFormat.YAML
        try:
            record, created = await self.registry.apply(source, fmt)
        except ProcessorError as exc:
            problems = exc.problems if isinstance(exc, InvalidManifest) else exc.violations
            listed = "\n".join(f"  {v.field or '(document)'}: {v.description}" for v in problems)
            more = exc.total - len(problems) if isinstance(exc, InvalidManifest) else 0
            listed += f"\n  … and {more} more problems" if more else ""
            raise StartupError(f"manifest {path} is invalid:\n{listed}") from None
        document = json.loads(record.document)
        missing = self.secrets.missing(referenced_secrets(document))
        log.info(
            "manifest applied",
            extra={
                "file": str(path),
                "product": record.product,
                "version": record.version,
                "new_version": created,
            },
        )
        if missing:
            log.warning(
                "manifest references secrets no source defines yet",
                extra={"product": record.product, "secret_names": missing},
            )

    def _build_server(self) -> grpc.aio.Server:
        settings = self.settings
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            interceptors=[
                ProcessorInterceptor(ApiKeyAuthenticator(settings.api_key_hashes), self.telemetry),
            ],
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        product_pb2_grpc.add_ProductServiceServicer_to_server(ProductServicer(self.registry), server)
        action_pb2_grpc.add_ActionServiceServicer_to_server(ActionServicer(self.actions), server)
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        broker_pb2_grpc.add_BrokerServiceServicer_to_server(BrokerServicer(self.brokers), server)
        queries = ExecutionQueries(self.registry, self.store, self.recorder.flush)
        log_pb2_grpc.add_LogServiceServicer_to_server(LogServicer(queries), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        return server

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, let calls in flight finish within `grace`, then release everything."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if hasattr(self, "brokers"):
            await self.brokers.shutdown_streams()  # streams end with UNAVAILABLE; unacked messages go back
        if self.server is not None:
            log.info("draining", extra={"grace_s": self.settings.shutdown_grace_s if grace is None else grace})
            await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        await self._release()
        log.info("stopped")

    async def _purge(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_S)
            try:
                await self.store.purge_expired(datetime.now(UTC))
            except Exception as exc:  # the store may be briefly unreachable; try again next time
                log.warning("purging expired store entries failed: %s", exc)

    async def _release(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        await self.registry.stop()
        if hasattr(self, "sessions"):
            await self.sessions.stop_watching()
        await self.recorder.close()
        await self.http.close()
        if hasattr(self, "brokers"):
            await self.brokers.close()
        if hasattr(self, "cache"):
            await self.cache.close()
        await self.store.close()
        await self.telemetry.shutdown()

    async def wait(self) -> None:
        """Until the server terminates."""
        if self.server is not None:
            await self.server.wait_for_termination()
