"""One adapter per resource environment, for every resource kind that talks to a system (brokers, storage,
databases): built on first use from the environment's settings with their `$Secret{…}` references resolved, shared
by every call, and replaced when the settings change.

An environment's adapter is keyed by (product, environment, resource tag) and the fingerprint of its resolved
settings. A call of a newer manifest version whose settings differ (a new URL, pool size, bucket) gets a new adapter,
and the adapters that only older versions used are closed in the background (their in-flight work ends with the
adapter's own close semantics: a pool lets its connections come back, a broker gives unacked messages back). A call
that names an older version explicitly gets that version's adapter again; at most `PER_ENVIRONMENT` adapters are kept
per environment (the least recently used is closed first). A version's route to its adapter is remembered, so the
settings are not resolved and hashed on every call. Everything is closed at shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel

from ductape_processor.errors import FailedPrecondition
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.secrets import SecretSource

log = logging.getLogger(__name__)

PER_ENVIRONMENT = 4
"""Adapters (distinct settings) kept open per resource environment."""
BY_VERSION = 1024
"""(product, version, environment, tag) routes remembered, each straight to its adapter."""


class Closable(Protocol):
    async def close(self) -> None: ...


A = TypeVar("A", bound=Closable)
SettingsT = TypeVar("SettingsT", bound=BaseModel)


class EnvironmentRef(NamedTuple):
    """A resource environment as one call resolved it. A named tuple, not a frozen dataclass: it is a dictionary
    key on every call of a resource, and a tuple hashes and compares in C (a dataclass's `__hash__` and `__eq__`
    are Python functions, two of each on every publish)."""

    product: str
    version: int
    env: str
    """The environment's slug."""
    tag: str
    """The resource's tag (a broker, a storage, a database)."""

    @property
    def name(self) -> str:
        """How logs and errors name it: `product/env/tag`."""
        return f"{self.product}/{self.env}/{self.tag}"


@dataclass(slots=True)
class _Entry(Generic[A]):
    adapter: A
    version: int
    retired: bool = False


class EnvironmentAdapters(Generic[A]):
    """The adapters of one resource kind (`kind` names it in errors: `broker`, `storage`, `database`)."""

    def __init__(self, kind: str, secrets: SecretSource) -> None:
        self._kind = kind
        self._secrets = secrets
        self._entries: dict[tuple[str, str, str], OrderedDict[str, _Entry[A]]] = {}
        self._routes: BoundedCache[EnvironmentRef, _Entry[A]] = BoundedCache(BY_VERSION)
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, ref: EnvironmentRef, settings: SettingsT, open_adapter: Callable[[SettingsT], A]) -> A:
        """The adapter of `ref`'s environment, opened with `open_adapter(settings with secrets resolved)` when no
        adapter of these settings is open. Raises FAILED_PRECONDITION `SECRET_NOT_FOUND` for a missing secret."""
        known = self._routes.get(ref)
        if known is not None and not known.retired:
            return known.adapter
        resolved = self._secrets.resolve_settings(settings, lambda secret: self._missing(ref, secret))
        fingerprint = _fingerprint(resolved.model_dump(mode="json"))
        entries = self._entries.setdefault((ref.product, ref.env, ref.tag), OrderedDict())
        entry = entries.get(fingerprint)
        if entry is None:
            entry = _Entry(open_adapter(resolved), ref.version)  # factories only build: they connect on first use
            entries[fingerprint] = entry
            self._retire_superseded(ref, entries, fingerprint)
        else:
            entry.version = max(entry.version, ref.version)
            entries.move_to_end(fingerprint)
        self._routes.put(ref, entry)
        return entry.adapter

    def open_adapters(self) -> list[A]:
        """The adapters open now (not being closed)."""
        return [entry.adapter for entries in self._entries.values() for entry in entries.values()]

    def _missing(self, ref: EnvironmentRef, secret: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{self._kind} {ref.tag!r}: secret {secret} is not defined on this processor",
            reason=Reason.SECRET_NOT_FOUND,
            metadata={self._kind: ref.tag, "secret": secret},
        )

    def _retire_superseded(self, ref: EnvironmentRef, entries: OrderedDict[str, _Entry[A]], newest: str) -> None:
        """Close the adapters only older versions used, and the least recently used beyond PER_ENVIRONMENT."""
        for fingerprint, entry in list(entries.items()):
            superseded = fingerprint != newest and entry.version < ref.version
            if superseded or len(entries) > PER_ENVIRONMENT:
                del entries[fingerprint]
                log.info("%s %s: settings changed; closing the adapter of the old ones", self._kind, ref.name)
                self._retire(entry)

    def _retire(self, entry: _Entry[A]) -> None:
        entry.retired = True
        task = asyncio.get_running_loop().create_task(_close(entry.adapter), name="retire-adapter")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every adapter (at shutdown), and wait for those being retired."""
        for entries in self._entries.values():
            for entry in entries.values():
                self._retire(entry)
        self._entries.clear()
        self._routes.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(adapter: Closable) -> None:
    try:
        await adapter.close()
    except Exception as exc:  # closing is best effort: the adapter is forgotten either way
        log.warning("closing an adapter failed: %s", type(exc).__name__)


def _fingerprint(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
