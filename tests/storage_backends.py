"""The storage providers the contract suite (tests/test_storage.py) runs against, each with an independent way to
check what landed: the folder itself for fs, the provider's own client for the cloud providers. A provider's
emulator is started by its fixture on a free loopback port; without it the tests skip (fail under CI=true)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Backend:
    """One provider for the contract suite."""

    provider: str
    env: dict[str, Any]
    """The storage's environment settings in the test manifest."""
    fetch: Callable[[str], Awaitable[bytes | None]]
    """The bytes stored under a key, read without the processor (None: no such file)."""
    keys: Callable[[], Awaitable[list[str]]]
    """Every key stored, read without the processor (leftovers of failed uploads included)."""
    unreachable_env: dict[str, Any] | None = None
    """Settings pointing at nothing, with credentials that must not appear in errors."""
    env_at: Callable[[str], tuple[dict[str, Any], dict[str, str]]] | None = None
    """The settings of the same storage reached at another endpoint (`http://127.0.0.1:<port>`, a proxy), and the
    secrets they reference."""
    secrets: dict[str, str] = field(default_factory=dict)
    """Secrets the settings reference, as PROCESSOR_SECRET_* environment variables."""
    client: Any = None
    """The provider's own client, for tests that look closer (None for fs)."""
    signs_urls: bool = True
    """Whether the adapter makes signed URLs (not yet on GCS)."""
    port: int = 0
    """The emulator's port on loopback (0 for fs)."""


def fs_backend(data_dir: Path, product: str, tag: str, env: str) -> Backend:
    """The fs provider: files under `<data_dir>/storage/<product>/<tag>/<env>`."""
    root = data_dir / "storage" / product / tag / env

    async def fetch(key: str) -> bytes | None:
        path = root / key
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    async def keys() -> list[str]:
        if not root.exists():
            return []
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                found.append(os.path.relpath(os.path.join(folder, name), root))
        return sorted(found)

    return Backend("fs", {"provider": "fs"}, fetch, keys)


# -- emulators ------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, process: asyncio.subprocess.Process, what: str, seconds: float = 30) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; fail if `process` exits or time runs out."""
    for _ in range(int(seconds * 10)):
        if process.returncode is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds} s")


class FlakyLink:
    """A TCP proxy on loopback in front of an emulator that the test controls: it closes the first `drop` connections
    as soon as they open (a provider restarting, a load balancer shedding), then passes bytes; with `hang`, it keeps
    every new connection open and answers nothing (a provider that hung). `connections` counts what it accepted: one
    per attempt of a client that opens a connection for each (a dropped connection is never reused)."""

    def __init__(self, port: int, *, drop: int = 0, hang: bool = False) -> None:
        self.port, self.drop, self.hang = port, drop, hang
        self.connections = 0
        self.endpoint = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def cut(self) -> None:
        """Close every connection through the link: clients' pooled connections too, so their next call opens one."""
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def __aenter__(self) -> FlakyLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.hang:
                while await reader.read(65536):
                    pass
                return
            if self.drop > 0:
                self.drop -= 1
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._writers.update((writer, up_writer))
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def emulator(what: str, *command: str, port: int, **env: str) -> AsyncIterator[None]:
    """Run an emulator process for the duration of the block."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        await wait_for_port(port, process, what)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


S3_KEY_ID = "AKIDTESTSTORAGE1"
S3_SECRET = "s3-secret-9f8e7d6c5b4a"  # made up for the emulator; checked absent from every error


@contextlib.asynccontextmanager
async def s3_backend() -> AsyncIterator[Backend]:
    """moto's server mode on a free loopback port, a fresh bucket, and boto3 (sync, in threads) as the checker."""
    import boto3

    port = free_port()
    moto = str(Path(sys.executable).with_name("moto_server"))
    async with emulator("moto_server", moto, "-H", "127.0.0.1", "-p", str(port), port=port):
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
        )
        bucket = "storage-contract"
        await asyncio.to_thread(client.create_bucket, Bucket=bucket)

        async def fetch(key: str) -> bytes | None:
            def get() -> bytes | None:
                try:
                    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
                except client.exceptions.NoSuchKey:
                    return None

            return await asyncio.to_thread(get)

        async def keys() -> list[str]:
            def every() -> list[str]:
                found = []
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    found += [item["Key"] for item in page.get("Contents", [])]
                uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
                found += [f".uploads/{upload['Key']}" for upload in uploads]
                return sorted(found)

            return await asyncio.to_thread(every)

        settings = {
            "provider": "s3",
            "bucket": bucket,
            "endpoint": endpoint,
            "path_style": True,
            "access_key_id": "$Secret{S3_KEY_ID}",
            "secret_access_key": "$Secret{S3_SECRET}",
        }
        unreachable = {**settings, "endpoint": f"http://127.0.0.1:{free_port()}"}
        yield Backend(
            "s3",
            settings,
            fetch,
            keys,
            unreachable_env=unreachable,
            env_at=lambda at: ({**settings, "endpoint": at}, {}),
            secrets={"S3_KEY_ID": S3_KEY_ID, "S3_SECRET": S3_SECRET},
            client=client,
            port=port,
        )


AZURITE = Path(__file__).resolve().parent.parent / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every Azurite), not a credential of anything.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


@contextlib.asynccontextmanager
async def azure_backend(workdir: Path) -> AsyncIterator[Backend]:
    """Azurite (npm, installed by `make emulators`) on a free loopback port, a fresh container, and
    azure-storage-blob's sync client (in threads) as the checker."""
    from azure.storage.blob import BlobServiceClient

    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `make emulators` (installs Azurite with npm)")
    port = free_port()
    location = workdir / "azurite"
    location.mkdir()
    command = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location)]
    async with emulator("azurite", *command, "--skipApiVersionCheck", "--loose", "--silent", port=port):
        connection = azurite_connection_string(port)
        container = BlobServiceClient.from_connection_string(connection).get_container_client("storage-contract")
        await asyncio.to_thread(container.create_container)

        async def fetch(key: str) -> bytes | None:
            def get() -> bytes | None:
                blob = container.get_blob_client(key)
                return bytes(blob.download_blob().readall()) if blob.exists() else None

            return await asyncio.to_thread(get)

        async def keys() -> list[str]:
            return await asyncio.to_thread(lambda: sorted(blob.name for blob in container.list_blobs()))

        unreachable = azurite_connection_string(free_port())

        def env_at(endpoint: str) -> tuple[dict[str, Any], dict[str, str]]:
            at = connection.replace(f"http://127.0.0.1:{port}/", f"{endpoint}/")
            env = {"provider": "azure", "container": "storage-contract", "connection_string": "$Secret{AZURE_AT}"}
            return env, {"AZURE_AT": at}

        yield Backend(
            "azure",
            {"provider": "azure", "container": "storage-contract", "connection_string": "$Secret{AZURE_CONNECTION}"},
            fetch,
            keys,
            unreachable_env={
                "provider": "azure",
                "container": "storage-contract",
                "connection_string": "$Secret{AZURE_DOWN}",
            },
            env_at=env_at,
            secrets={"AZURE_CONNECTION": connection, "AZURE_DOWN": unreachable, "AZURE_KEY": AZURITE_KEY},
            client=container,
            port=port,
        )


def made_up_service_account(token_uri: str = "http://127.0.0.1:9/token") -> str:
    """A service account key file of no Google project (a fresh RSA key), for the adapter to sign URLs with;
    `token_uri` is where the client would fetch its tokens."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "test",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": "storage-tests@test.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": token_uri,
        }
    )


@contextlib.asynccontextmanager
async def gcs_backend() -> AsyncIterator[Backend]:
    """gcp-storage-emulator (PyPI; the JSON API) on a free loopback port with a fresh bucket, in memory, and
    google-cloud-storage's sync client (in threads) as the checker."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    port = free_port()
    command = str(Path(sys.executable).with_name("gcp-storage-emulator"))
    bucket_name = "storage-contract"
    args = ["start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket_name]
    async with emulator("gcp-storage-emulator", command, *args, "--quiet", port=port):
        endpoint = f"http://127.0.0.1:{port}"
        client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        bucket = client.bucket(bucket_name)

        async def fetch(key: str) -> bytes | None:
            def get() -> bytes | None:
                blob = bucket.blob(key)
                return bytes(blob.download_as_bytes()) if blob.exists() else None

            return await asyncio.to_thread(get)

        async def keys() -> list[str]:
            return await asyncio.to_thread(lambda: sorted(blob.name for blob in client.list_blobs(bucket_name)))

        settings = {"provider": "gcs", "bucket": bucket_name, "endpoint": endpoint, "credentials": "$Secret{GCS_SA}"}
        yield Backend(
            "gcs",
            settings,
            fetch,
            keys,
            unreachable_env={**settings, "endpoint": f"http://127.0.0.1:{free_port()}"},
            env_at=lambda at: ({**settings, "endpoint": at}, {}),
            secrets={"GCS_SA": made_up_service_account()},
            client=client,
            port=port,
        )
