"""The storage providers a manifest may name: provider name -> typed settings model + factory.

Adding a provider is one module (a `StorageAdapter`) and one entry in `STORAGE_PROVIDERS`. A factory imports its
module when it is first called, so a processor loads only the drivers its manifests use; a driver that is not
installed is reported by the runtime as `STORAGE_PROVIDER_UNAVAILABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ductape_processor.adapters.storage.base import SignedUrl, StorageAdapter, UrlMethod
from ductape_processor.runtime.registry.storage import AzureStorageEnv, FsStorageEnv, GcsStorageEnv, S3StorageEnv

SettingsT = TypeVar("SettingsT")

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


@dataclass(frozen=True, slots=True)
class StorageProvider(Generic[SettingsT]):
    """One provider: the manifest model of its environment settings and what builds its adapter from them."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, Placement], StorageAdapter]
    """(settings with secrets resolved, placement) -> an adapter; it connects on first use."""

    def open(self, settings: Any, placement: Placement) -> StorageAdapter:
        """The adapter of one storage environment; `settings` must be an instance of `self.settings`."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__} settings, got {type(settings).__name__}")
        return self.factory(settings, placement)


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


STORAGE_PROVIDERS: dict[str, StorageProvider[Any]] = {
    "fs": StorageProvider(FsStorageEnv, _fs),
    "s3": StorageProvider(S3StorageEnv, _s3),
    "gcs": StorageProvider(GcsStorageEnv, _gcs),
    "azure": StorageProvider(AzureStorageEnv, _azure),
}
