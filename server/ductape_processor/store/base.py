"""The store interface. Both implementations pass the same contract tests (tests/test_store_contract.py)."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One stored manifest version."""

    product: str
    version: int
    checksum: str
    format: int
    source: bytes
    document: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ProductRevision:
    """A product's change counter: it grows on every apply that stores a version and on every promote."""

    product: str
    revision: int


ChangeListener = Callable[[str], Awaitable[None] | None]


class Store(abc.ABC):
    """Durable state of the processor. Every method is safe to call concurrently, also from several replicas."""

    dialect: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and migrate the schema to the newest version."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The newest migration applied."""

    @abc.abstractmethod
    async def apply_version(
        self, product: str, checksum: str, fmt: int, source: bytes, document: str
    ) -> tuple[VersionRecord, bool]:
        """Store the product's next version, or return the latest one if its checksum is `checksum`.

        Returns the record and whether it was created. Concurrent calls for one product get distinct versions.
        """

    @abc.abstractmethod
    async def get_version(self, product: str, version: int) -> VersionRecord | None:
        """One version, or None."""

    @abc.abstractmethod
    async def latest_version(self, product: str) -> VersionRecord | None:
        """The newest version, or None when the product was never applied."""

    @abc.abstractmethod
    async def list_versions(self, product: str, *, before: int | None, limit: int) -> list[VersionRecord]:
        """Versions older than `before` (all when None), newest first, at most `limit`."""

    @abc.abstractmethod
    async def set_pin(self, product: str, env: str, version: int) -> int | None:
        """Pin `env` to `version`; return the previous pin. The version must exist."""

    @abc.abstractmethod
    async def pins(self, product: str) -> dict[str, int]:
        """Environment slug to pinned version."""

    @abc.abstractmethod
    async def revisions(self) -> list[ProductRevision]:
        """Every product's change counter, to find products changed by another replica."""

    async def listen(self, listener: ChangeListener) -> None:  # noqa: B027 - optional capability
        """Call `listener(product)` soon after another replica changes a product. Optional: polling covers it."""
