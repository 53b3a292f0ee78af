"""The fs provider's own promises: no key leaves its folder, symbolic links included; and large files stream
through a real server process without its memory growing with the file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ductape.processor import InvalidArgumentError, Processor

from tests.conftest import Running, ServerFactory
from tests.test_storage import PRODUCT, TAG, manifest, where

MIB = 1024 * 1024


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


# -- memory --------------------------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[tuple[int, str]]:
    """A processor in its own process serving the test manifest with an fs storage: (pid, address)."""
    manifest_file = tmp_path / "st.json"
    manifest_file.write_bytes(manifest({"provider": "fs"}))
    address = f"127.0.0.1:{_free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ductape_processor.cli",
        "serve",
        "--address",
        address,
        "--data-dir",
        str(tmp_path / "proc"),
        "--manifest",
        str(manifest_file),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with Processor(address, timeout=5) as client:
            for _ in range(100):
                try:
                    await client.product.get(PRODUCT)
                    break
                except Exception:
                    if process.returncode is not None:
                        raise AssertionError("the server exited") from None
                    await asyncio.sleep(0.1)
        yield process.pid, address
    finally:
        process.terminate()
        await process.wait()


async def test_100_mb_streams_through_with_the_servers_memory_flat(
    server_process: tuple[int, str], tmp_path: Path
) -> None:
    pid, address = server_process
    size = 100 * MIB
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for _ in range(size // MIB):
        digest.update(block)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_bytes(pid))
            await asyncio.sleep(0.02)

    async with Processor(address, timeout=None) as client:
        await client.storage.save(**where(), file_name="warm", data=b"w" * MIB)  # imports, pools, first buffers
        async for _ in client.storage.download(**where(), file_name="warm"):
            pass
        baseline = _rss_bytes(pid)
        watcher = asyncio.ensure_future(watch())

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(size // MIB):
                yield block

        saved = await client.storage.upload(chunks(), **where(), file_name="huge.bin", size=size)
        assert saved.size == size and saved.sha256 == digest.hexdigest()
        received = hashlib.sha256()
        count = 0
        async for chunk in client.storage.download(**where(), file_name="huge.bin"):
            received.update(chunk)
            count += len(chunk)
        watcher.cancel()
    assert count == size and received.hexdigest() == digest.hexdigest()
    growth = peak - baseline
    print(json.dumps({"baseline_rss_mb": baseline / MIB, "peak_rss_mb": peak / MIB, "growth_mb": growth / MIB}))
    assert growth < 40 * MIB, f"the server grew {growth / MIB:.1f} MiB moving 100 MiB (baseline {baseline / MIB:.1f})"
