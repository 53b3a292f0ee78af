"""ProductService through a real server and channel, via the Python client."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from ductape.processor import InvalidArgumentError, NotFoundError
from ductape.processor.v1 import product_pb2, product_pb2_grpc

from ductape_processor.runtime.registry.loader import ManifestFormat, parse_document
from tests.conftest import EXAMPLE, Running, ServerFactory


def manifest(version_note: str = "", **extra: object) -> bytes:
    document = parse_document(EXAMPLE.read_bytes(), ManifestFormat.YAML)
    if version_note:
        document["description"] = version_note
    document.update(extra)
    return json.dumps(document).encode()


async def test_apply_then_get_returns_the_manifest_as_applied(server: Running) -> None:
    applied = await server.client.product.apply(EXAMPLE)
    assert applied.created and applied.version.version == 1 and applied.version.product == "shop"
    assert len(applied.version.checksum) == 64
    got = await server.client.product.get("shop")
    assert got.manifest == EXAMPLE.read_bytes()
    assert got.format == product_pb2.MANIFEST_FORMAT_YAML
    assert got.version.version == 1 and got.version.checksum == applied.version.checksum
    assert got.version.create_time.seconds > 0


async def test_identical_reapply_creates_no_version(server: Running) -> None:
    first = await server.client.product.apply(EXAMPLE)
    again = await server.client.product.apply(EXAMPLE)
    as_json = await server.client.product.apply(manifest())
    assert (again.created, again.version.version) == (False, 1)
    assert (as_json.created, as_json.version.version) == (False, 1), "same content in JSON is identical"
    assert again.version.checksum == first.version.checksum
    changed = await server.client.product.apply(manifest("second"))
    assert (changed.created, changed.version.version) == (True, 2)


async def test_concurrent_applies_get_distinct_versions(server: Running) -> None:
    results = await asyncio.gather(*(server.client.product.apply(manifest(f"v{n}")) for n in range(12)))
    assert sorted(r.version.version for r in results) == list(range(1, 13))
    listed = [v async for v in server.client.product.versions("shop", page_size=5)]
    assert [v.version for v in listed] == list(range(12, 0, -1))


async def test_promote_pins_an_env_and_older_versions_roll_back(server: Running) -> None:
    await server.client.product.apply(manifest("one"))
    await server.client.product.apply(manifest("two"))
    assert (await server.client.product.get("shop", env="prd")).version.version == 2, "no pin: latest"
    promoted = await server.client.product.promote("shop", env="production", version=1)
    assert (promoted.env, promoted.version, promoted.previous_version) == ("prd", 1, 0)
    pinned = await server.client.product.get("shop", env="prd")
    assert pinned.version.version == 1 and dict(pinned.pins) == {"prd": 1}
    assert list(pinned.version.pinned_envs) == ["prd"]
    assert (await server.client.product.get("shop", env="dev")).version.version == 2
    await server.client.product.apply(manifest("three"))
    assert (await server.client.product.get("shop", env="production")).version.version == 1, "pin holds"
    again = await server.client.product.promote("shop", env="prd", version=3)
    assert again.previous_version == 1
    assert (await server.client.product.get("shop", env="prd")).version.version == 3


async def test_get_by_version(server: Running) -> None:
    await server.client.product.apply(manifest("one"))
    await server.client.product.apply(manifest("two"))
    old = await server.client.product.get("shop", version=1)
    assert json.loads(old.manifest)["description"] == "one"
    assert old.format == product_pb2.MANIFEST_FORMAT_JSON


async def test_list_versions_pages_with_tokens(server: Running) -> None:
    for n in range(5):
        await server.client.product.apply(manifest(f"v{n}"))
    first = await server.client.product.list_versions("shop", page_size=2)
    assert [v.version for v in first.versions] == [5, 4] and first.next_page_token
    second = await server.client.product.list_versions("shop", page_size=2, page_token=first.next_page_token)
    assert [v.version for v in second.versions] == [3, 2]
    third = await server.client.product.list_versions("shop", page_size=2, page_token=second.next_page_token)
    assert [v.version for v in third.versions] == [1] and third.next_page_token == ""
    everything = await server.client.product.list_versions("shop")
    assert len(everything.versions) == 5 and everything.next_page_token == ""


async def test_validate_lists_problems_and_stores_nothing(server: Running) -> None:
    result = await server.client.product.validate(
        b"product: shop\nenvironments: [{slug: dev}]\napps: [{tag: a, envs: {}, colour: red}]\n"
    )
    assert not result.valid and result.product == "shop" and result.checksum == ""
    found = {p.path: p.message for p in result.problems}
    assert "unknown field" in found["apps[0].colour"]
    assert "no configuration for environment 'dev'" not in found.get("apps[0].envs", "")
    good = await server.client.product.validate(EXAMPLE)
    assert good.valid and not good.problems and len(good.checksum) == 64
    with pytest.raises(NotFoundError):
        await server.client.product.get("shop")


async def test_invalid_apply_is_invalid_argument_with_each_problem(server: Running) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.product.apply(b"product: shop\nenvironments: [{slug: dev}]\nqueues: []\ncaches: [{}]\n")
    error = caught.value
    assert error.reason == "INVALID_MANIFEST" and error.domain == "processor.ductape.dev"
    fields = {v.field: v.description for v in error.field_violations}
    assert "unknown field" in fields["queues"]
    assert fields["caches[0].tag"] == "required field is missing"
    assert fields["caches[0].ttl"] == "required field is missing"
    assert error.request_id


@pytest.mark.parametrize(
    ("call", "reason", "field"),
    [
        (lambda c: c.product.apply(b"   "), "INVALID_ARGUMENT", "manifest"),
        (lambda c: c.product.get(""), "INVALID_ARGUMENT", "product"),
        (lambda c: c.product.get("shop", version=0), "INVALID_ARGUMENT", None),
        (lambda c: c.product.list_versions("shop", page_size=-1), "INVALID_ARGUMENT", "page_size"),
        (lambda c: c.product.list_versions("shop", page_token="garbage"), "INVALID_ARGUMENT", "page_token"),
        (lambda c: c.product.promote("shop", env="", version=1), "INVALID_ARGUMENT", "env"),
        (lambda c: c.product.promote("shop", env="prd", version=0), "INVALID_ARGUMENT", "version"),
    ],
)
async def test_bad_requests_name_the_field(server: Running, call, reason: str, field: str | None) -> None:  # type: ignore[no-untyped-def]
    await server.client.product.apply(EXAMPLE)
    with pytest.raises(InvalidArgumentError) as caught:
        await call(server.client)
    assert caught.value.reason == reason
    if field is not None:
        assert [v.field for v in caught.value.field_violations] == [field]


async def test_missing_things_are_not_found_with_their_reason(server: Running) -> None:
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.get("nope")
    assert caught.value.reason == "PRODUCT_NOT_FOUND" and caught.value.metadata == {"product": "nope"}
    await server.client.product.apply(EXAMPLE)
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.get("shop", version=9)
    assert caught.value.reason == "VERSION_NOT_FOUND" and caught.value.metadata["latest_version"] == "1"
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.get("shop", env="staging")
    assert caught.value.reason == "ENV_NOT_FOUND" and "dev, prd" in caught.value.message
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.promote("shop", env="staging", version=1)
    assert caught.value.reason == "ENV_NOT_FOUND"
    with pytest.raises(NotFoundError) as caught:
        await server.client.product.promote("shop", env="prd", version=2)
    assert caught.value.reason == "VERSION_NOT_FOUND"


async def test_a_product_applied_after_a_miss_is_found(server: Running) -> None:
    with pytest.raises(NotFoundError):
        await server.client.product.get("shop")
    await server.client.product.apply(EXAMPLE)
    assert (await server.client.product.get("shop")).version.version == 1


async def test_an_env_removed_later_still_runs_its_pinned_version(server: Running) -> None:
    await server.client.product.apply(EXAMPLE)
    await server.client.product.promote("shop", env="prd", version=1)
    only_dev = manifest(environments=[{"slug": "dev"}])
    document = json.loads(only_dev)
    for kind in ("apps", "brokers", "storage", "databases", "notifications"):
        for item in document[kind]:
            item["envs"] = {"dev": item["envs"]["dev"]}
    document["apps"][0]["variables"].pop("prd")
    await server.client.product.apply(json.dumps(document).encode())
    assert (await server.client.product.get("shop", env="prd")).version.version == 1
    resolved = await server.app.components.registry.resolve("shop", "production")
    assert (resolved.version, resolved.env.slug) == (1, "prd")


async def test_oversized_manifest_is_refused(start_server: ServerFactory) -> None:
    running = await start_server(max_message_bytes=64 * 1024)
    big = manifest("x" * (100 * 1024))
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = product_pb2_grpc.ProductServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Apply(product_pb2.ApplyRequest(manifest=big))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
