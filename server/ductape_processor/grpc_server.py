"""The gRPC server of one processor: channel options, TLS credentials, the interceptor, servicers, health, reflection.

The composition root (app.py) builds the servicers; this module only puts them on a server and binds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, cast

import grpc
from ductape.processor.v1 import (
    action_pb2,
    action_pb2_grpc,
    broker_pb2,
    database_pb2,
    database_pb2_grpc,
    feature_pb2,
    feature_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    log_pb2,
    log_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    notification_pb2,
    notification_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ductape_processor.api.action import ActionServicer
from ductape_processor.api.broker import BrokerServicer
from ductape_processor.api.broker import add_to_server as add_broker_servicer
from ductape_processor.api.database import DatabaseServicer
from ductape_processor.api.feature import FeatureServicer
from ductape_processor.api.interceptor import ProcessorInterceptor
from ductape_processor.api.job import JobServicer
from ductape_processor.api.log import LogServicer
from ductape_processor.api.migration import MigrationServicer
from ductape_processor.api.notification import NotificationServicer
from ductape_processor.api.product import ProductServicer
from ductape_processor.api.reflection import enable_reflection
from ductape_processor.api.session import SessionServicer
from ductape_processor.api.storage import StorageServicer
from ductape_processor.api.webhook import WebhookServicer
from ductape_processor.settings import Settings

_SERVICES: Final[dict[str, tuple[ModuleType, Callable[[Any, grpc.aio.Server], None]]]] = {
    "product": (product_pb2, product_pb2_grpc.add_ProductServiceServicer_to_server),
    "action": (action_pb2, action_pb2_grpc.add_ActionServiceServicer_to_server),
    "log": (log_pb2, log_pb2_grpc.add_LogServiceServicer_to_server),
    "session": (session_pb2, session_pb2_grpc.add_SessionServiceServicer_to_server),
    "broker": (broker_pb2, add_broker_servicer),
    "storage": (storage_pb2, storage_pb2_grpc.add_StorageServiceServicer_to_server),
    "database": (database_pb2, database_pb2_grpc.add_DatabaseServiceServicer_to_server),
    "migration": (migration_pb2, migration_pb2_grpc.add_MigrationServiceServicer_to_server),
    "notification": (notification_pb2, notification_pb2_grpc.add_NotificationServiceServicer_to_server),
    "job": (job_pb2, job_pb2_grpc.add_JobServiceServicer_to_server),
    "webhook": (webhook_pb2, webhook_pb2_grpc.add_WebhookServiceServicer_to_server),
    "feature": (feature_pb2, feature_pb2_grpc.add_FeatureServiceServicer_to_server),
}
"""Per field of `Servicers` (but health): the proto module of its service (one service a file) and the generated
function that puts the servicer on a server."""
SERVICE_NAMES = tuple(
    service.full_name for module, _ in _SERVICES.values() for service in module.DESCRIPTOR.services_by_name.values()
)
"""The processor's services, as health checks and reflection name them."""


@dataclass(frozen=True, slots=True)
class Servicers:
    """One servicer per proto service, and the health service a load balancer asks."""

    product: ProductServicer
    action: ActionServicer
    session: SessionServicer
    broker: BrokerServicer
    log: LogServicer
    storage: StorageServicer
    database: DatabaseServicer
    migration: MigrationServicer
    notification: NotificationServicer
    job: JobServicer
    webhook: WebhookServicer
    feature: FeatureServicer
    health: health.aio.HealthServicer


class ListenError(Exception):
    """The address cannot be listened on, or a TLS file cannot be read; the message says which and why."""


class _GenericHandlersOnly:
    """The server as the generated `add_*_to_server` functions see it: their generic handlers go to the interceptor,
    which the server serves as its one generic handler; their registered method handlers are not registered (the
    same handlers, served the same way).

    grpc.aio (1.85) keeps one pending request per registered method and, for every call it accepts, waits on all of
    them at once (`asyncio.wait` over ~50 tasks here: a callback added and removed on each): about 40 µs of CPU per
    call on this server's 48 methods, measured with ActionService.Run (bench/README.md). With generic handlers only
    it keeps one pending request.
    """

    def __init__(self, interceptor: ProcessorInterceptor) -> None:
        self._interceptor = interceptor

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._interceptor.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Not registered: see the class's docstring."""


def grpc_server(settings: Settings, interceptor: ProcessorInterceptor, servicers: Servicers) -> grpc.aio.Server:
    """A server (not yet bound) serving `servicers` behind `interceptor`, with the settings' limits and keepalive."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
    # No grpc.aio interceptors: the interceptor is the server's one generic handler, wrapping each method's handler
    # once (see ProcessorInterceptor).
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    generic = cast(grpc.aio.Server, _GenericHandlersOnly(interceptor))
    for name, (_, add_to_server) in _SERVICES.items():
        add_to_server(getattr(servicers, name), generic)
    health_pb2_grpc.add_HealthServicer_to_server(servicers.health, generic)
    enable_reflection(generic, (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    server.add_generic_rpc_handlers((interceptor,))
    return server


def listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind `server` to the settings' address (with TLS when configured); returns the bound port."""
    credentials = _server_credentials(settings)
    try:
        if credentials is not None:
            return server.add_secure_port(settings.address, credentials)
        return server.add_insecure_port(settings.address)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {settings.address}: {exc}") from None


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ListenError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def set_serving(servicer: health.aio.HealthServicer) -> None:
    """Report every service (and the server as a whole, the empty name) SERVING."""
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
