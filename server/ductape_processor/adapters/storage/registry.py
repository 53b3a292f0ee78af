"""The storage providers a manifest may name: provider name -> typed settings model + factory
(`adapters/registry.py`), the place an adapter is opened with being its `Placement`.

Adding a provider is one module (a `StorageAdapter`) and one entry in `STORAGE_PROVIDERS`. Factories import their
module on first use; a driver that is not installed is reported by the runtime as `STORAGE_PROVIDER_UNAVAILABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ductape_processor.adapters.registry import AdapterType
from ductape_processor.adapters.storage.base import SignedUrl, StorageAdapter, UrlMethod
from ductape_processor.runtime.registry.storage import AzureStorageEnv, FsStorageEnv, GcsStorageEnv, S3StorageEnv

Signer = Callable[[str, UrlMethod, int, str], SignedUrl]
"""(key, method, seconds, content type) -> a URL of the processor's storage HTTP listener for one fs storage."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one storage environment is, beyond its settings: its name in errors and logs (`product/env/tag`), the
    folder its fs files go under by default, and the signer of its fs URLs (None when the listener is off)."""

    name: str
    storage_root: Path
    default_directory: str
    signer: Signer | None = None


def _fs(settings: FsStorageEnv, placement: Placement) -> StorageAdapter:
    from ductape_processor.adapters.storage.fs import FsStorage

    directory = settings.directory or placement.default_directory
    return FsStorage(placement.storage_root / directory, placement.name, placement.signer)


def _s3(settings: S3StorageEnv, placement: Placement) -> StorageAdapter:
    from ductape_processor.adapters.storage.s3 import S3Storage

    return S3Storage(settings, placement.name)


def _azure(settings: AzureStorageEnv, placement: Placement) -> StorageAdapter:
    from ductape_processor.adapters.storage.azure import AzureStorage

    return AzureStorage(settings, placement.name)


def _gcs(settings: GcsStorageEnv, placement: Placement) -> StorageAdapter:
    from ductape_processor.adapters.storage.gcs import GcsStorage

    return GcsStorage(settings, placement.name, placement.storage_root / ".spool")


STORAGE_PROVIDERS: dict[str, AdapterType[Any, Placement, StorageAdapter]] = {
    "fs": AdapterType(FsStorageEnv, _fs),
    "s3": AdapterType(S3StorageEnv, _s3),
    "gcs": AdapterType(GcsStorageEnv, _gcs),
    "azure": AdapterType(AzureStorageEnv, _azure),
}
