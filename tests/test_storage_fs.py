"""The fs provider's own promises: no key leaves its folder, symbolic links included."""

from __future__ import annotations

from pathlib import Path

import pytest
from ductape.processor import InvalidArgumentError

from tests.conftest import Running, ServerFactory
from tests.test_storage import PRODUCT, TAG, manifest, where


@pytest.fixture
async def fs_running(start_server: ServerFactory, tmp_path: Path) -> tuple[Running, Path]:
    server = await start_server()
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
