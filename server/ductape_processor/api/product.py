"""ProductService: proto in, registry call, proto out."""

from __future__ import annotations

from ductape.processor.v1 import product_pb2, product_pb2_grpc

from ductape_processor.api.calls import Context
from ductape_processor.api.values import timestamp
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.registry.loader import ManifestFormat
from ductape_processor.runtime.registry.registry import Registry, VersionRecord

ANSWERS_REMEMBERED = 256


def _version(record: VersionRecord, pins: dict[str, int]) -> product_pb2.ProductVersion:
    created = timestamp(record.created_at)
    return product_pb2.ProductVersion(
        product=record.product,
        version=record.version,
        checksum=record.checksum,
        create_time=created,
        pinned_envs=sorted(env for env, version in pins.items() if version == record.version),
    )


def _format(value: int) -> ManifestFormat:
    try:
        return ManifestFormat(value)
    except ValueError:
        raise InvalidArgument.field("format", f"unknown manifest format {value}") from None


def _manifest(manifest: bytes) -> bytes:
    if not manifest.strip():
        raise InvalidArgument.field("manifest", "is empty: send the manifest's YAML or JSON bytes")
    return manifest


def _product(product: str) -> str:
    if not product:
        raise InvalidArgument.field("product", "is required: the product's tag")
    if len(product) > 64:
        raise InvalidArgument.field("product", "is longer than 64 characters")
    return product


class ProductServicer(product_pb2_grpc.ProductServiceServicer):
    """Serves the product registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # Get answers for unchanged (version, pins): versions are immutable, so an answer is reusable as is.
        self._answers: BoundedCache[tuple[str, int, tuple[tuple[str, int], ...]], product_pb2.GetResponse] = (
            BoundedCache(ANSWERS_REMEMBERED)
        )

    async def Apply(self, request: product_pb2.ApplyRequest, context: Context) -> product_pb2.ApplyResponse:
        record, created = await self._registry.apply(_manifest(request.manifest), _format(request.format))
        state = await self._registry.state(record.product)
        return product_pb2.ApplyResponse(version=_version(record, state.pins), created=created)

    async def Validate(self, request: product_pb2.ValidateRequest, context: Context) -> product_pb2.ValidateResponse:
        result = await self._registry.validate(_manifest(request.manifest), _format(request.format))
        return product_pb2.ValidateResponse(
            valid=not result.problems,
            problems=[product_pb2.ManifestProblem(path=p.field, message=p.description) for p in result.problems],
            product=result.product,
            checksum=result.checksum,
            omitted_problems=result.total - len(result.problems),
        )

    async def Get(self, request: product_pb2.GetRequest, context: Context) -> product_pb2.GetResponse:
        product = _product(request.product)
        selector = request.WhichOneof("selector")
        if selector == "version" and request.version <= 0:
            raise InvalidArgument.field("version", "must be 1 or more")
        if selector == "env" and not request.env:
            raise InvalidArgument.field("env", "is empty: give an environment slug or name, or leave it unset")
        record, pins = await self._registry.get(
            product,
            version=request.version if selector == "version" else None,
            env=request.env if selector == "env" else None,
        )
        key = (record.product, record.version, tuple(sorted(pins.items())))
        answer = self._answers.get(key)
        if answer is None:
            answer = product_pb2.GetResponse(
                version=_version(record, pins),
                manifest=record.source,
                format=record.format,  # type: ignore[arg-type]
                pins=pins,
            )
            self._answers.put(key, answer)
        return answer

    async def ListVersions(
        self, request: product_pb2.ListVersionsRequest, context: Context
    ) -> product_pb2.ListVersionsResponse:
        records, token, pins = await self._registry.list_versions(
            _product(request.product), request.page_size, request.page_token
        )
        return product_pb2.ListVersionsResponse(
            versions=[_version(record, pins) for record in records], next_page_token=token
        )

    async def Promote(self, request: product_pb2.PromoteRequest, context: Context) -> product_pb2.PromoteResponse:
        product = _product(request.product)
        if not request.env:
            raise InvalidArgument.field("env", "is required: the environment's slug or name")
        slug, previous = await self._registry.promote(product, request.env, request.version)
        return product_pb2.PromoteResponse(
            product=product, env=slug, version=request.version, previous_version=previous or 0
        )
