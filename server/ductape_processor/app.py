"""The composition root: checks the settings, builds the object graph in one phase, serves, drains on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health

from ductape_processor.adapters.http.addresses import public_addresses
from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.api.action import ActionServicer
from ductape_processor.api.auth import ApiKeyAuthenticator
from ductape_processor.api.broker import BrokerServicer
from ductape_processor.api.database import DatabaseServicer
from ductape_processor.api.feature import FeatureServicer
from ductape_processor.api.interceptor import ProcessorInterceptor
from ductape_processor.api.job import JobServicer
from ductape_processor.api.log import LogServicer
from ductape_processor.api.migration import MigrationServicer
from ductape_processor.api.notification import NotificationServicer
from ductape_processor.api.product import ProductServicer
from ductape_processor.api.session import SessionServicer
from ductape_processor.api.storage import StorageServicer
from ductape_processor.api.webhook import WebhookServicer
from ductape_processor.errors import InvalidManifest, ProcessorError
from ductape_processor.grpc_server import ListenError, Servicers, grpc_server, listen, set_serving
from ductape_processor.runtime.actions.cache import ResultCache
from ductape_processor.runtime.actions.executor import ActionExecutor
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.databases.migrations import MigrationRunner
from ductape_processor.runtime.databases.pools import DatabasePools
from ductape_processor.runtime.databases.runner import DatabaseRunner
from ductape_processor.runtime.features.runtime import FeatureRuntime, FeatureSettings
from ductape_processor.runtime.features.steps import FeatureSteps
from ductape_processor.runtime.jobs.runtime import JobRuntime
from ductape_processor.runtime.jobs.scheduler import JobScheduler, SchedulerSettings
from ductape_processor.runtime.jobs.targets import JobTargets
from ductape_processor.runtime.logs import ExecutionQueries, ExecutionRecorder
from ductape_processor.runtime.notifications.sender import NotificationRuntime
from ductape_processor.runtime.policies.clock import Clock, SystemClock
from ductape_processor.runtime.policies.periodic import PeriodicTask
from ductape_processor.runtime.policies.secrets import SecretsFileError, SecretSource, TokenVault, referenced_secrets
from ductape_processor.runtime.registry.loader import ManifestFormat
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.sessions import SessionKeys, SessionManager
from ductape_processor.runtime.storage.links import StorageLinks
from ductape_processor.runtime.storage.operations import StorageRuntime
from ductape_processor.runtime.webhooks.deliveries import DeliverySettings, DeliveryWorker
from ductape_processor.runtime.webhooks.dispatches import DispatchSettings, DispatchWorker
from ductape_processor.runtime.webhooks.emitter import WebhookRuntime
from ductape_processor.runtime.webhooks.receiver import WebhookReceiver
from ductape_processor.settings import Settings
from ductape_processor.store import Store, open_store
from ductape_processor.store.files import private_directory
from ductape_processor.telemetry.setup import Telemetry, setup_telemetry

if TYPE_CHECKING:
    # The two HTTP listeners serve on aiohttp's web server (about 12 MB once imported): imported in `build` when
    # their address is set, so a processor without them does not load it.
    from ductape_processor.api.storage_http import StorageHttpListener
    from ductape_processor.api.webhook_http import WebhookHttpListener

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
PURGE_INTERVAL_S = 60.0
WEBHOOK_RESPONSE_BYTES = 1024 * 1024
"""The largest answer a webhook endpoint may give (its first KiB is kept with the attempt)."""


async def _nothing() -> None:
    """A background round with nothing to do."""


async def _listening(setting: str, address: str | None, start: Callable[[], Awaitable[object]]) -> None:
    """Start an HTTP listener of the processor; StartupError naming the setting when its address is unusable."""
    try:
        await start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {setting} {address}: {exc.strerror}") from None


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


@dataclass(frozen=True, slots=True)
class Components:
    """The long-lived objects of one processor, built together by `build` (each gets its dependencies at birth)."""

    store: Store
    telemetry: Telemetry
    secrets: SecretSource
    registry: Registry
    http: HttpClientPool
    recorder: ExecutionRecorder
    sessions: SessionManager
    brokers: BrokerRuntime
    storage: StorageRuntime
    databases: DatabasePools
    notifications: NotificationRuntime
    jobs: JobRuntime
    features: FeatureRuntime
    webhooks: WebhookRuntime
    webhook_receiver: WebhookReceiver
    webhook_pools: tuple[HttpClientPool, HttpClientPool]
    webhook_http: WebhookHttpListener | None
    """The listener of received webhooks, when PROCESSOR_WEBHOOK_HTTP_ADDRESS is set (started once a product
    declares a receive path)."""
    webhook_check: PeriodicTask
    """Starts `webhook_http` once a product declares a receive path."""
    storage_http: StorageHttpListener | None
    """The listener of fs storages' signed URLs, when PROCESSOR_STORAGE_HTTP_ADDRESS is set."""
    cache: ResultCache
    actions: ActionExecutor
    purger: PeriodicTask
    webhook_purger: PeriodicTask
    """Deletes webhook messages, deliveries, attempts and received webhooks older than PROCESSOR_WEBHOOK_RETENTION_S."""
    health: health.aio.HealthServicer
    server: grpc.aio.Server


def build(
    settings: Settings,
    store: Store,
    telemetry: Telemetry,
    secrets: SecretSource,
    keys: SessionKeys,
    clock: Clock | None = None,
) -> Components:
    """The object graph, from the leaves (store, secrets, HTTP pool) up to the gRPC server. No I/O happens here."""
    registry = Registry(store, poll_interval=settings.registry_poll_s, manifest_max_bytes=settings.manifest_max_bytes)
    http = HttpClientPool(max_response_bytes=settings.max_upstream_response_bytes)
    recorder = ExecutionRecorder(store, flush_interval=settings.execution_flush_s)
    sessions = SessionManager(registry, store, keys, revocation_poll_s=settings.session_revocation_poll_s)
    cache = ResultCache(store, secrets)
    services = CallServices(
        registry, store, secrets, recorder, cache, sessions, timedelta(seconds=settings.idempotency_retention_s)
    )
    brokers = BrokerRuntime(services, max_message_bytes=settings.broker_max_message_bytes)
    actions = ActionExecutor(services, http, TokenVault(keys.root_keys()))
    links = StorageLinks(keys.root_keys()) if settings.storage_http_address else None
    storage = StorageRuntime(
        services,
        storage_root=settings.data_dir / "storage",
        max_file_bytes=settings.storage_max_file_bytes,
        max_message_bytes=settings.max_message_bytes,
        signer=links.signer if links is not None else None,
    )
    databases = DatabasePools(secrets, settings.data_dir)
    database_runner = DatabaseRunner(
        services,
        databases,
        max_rows=settings.database_max_rows,
        max_result_bytes=settings.database_max_result_bytes,
    )
    notifications = NotificationRuntime(services, http, storage)
    clock = clock if clock is not None else SystemClock()
    targets = JobTargets(actions, database_runner, notifications, storage, brokers)
    scheduler = JobScheduler(
        store,
        targets,
        clock,
        SchedulerSettings(poll_s=settings.job_poll_s, lease=timedelta(seconds=settings.job_lease_s)),
        telemetry.job_lateness,
    )
    jobs = JobRuntime(registry, store, scheduler, clock)
    webhook_pools = (
        HttpClientPool(max_response_bytes=WEBHOOK_RESPONSE_BYTES, resolve=public_addresses),
        HttpClientPool(max_response_bytes=WEBHOOK_RESPONSE_BYTES),
    )
    deliveries = DeliveryWorker(store, registry, secrets, webhook_pools, clock, DeliverySettings())
    webhooks = WebhookRuntime(services, deliveries, clock, timedelta(seconds=settings.webhook_retention_s))
    features = FeatureRuntime(
        services,
        FeatureSteps(targets, jobs, webhooks),
        clock,
        FeatureSettings(
            poll_s=settings.feature_poll_s,
            lease=timedelta(seconds=settings.feature_lease_s),
            max_wait_s=settings.feature_max_wait_s,
        ),
    )
    targets.serve_features(features)  # jobs run features too
    dispatches = DispatchWorker(
        store,
        registry,
        brokers,
        jobs,
        features,
        clock,
        DispatchSettings(lease=timedelta(seconds=settings.webhook_dispatch_lease_s)),
    )
    receiver = WebhookReceiver(registry, store, brokers, secrets, clock, dispatches)
    webhook_http: WebhookHttpListener | None = None
    if settings.webhook_http_address:
        from ductape_processor.api.webhook_http import WebhookHttpListener

        webhook_http = WebhookHttpListener(receiver, settings.webhook_http_address)
    storage_http: StorageHttpListener | None = None
    if links is not None and settings.storage_http_address:
        from ductape_processor.api.storage_http import StorageHttpListener

        storage_http = StorageHttpListener(storage, links, settings.storage_http_address)
    servicers = Servicers(
        product=ProductServicer(registry),
        action=ActionServicer(actions),
        session=SessionServicer(sessions),
        broker=BrokerServicer(brokers, settings.max_message_bytes),
        log=LogServicer(ExecutionQueries(registry, store, recorder.flush)),
        storage=StorageServicer(storage, settings.stream_idle_s),
        database=DatabaseServicer(database_runner),
        migration=MigrationServicer(MigrationRunner(registry, databases)),
        notification=NotificationServicer(notifications),
        job=JobServicer(jobs),
        webhook=WebhookServicer(webhooks, receiver, settings.max_message_bytes),
        feature=FeatureServicer(features),
        health=health.aio.HealthServicer(),
    )
    interceptor = ProcessorInterceptor(
        ApiKeyAuthenticator(settings.api_key_hashes), telemetry, settings.max_message_bytes
    )
    return Components(
        store=store,
        telemetry=telemetry,
        secrets=secrets,
        registry=registry,
        http=http,
        recorder=recorder,
        sessions=sessions,
        brokers=brokers,
        storage=storage,
        databases=databases,
        notifications=notifications,
        jobs=jobs,
        features=features,
        webhooks=webhooks,
        webhook_receiver=receiver,
        webhook_pools=webhook_pools,
        webhook_http=webhook_http,
        webhook_check=PeriodicTask(
            "webhook listener check", settings.registry_poll_s, webhook_http.ensure if webhook_http else _nothing
        ),
        storage_http=storage_http,
        cache=cache,
        actions=actions,
        purger=PeriodicTask("store purge", PURGE_INTERVAL_S, lambda: store.purge_expired(datetime.now(UTC))),
        webhook_purger=PeriodicTask("webhook retention", PURGE_INTERVAL_S, webhooks.purge),
        health=servicers.health,
        server=grpc_server(settings, interceptor, servicers),
    )


class ProcessorApp:
    """One processor instance: `start` checks the settings, builds the components and serves; `stop` drains.

    `store` and `telemetry` replace the ones the settings would make, `clock` the jobs' real clock (tests pass their
    own).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        telemetry: Telemetry | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._telemetry = telemetry
        self._clock = clock
        self._components: Components | None = None
        self.port = 0
        self._stopped = False

    @property
    def components(self) -> Components:
        """The object graph; it exists once `start` got past the settings' checks and opened the store."""
        if self._components is None:
            raise RuntimeError("the processor is not started")
        return self._components

    async def start(self) -> int:
        """Check the settings, open the store, build the components, apply start-up manifests, bind and serve.

        Returns the bound port. Raises StartupError (with what to change) when the processor cannot start.
        """
        secrets, files = self._checked_settings()
        settings = self.settings
        store = (
            self._store
            if self._store is not None
            else open_store(settings.store, settings.data_dir, settings.store_schema)
        )
        try:
            await store.open()
        except Exception as exc:  # any driver error: the operator needs the cause, not a traceback
            raise StartupError(f"cannot open the {store.dialect} store: {type(exc).__name__}: {exc}") from None
        try:
            keys = self._session_keys()
        except BaseException:
            await store.close()
            raise
        telemetry = self._telemetry if self._telemetry is not None else setup_telemetry()
        self._components = parts = build(settings, store, telemetry, secrets, keys, self._clock)
        try:
            await parts.registry.start()
            await parts.sessions.start_watching()
            parts.recorder.start()
            parts.purger.start()
            parts.webhook_purger.start()
            for path in files:
                await self._apply_file(parts, path)
            await parts.jobs.start()
            await parts.webhooks.worker.start()
            parts.webhook_receiver.dispatches.start()
            await parts.features.start()
            try:
                self.port = listen(parts.server, settings)
            except ListenError as exc:
                raise StartupError(str(exc)) from None
            await parts.server.start()
            if parts.storage_http is not None:
                await _listening("storage_http_address", settings.storage_http_address, parts.storage_http.start)
            if parts.webhook_http is not None:
                await _listening("webhook_http_address", settings.webhook_http_address, parts.webhook_http.ensure)
                parts.webhook_check.start()
        except BaseException:
            self._stopped = True  # released here: a later stop() has nothing left to do
            await self._release(parts)
            raise
        await set_serving(parts.health)
        log.info(
            "serving",
            extra={
                "address": settings.address,
                "port": self.port,
                "store": store.dialect,
                "tls": settings.tls_enabled,
                "api_keys": len(settings.api_key_hashes),
            },
        )
        return self.port

    def _checked_settings(self) -> tuple[SecretSource, list[Path]]:
        """Refuse settings the processor cannot serve with; returns the secret source and the start-up manifests."""
        settings = self.settings
        problems = settings.exposure_problems()
        if problems:
            transport = any("TLS is off" in p or "client authentication" in p for p in problems)
            hint = " Pass --insecure to serve like this anyway." if transport else ""
            raise StartupError("refusing to serve: " + "; ".join(problems) + "." + hint)
        try:
            secrets = SecretSource.from_settings(settings.secrets_file)
        except SecretsFileError as exc:
            raise StartupError(str(exc)) from None
        files = manifest_files(settings.manifests)
        if settings.store == "sqlite" or not settings.session_keys:
            try:  # the data directory is in use: the store's files or the generated session key live there
                private_directory(settings.data_dir, tighten=True)
            except OSError as exc:
                raise StartupError(f"cannot prepare the data directory {settings.data_dir}: {exc.strerror}") from None
        return secrets, files

    def _session_keys(self) -> SessionKeys:
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
        return keys

    async def _apply_file(self, parts: Components, path: Path) -> None:
        source = await asyncio.to_thread(path.read_bytes)
        fmt = ManifestFormat.JSON if path.suffix == ".json" else ManifestFormat.YAML
        try:
            record, created = await parts.registry.apply(source, fmt)
        except ProcessorError as exc:
            problems = exc.problems if isinstance(exc, InvalidManifest) else exc.violations
            listed = "\n".join(f"  {v.field or '(document)'}: {v.description}" for v in problems)
            more = exc.total - len(problems) if isinstance(exc, InvalidManifest) else 0
            listed += f"\n  … and {more} more problems" if more else ""
            raise StartupError(f"manifest {path} is invalid:\n{listed}") from None
        document = json.loads(record.document)
        missing = parts.secrets.missing(referenced_secrets(document))
        log.info(
            "manifest applied",
            extra={"file": str(path), "product": record.product, "version": record.version, "new_version": created},
        )
        if missing:
            log.warning(
                "manifest references secrets no source defines yet",
                extra={"product": record.product, "secret_names": missing},
            )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, let calls in flight finish within `grace`, then release everything."""
        if self._stopped:
            return
        self._stopped = True
        parts = self._components
        if parts is None:  # never started: nothing was built
            return
        await parts.health.enter_graceful_shutdown()
        await parts.brokers.shutdown_streams()  # streams end with UNAVAILABLE; unacked messages go back
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        await parts.server.stop(grace)
        # Dispatches going finish within the grace (else: their leases run out), first: they start feature runs and
        # schedule jobs, which this replica still runs.
        await parts.webhook_receiver.dispatches.stop(grace)
        await parts.features.stop(grace)  # runs going finish within the grace; the others' leases are released
        await parts.jobs.stop(grace)  # runs going finish within the grace; their targets are still open
        await parts.webhooks.worker.stop(grace)  # attempts going finish within the grace (else: leases run out)
        await self._release(parts)
        log.info("stopped")

    async def _release(self, parts: Components) -> None:
        if parts.storage_http is not None:
            await parts.storage_http.stop()
        await parts.features.stop(0)
        await parts.jobs.stop(0)
        await parts.webhook_check.stop()
        if parts.webhook_http is not None:
            await parts.webhook_http.stop()
        await parts.webhooks.worker.stop(0)
        await parts.webhook_receiver.dispatches.stop(0)
        for pool in parts.webhook_pools:
            await pool.close()
        closers = (
            parts.purger.stop,
            parts.webhook_purger.stop,
            parts.registry.stop,
            parts.sessions.stop_watching,
            parts.recorder.close,  # writes the records still queued: before the store closes
            parts.http.close,
            parts.brokers.close,
            parts.storage.close,
            parts.databases.close,
            parts.notifications.close,
            parts.cache.close,
            parts.store.close,
            parts.telemetry.shutdown,
        )
        for close in closers:
            await close()

    async def wait(self) -> None:
        """Until the server terminates."""
        await self.components.server.wait_for_termination()
