"""The async facade: `Processor` and one small client per resource, reading like Ductape's docs.

async with Processor("127.0.0.1:50051", api_key="...") as processor:
    version = await processor.product.apply("examples/shop.yaml")
    await processor.product.promote("shop", env="prd", version=version.version)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from ductape.processor.errors import from_rpc_error
from ductape.processor.v1 import product_pb2, product_pb2_grpc

Response = TypeVar("Response")
ManifestSource = str | os.PathLike[str] | bytes

_FORMATS = {
    ".json": product_pb2.MANIFEST_FORMAT_JSON,
    ".yaml": product_pb2.MANIFEST_FORMAT_YAML,
    ".yml": product_pb2.MANIFEST_FORMAT_YAML,
}


def _manifest_bytes(manifest: ManifestSource) -> tuple[bytes, product_pb2.ManifestFormat.ValueType]:
    """Bytes are sent as they are (format detected by the server); a path is read and its suffix names the format."""
    if isinstance(manifest, bytes):
        return manifest, product_pb2.MANIFEST_FORMAT_UNSPECIFIED
    path = Path(manifest)
    return path.read_bytes(), _FORMATS.get(path.suffix.lower(), product_pb2.MANIFEST_FORMAT_UNSPECIFIED)


class _Caller:
    """Adds the API key and the default timeout to each call, and raises typed errors."""

    def __init__(self, metadata: Sequence[tuple[str, str]], timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._timeout = timeout

    async def __call__(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout: float | None = None
    ) -> Response:
        try:
            return await method(request, metadata=self._metadata, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


class ProductClient:
    """The product registry: apply, validate, read and promote manifests."""

    def __init__(self, channel: grpc.aio.Channel, call: _Caller) -> None:
        self._stub = product_pb2_grpc.ProductServiceStub(channel)
        self._call = call

    async def apply(self, manifest: ManifestSource) -> product_pb2.ApplyResponse:
        """Store a manifest (a path, or YAML/JSON bytes) as the product's next version."""
        data, fmt = _manifest_bytes(manifest)
        return await self._call(self._stub.Apply, product_pb2.ApplyRequest(manifest=data, format=fmt))

    async def validate(self, manifest: ManifestSource) -> product_pb2.ValidateResponse:
        """Every problem of a manifest, without storing it."""
        data, fmt = _manifest_bytes(manifest)
        return await self._call(self._stub.Validate, product_pb2.ValidateRequest(manifest=data, format=fmt))

    async def get(self, product: str, *, version: int | None = None, env: str | None = None) -> product_pb2.GetResponse:
        """A version of the product: `version`, the one pinned for `env`, or the latest."""
        request = product_pb2.GetRequest(product=product)
        if version is not None:
            request.version = version
        elif env is not None:
            request.env = env
        return await self._call(self._stub.Get, request)

    async def list_versions(
        self, product: str, *, page_size: int = 0, page_token: str = ""
    ) -> product_pb2.ListVersionsResponse:
        """One page of versions, newest first."""
        return await self._call(
            self._stub.ListVersions,
            product_pb2.ListVersionsRequest(product=product, page_size=page_size, page_token=page_token),
        )

    async def versions(self, product: str, *, page_size: int = 0) -> AsyncIterator[product_pb2.ProductVersion]:
        """Every version, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = await self.list_versions(product, page_size=page_size, page_token=token)
            for version in page.versions:
                yield version
            token = page.next_page_token
            if not token:
                return

    async def promote(self, product: str, *, env: str, version: int) -> product_pb2.PromoteResponse:
        """Pin `env` (slug or name) to `version`; promoting an older version rolls back."""
        return await self._call(
            self._stub.Promote, product_pb2.PromoteRequest(product=product, env=env, version=version)
        )


class Processor:
    """A connection to a processor and its resource clients.

    `address` is host:port. `api_key` is sent as `authorization: Bearer <key>`. `root_certificates` (PEM) turns
    TLS on; `certificate_chain` and `private_key` add a client certificate (mTLS). `timeout` is the default
    deadline of each call in seconds. Pass `channel` to use a channel you built.
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
        call = _Caller(metadata, timeout)
        self.product = ProductClient(channel, call)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> Processor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
