"""The async facade: `Processor` and one small client per resource, reading like Ductape's docs.

async with Processor("127.0.0.1:50051", api_key="...") as processor:
    version = await processor.product.apply("examples/shop.yaml")
    await processor.product.promote("shop", env="prd", version=version.version)

Every method takes `metadata=`: gRPC metadata for that call only, such as the caller's W3C `traceparent` (the
server's span becomes its child) or its own `x-request-id` (the server logs the call under it and returns it in the
error's `request_id`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
from ductape.processor.brokers import BrokerClient
from ductape.processor.calls import Caller, CallMetadata, ResourceClient, RunOptions, every_item
from ductape.processor.databases import DatabaseClient, MigrationClient
from ductape.processor.features import FeatureClient
from ductape.processor.jobs import JobClient
from ductape.processor.notifications import NotificationClient
from ductape.processor.storage import StorageClient
from ductape.processor.v1 import (
    action_pb2,
    action_pb2_grpc,
    broker_pb2_grpc,
    database_pb2_grpc,
    feature_pb2_grpc,
    job_pb2_grpc,
    log_pb2,
    log_pb2_grpc,
    migration_pb2_grpc,
    notification_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    storage_pb2_grpc,
    webhook_pb2_grpc,
)
from ductape.processor.values import SessionLike, record_from
from ductape.processor.values import plain as _plain
from ductape.processor.values import session_ref as _session
from ductape.processor.values import struct as _struct
from ductape.processor.webhooks import WebhookClient
from google.protobuf import json_format

ManifestSource = str | os.PathLike[str] | bytes

_FORMATS = {
    ".json": product_pb2.MANIFEST_FORMAT_JSON,
    ".yaml": product_pb2.MANIFEST_FORMAT_YAML,
    ".yml": product_pb2.MANIFEST_FORMAT_YAML,
}


class _Manifest(TypedDict):
    manifest: bytes
    format: product_pb2.ManifestFormat.ValueType


def _manifest(manifest: ManifestSource) -> _Manifest:
    """Bytes are sent as they are (format detected by the server); a path is read and its suffix names the format."""
    if isinstance(manifest, bytes):
        return {"manifest": manifest, "format": product_pb2.MANIFEST_FORMAT_UNSPECIFIED}
    path = Path(manifest)
    fmt = _FORMATS.get(path.suffix.lower(), product_pb2.MANIFEST_FORMAT_UNSPECIFIED)
    return {"manifest": path.read_bytes(), "format": fmt}


@dataclass(frozen=True, slots=True)
class ActionResult:
    """An action's answer: the upstream's status, headers and body (parsed JSON, or bytes), and how it was got."""

    status_code: int
    headers: dict[str, str]
    body: Any
    content_type: str
    process_id: str
    attempts: int
    cached: bool
    version: int

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status_code < 300


class ActionClient(ResourceClient):
    """Runs actions: `await processor.action.run(product=..., env=..., app=..., event=..., input={...})`."""

    _stub: action_pb2_grpc.ActionServiceAsyncStub

    async def run(
        self,
        *,
        product: str,
        env: str,
        app: str,
        event: str,
        input: Mapping[str, Mapping[str, Any]] | None = None,
        session: SessionLike | None = None,
        timeout: float | None = None,
        metadata: CallMetadata | None = None,
        **options: Unpack[RunOptions],
    ) -> ActionResult:
        """Run an action. `input` has the parts `query`, `params`, `body` and `headers`."""
        parts = dict(input or {})
        request = action_pb2.RunRequest(
            product=product,
            env=env,
            app=app,
            event=event,
            input=action_pb2.ActionInput(
                query=_struct(parts.get("query")),
                params=_struct(parts.get("params")),
                body=_struct(parts.get("body")),
                headers=_struct(parts.get("headers")),
            ),
            session=_session(session),
            **options,
        )
        response = await self._call(self._stub.Run, request, timeout, metadata)
        body: Any = response.raw
        if response.WhichOneof("body") == "json":
            body = _plain(json_format.MessageToDict(response.json))
        return record_from(ActionResult, response, headers=dict(response.headers), body=body)


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: its data, id, the user's identifier and when the token expires."""

    data: dict[str, Any]
    session_id: str
    identifier: str
    expires_at: datetime


class SessionClient(ResourceClient):
    """User sessions: `start`, `verify` (Ductape's `decrypt`), `refresh`, `revoke`, `list_active`."""

    _stub: session_pb2_grpc.SessionServiceAsyncStub

    async def start(
        self, *, product: str, env: str, tag: str, data: Mapping[str, Any], metadata: CallMetadata | None = None
    ) -> session_pb2.TokenPair:
        """Start a session for `data`; returns `token`, `refresh_token`, `session_id` and expiry times."""
        request = session_pb2.StartRequest(product=product, env=env, tag=tag, data=_struct(data))
        return (await self._call(self._stub.Start, request, metadata=metadata)).tokens

    async def verify(
        self, *, product: str, env: str, tag: str, token: str, metadata: CallMetadata | None = None
    ) -> Session:
        """The session a token carries; raises UnauthenticatedError (SESSION_INVALID/EXPIRED/REVOKED)."""
        response = await self._call(
            self._stub.Verify,
            session_pb2.VerifyRequest(product=product, env=env, tag=tag, token=token),
            metadata=metadata,
            safe=True,
        )
        return record_from(
            Session,
            response,
            data=_plain(json_format.MessageToDict(response.data)),
            expires_at=response.expire_time.ToDatetime(UTC),
        )

    decrypt = verify

    async def refresh(
        self, *, product: str, env: str, tag: str, refresh_token: str, metadata: CallMetadata | None = None
    ) -> session_pb2.TokenPair:
        """A new token pair; the refresh token given stops working."""
        request = session_pb2.RefreshRequest(product=product, env=env, tag=tag, refresh_token=refresh_token)
        return (await self._call(self._stub.Refresh, request, metadata=metadata)).tokens

    async def revoke(
        self,
        *,
        product: str,
        env: str,
        tag: str,
        session_id: str | None = None,
        identifier: str | None = None,
        metadata: CallMetadata | None = None,
    ) -> int:
        """Revoke one session (`session_id`) or every session of a user (`identifier`); returns how many."""
        if (session_id is None) == (identifier is None):
            raise ValueError("give exactly one of session_id and identifier")
        request = session_pb2.RevokeRequest(product=product, env=env, tag=tag)
        if session_id is not None:
            request.session_id = session_id
        else:
            request.identifier = identifier or ""
        return (await self._call(self._stub.Revoke, request, metadata=metadata)).revoked

    async def list_active(
        self,
        *,
        product: str,
        env: str,
        tag: str,
        identifier: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
    ) -> session_pb2.ListActiveResponse:
        """One page of active sessions, newest first."""
        return await self._call(
            self._stub.ListActive,
            session_pb2.ListActiveRequest(
                product=product, env=env, tag=tag, identifier=identifier, page_size=page_size, page_token=page_token
            ),
            metadata=metadata,
            safe=True,
        )


_STATUSES: dict[str, log_pb2.ExecutionStatus.ValueType] = {
    "": log_pb2.EXECUTION_STATUS_UNSPECIFIED,
    "success": log_pb2.EXECUTION_STATUS_SUCCESS,
    "fail": log_pb2.EXECUTION_STATUS_FAIL,
}


class LogClient(ResourceClient):
    """Reads the execution log."""

    _stub: log_pb2_grpc.LogServiceAsyncStub

    async def list_executions(
        self,
        *,
        product: str,
        env: str = "",
        resource: str = "",
        status: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: CallMetadata | None = None,
    ) -> log_pb2.ListExecutionsResponse:
        """One page of executions, newest first; `status` is "success", "fail" or "" (any)."""
        if status not in _STATUSES:
            raise ValueError('status must be "success", "fail" or ""')
        return await self._call(
            self._stub.ListExecutions,
            log_pb2.ListExecutionsRequest(
                product=product,
                env=env,
                resource=resource,
                status=_STATUSES[status],
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=metadata,
            safe=True,
        )


class ProductClient(ResourceClient):
    """The product registry: apply, validate, read and promote manifests."""

    _stub: product_pb2_grpc.ProductServiceAsyncStub

    async def apply(
        self, manifest: ManifestSource, *, metadata: CallMetadata | None = None
    ) -> product_pb2.ApplyResponse:
        """Store a manifest (a path, or YAML/JSON bytes) as the product's next version."""
        request = product_pb2.ApplyRequest(**_manifest(manifest))
        return await self._call(self._stub.Apply, request, metadata=metadata, safe=True)

    async def validate(
        self, manifest: ManifestSource, *, metadata: CallMetadata | None = None
    ) -> product_pb2.ValidateResponse:
        """Every problem of a manifest, without storing it."""
        request = product_pb2.ValidateRequest(**_manifest(manifest))
        return await self._call(self._stub.Validate, request, metadata=metadata, safe=True)

    async def get(
        self,
        product: str,
        *,
        version: int | None = None,
        env: str | None = None,
        metadata: CallMetadata | None = None,
    ) -> product_pb2.GetResponse:
        """A version of the product: `version`, the one pinned for `env`, or the latest."""
        request = product_pb2.GetRequest(product=product)
        if version is not None:
            request.version = version
        elif env is not None:
            request.env = env
        return await self._call(self._stub.Get, request, metadata=metadata, safe=True)

    async def list_versions(
        self, product: str, *, page_size: int = 0, page_token: str = "", metadata: CallMetadata | None = None
    ) -> product_pb2.ListVersionsResponse:
        """One page of versions, newest first."""
        return await self._call(
            self._stub.ListVersions,
            product_pb2.ListVersionsRequest(product=product, page_size=page_size, page_token=page_token),
            metadata=metadata,
            safe=True,
        )

    def versions(
        self, product: str, *, page_size: int = 0, metadata: CallMetadata | None = None
    ) -> AsyncIterator[product_pb2.ProductVersion]:
        """Every version, newest first, fetching pages as needed (each page call carries `metadata`)."""

        async def page(token: str) -> product_pb2.ListVersionsResponse:
            return await self.list_versions(product, page_size=page_size, page_token=token, metadata=metadata)

        return every_item(page, lambda listed: listed.versions)

    async def promote(
        self, product: str, *, env: str, version: int, metadata: CallMetadata | None = None
    ) -> product_pb2.PromoteResponse:
        """Pin `env` (slug or name) to `version`; promoting an older version rolls back."""
        return await self._call(
            self._stub.Promote,
            product_pb2.PromoteRequest(product=product, env=env, version=version),
            metadata=metadata,
        )


class Processor:
    """A connection to a processor and its resource clients.

    `address` is host:port. `api_key` is sent as `authorization: Bearer <key>`. `root_certificates` (PEM) turns
    TLS on; `certificate_chain` and `private_key` add a client certificate (mTLS). `timeout` is the default
    deadline of each call in seconds. `retries`: how many more times a call that is safe to repeat (a read, or a call
    with an `idempotency_key`) is tried after UNAVAILABLE, within its timeout (0: never). Pass `channel` to use a
    channel you built. `db` is `database` under Ductape's name (`processor.db.run(...)`).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float | None = 30.0,
        retries: int = 3,
        channel: grpc.aio.Channel | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if channel is None:
            if tls or root_certificates is not None or certificate_chain is not None:
                credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
                channel = grpc.aio.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
        self.channel = channel
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        call = Caller(metadata, timeout, retries)
        self.product = ProductClient(product_pb2_grpc.ProductServiceStub(channel), call)
        self.action = ActionClient(action_pb2_grpc.ActionServiceStub(channel), call)
        self.session = SessionClient(session_pb2_grpc.SessionServiceStub(channel), call)
        self.message_broker = BrokerClient(broker_pb2_grpc.BrokerServiceStub(channel), call)
        self.logs = LogClient(log_pb2_grpc.LogServiceStub(channel), call)
        self.storage = StorageClient(storage_pb2_grpc.StorageServiceStub(channel), call)
        self.database = DatabaseClient(database_pb2_grpc.DatabaseServiceStub(channel), call)
        self.db = self.database
        self.migration = MigrationClient(migration_pb2_grpc.MigrationServiceStub(channel), call)
        self.notification = NotificationClient(notification_pb2_grpc.NotificationServiceStub(channel), call)
        self.job = JobClient(job_pb2_grpc.JobServiceStub(channel), call)
        self.webhook = WebhookClient(webhook_pb2_grpc.WebhookServiceStub(channel), call)
        self.feature = FeatureClient(feature_pb2_grpc.FeatureServiceStub(channel), call)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> Processor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
