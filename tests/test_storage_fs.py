"""The fs provider's own promises: no key leaves its folder, symbolic links included."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from ductape.processor import FailedPreconditionError, InvalidArgumentError

from tests.conftest import Running, ServerFactory
from tests.test_storage import PRODUCT, TAG, manifest, where


@pytest.fixture
async def fs_running(start_server: ServerFactory, tmp_path: Path) -> tuple[Running, Path]:
    server = await start_server(storage_http_address="127.0.0.1:0")
    await server.client.product.apply(manifest({"provider": "fs"}))
    await server.client.storage.save(**where(), file_name="first", data=b"1")  # makes the folder
    return server, tmp_path / "data0" / "storage" / PRODUCT / TAG / "dev"


async def test_a_symlinked_folder_cannot_take_a_save_outside(fs_running: tuple[Running, Path], tmp_path: Path) -> None:
    server, root = fs_running
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "out").symlink_to(outside)
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.storage.save(**where(), file_name="out/x.txt", data=b"escaped")
    assert caught.value.reason == "FILE_NAME_INVALID"
    with pytest.raises(InvalidArgumentError):
        await server.client.storage.upload([b"escaped"], **where(), file_name="out/deeper/x.txt")
    assert list(outside.iterdir()) == []


async def test_a_symlinked_file_is_never_followed(fs_running: tuple[Running, Path], tmp_path: Path) -> None:
    server, root = fs_running
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not read")
    (root / "link.txt").symlink_to(secret)
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.storage.read(**where(), file_name="link.txt")
    assert caught.value.reason == "FILE_NAME_INVALID"
    with pytest.raises(InvalidArgumentError) as caught:
        await anext(server.client.storage.download(**where(), file_name="link.txt"))
    assert caught.value.reason == "FILE_NAME_INVALID"
    assert [f.file_name async for f in server.client.storage.files(**where())] == ["first"]
    await server.client.storage.save(**where(), file_name="link.txt", data=b"replaced")
    assert secret.read_bytes() == b"do not read", "a save replaces the link, not what it points to"
    assert (root / "link.txt").read_bytes() == b"replaced" and not (root / "link.txt").is_symlink()


async def test_the_storages_own_folder_is_not_a_key(fs_running: tuple[Running, Path]) -> None:
    server, _ = fs_running
    for key in (".ductape/meta/first.json", ".ductape"):
        with pytest.raises(InvalidArgumentError) as caught:
            await server.client.storage.save(**where(), file_name=key, data=b"{}")
        assert caught.value.reason == "FILE_NAME_INVALID"


async def test_a_manifest_directory_may_not_leave_the_data_directory(start_server: ServerFactory) -> None:
    server = await start_server()
    for directory in ("../elsewhere", "/etc", "a/../../b"):
        result = await server.client.product.validate(manifest({"provider": "fs", "directory": directory}))
        assert not result.valid and result.problems[0].path == "storage[0].envs.dev.directory", directory


async def test_signed_urls_hold_only_as_signed(fs_running: tuple[Running, Path]) -> None:
    server, _ = fs_running
    storage = server.client.storage
    good = await storage.signed_url(**where(), file_name="first", expires_in=60)
    put = await storage.signed_url(**where(), file_name="first", method="PUT", content_type="text/plain")
    expired = await storage.signed_url(**where(), file_name="first", expires_in=1)
    await asyncio.sleep(2.1)  # expiries are whole seconds
    tampered = good.url.replace("first", "other")
    forged = good.url[:-4] + ("0000" if not good.url.endswith("0000") else "1111")
    async with aiohttp.ClientSession() as http:
        for url, method in ((tampered, "GET"), (forged, "GET"), (expired.url, "GET"), (good.url, "PUT")):
            async with http.request(method, url, data=b"x" if method == "PUT" else None) as answer:
                body = await answer.json()
                assert (answer.status, body["reason"]) == (403, "STORAGE_URL_INVALID"), (url, method, body)
        async with http.put(put.url, data=b"typed", headers={"Content-Type": "image/png"}) as answer:
            assert answer.status == 403, "a PUT must declare the content type it was signed for"
        async with http.get(good.url) as answer:
            assert answer.status == 200 and await answer.read() == b"1"
    assert (await storage.read(**where(), file_name="first")).data == b"1"


async def test_signed_urls_are_refused_while_the_listener_is_off(start_server: ServerFactory) -> None:
    server = await start_server()
    await server.client.product.apply(manifest({"provider": "fs"}))
    with pytest.raises(FailedPreconditionError) as caught:
        await server.client.storage.signed_url(**where(), file_name="first")
    assert caught.value.reason == "SIGNED_URLS_DISABLED"


async def test_downloads_abandoned_mid_stream_close_their_files(fs_running: tuple[Running, Path]) -> None:
    server, _ = fs_running
    await server.client.storage.upload(b"z" * (3 * 1024 * 1024), **where(), file_name="long.bin")

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))  # the server runs in this process

    before = open_files()
    for _ in range(20):
        stream = server.client.storage.download(**where(), file_name="long.bin", chunk_size=65536)
        assert len(await anext(stream)) == 65536
        await stream.aclose()  # the client goes away after one chunk
    for _ in range(50):  # the server learns of each cancellation asynchronously
        if open_files() <= before:
            break
        await asyncio.sleep(0.1)
    assert open_files() <= before, "a download that was not read to its end left its file open"


async def test_a_new_version_with_another_folder_saves_there(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_server()
    storage_root = tmp_path / "data0" / "storage"
    await server.client.product.apply(manifest({"provider": "fs", "directory": "before"}))
    await server.client.storage.save(**where(), file_name="a.txt", data=b"1")
    await server.client.product.apply(manifest({"provider": "fs", "directory": "after"}))
    await server.client.storage.save(**where(), file_name="b.txt", data=b"2")
    assert (storage_root / "before" / "a.txt").read_bytes() == b"1"
    assert (storage_root / "after" / "b.txt").read_bytes() == b"2"
    assert not (storage_root / "before" / "b.txt").exists()
    assert [f.file_name async for f in server.client.storage.files(**where())] == ["b.txt"]
