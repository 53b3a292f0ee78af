"""The product registry: stores manifest versions and resolves (product, env, version) to a validated model.

Resolving is served from memory. A product's state (latest version, pins) is cached until it changes: on this
replica the change drops it at once; other replicas sharing a PostgreSQL store drop it when the store's change
notification arrives (milliseconds), or at the latest on the next poll of the products' change counters
(`registry_poll_s`, 2 s by default). Versions are immutable, so their validated models are kept in an LRU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ductape_processor.errors import (
    EnvNotFound,
    FieldViolation,
    InvalidArgument,
    ProductNotFound,
    VersionNotFound,
)
from ductape_processor.runtime.actions.plan import ProductPlan
from ductape_processor.runtime.databases.plan import DatabasePlans
from ductape_processor.runtime.features.plan import FeaturePlans
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.paging import (
    decode_page_token,
    effective_page_size,
    page,
    version_position,
)
from ductape_processor.runtime.policies.periodic import PeriodicTask
from ductape_processor.runtime.registry.loader import (
    MAX_MANIFEST_BYTES,
    CompiledManifest,
    ManifestFormat,
    ManifestLoader,
)
from ductape_processor.runtime.registry.manifest import Environment, Manifest
from ductape_processor.store.base import Store

# A stored version is what callers of the registry read (the product API lists them): the registry re-exports it.
from ductape_processor.store.base import VersionRecord as VersionRecord

log = logging.getLogger(__name__)

MODEL_CACHE_SIZE = 256
MAX_RESOLVED_PER_PRODUCT = 1024
MAX_PRODUCTS_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class ProductState:
    """What the registry knows of a product between two changes."""

    latest: VersionRecord | None
    pins: dict[str, int]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A product version ready to run in one environment."""

    product: str
    version: int
    env: Environment
    manifest: Manifest
    record: VersionRecord
    plan: ProductPlan
    """The version's actions and auths, compiled once when its manifest was validated."""
    databases: DatabasePlans = field(default_factory=dict)
    """The version's database actions, compiled with it."""
    features: FeaturePlans = field(default_factory=dict)
    """The version's features, compiled with it."""


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The outcome of validating a manifest without storing it."""

    problems: list[FieldViolation]
    total: int
    product: str
    checksum: str


@dataclass(slots=True)
class _Slot:
    generation: int = 0
    loading: asyncio.Future[ProductState] | None = None
    state: ProductState | None = None
    resolved: BoundedCache[tuple[str, int | None], Resolved] = field(
        default_factory=lambda: BoundedCache(MAX_RESOLVED_PER_PRODUCT)
    )


class Registry:
    """Product versions and environment pins over a `Store`, with an in-memory cache of resolved models."""

    def __init__(
        self, store: Store, *, poll_interval: float = 2.0, manifest_max_bytes: int = MAX_MANIFEST_BYTES
    ) -> None:
        self._store = store
        self._loader = ManifestLoader(manifest_max_bytes)
        self._slots: dict[str, _Slot] = {}
        self._models: BoundedCache[tuple[str, int], CompiledManifest] = BoundedCache(MODEL_CACHE_SIZE)
        self._loading: dict[tuple[str, int], asyncio.Future[CompiledManifest]] = {}
        self._seen_revisions: dict[str, int] = {}
        self._poller = PeriodicTask("registry poll", poll_interval, self._poll)
        self._watchers: list[Callable[[str], None]] = []

    def on_change(self, watcher: Callable[[str], None]) -> None:
        """Call `watcher(product)` whenever a product changes (a version applied or promoted, here or on another
        replica); it must return at once (start a task for longer work)."""
        self._watchers.append(watcher)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following changes made by other replicas."""
        self._seen_revisions = {r.product: r.revision for r in await self._store.revisions()}
        await self._store.listen(self.invalidate)
        self._poller.start()

    async def stop(self) -> None:
        """Stop following changes, and the worker that reads large manifests."""
        await self._poller.stop()
        await self._loader.close()

    async def _poll(self) -> None:
        """Forget the state of every product whose change counter moved (a change made on another replica)."""
        for item in await self._store.revisions():
            if self._seen_revisions.get(item.product) != item.revision:
                self._seen_revisions[item.product] = item.revision
                self.invalidate(item.product)

    def invalidate(self, product: str) -> None:
        """Forget the cached state of `product` (called on change, locally or from another replica)."""
        slot = self._slots.get(product)
        if slot is not None:
            slot.generation += 1
            slot.state = None
            slot.resolved.clear()
        for watcher in self._watchers:
            watcher(product)

    # -- state ------------------------------------------------------------------------------------------------

    async def state(self, product: str) -> ProductState:
        """The product's latest version and pins, from memory when unchanged."""
        slot = self._slots.get(product)
        if slot is not None and slot.state is not None:
            return slot.state
        if slot is None:
            slot = self._slots.setdefault(product, _Slot())
        if slot.loading is not None and not slot.loading.done():
            return await asyncio.shield(slot.loading)
        generation = slot.generation
        loop = asyncio.get_running_loop()
        slot.loading = loop.create_future()
        try:
            latest, pins = await asyncio.gather(self._store.latest_version(product), self._store.pins(product))
        except BaseException as exc:
            slot.loading.set_exception(exc)
            slot.loading.exception()  # mark retrieved: waiters re-raise it
            slot.loading = None
            raise
        state = ProductState(latest, pins)
        if slot.generation == generation and (latest is not None or len(self._slots) <= MAX_PRODUCTS_REMEMBERED):
            slot.state = state
        elif latest is None:
            self._slots.pop(product, None)  # many unknown names: stop remembering them
        slot.loading.set_result(state)
        slot.loading = None
        return state

    async def _existing(self, product: str) -> ProductState:
        state = await self.state(product)
        if state.latest is None:
            raise ProductNotFound(product)
        return state

    async def record(self, product: str, version: int) -> VersionRecord:
        """One version's record; VersionNotFound when the product has no such version."""
        state = await self._existing(product)
        assert state.latest is not None
        if state.latest.version == version:
            return state.latest
        record = await self._store.get_version(product, version) if 0 < version < state.latest.version else None
        if record is None:
            raise VersionNotFound(product, version, state.latest.version)
        return record

    async def model(self, record: VersionRecord) -> Manifest:
        """The validated model of a stored version."""
        return (await self.compiled(record)).model

    async def compiled(self, record: VersionRecord) -> CompiledManifest:
        """The validated model of a stored version and its plan (cached; versions never change)."""
        key = (record.product, record.version)
        compiled = self._models.get(key)
        if compiled is not None:
            return compiled
        loading = self._loading.get(key)
        if loading is None:
            # One read per version however many calls need it at once (after a restart, every call does).
            loading = self._loading[key] = asyncio.ensure_future(self._loader.model(record.document))
            loading.add_done_callback(lambda done: self._loaded(key, done))
        compiled = await asyncio.shield(loading)
        self._models.put(key, compiled)
        return compiled

    def _loaded(self, key: tuple[str, int], done: asyncio.Future[CompiledManifest]) -> None:
        self._loading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here in case every caller gave up

    # -- registry operations ------------------------------------------------------------------------------------

    async def apply(self, source: bytes, fmt: ManifestFormat) -> tuple[VersionRecord, bool]:
        """Validate and store a manifest as the product's next version (or return the identical latest)."""
        loaded = await self._loader.load(source, fmt)
        record, created = await self._store.apply_version(
            loaded.model.product, loaded.checksum, int(loaded.format), source, loaded.canonical_json
        )
        if created:
            self._models.put((record.product, record.version), loaded.compiled)
            self.invalidate(record.product)
        return record, created

    async def validate(self, source: bytes, fmt: ManifestFormat) -> ValidationResult:
        """The problems of a manifest (the first `MAX_PROBLEMS_LISTED`, and how many in all), without storing it."""
        checked = await self._loader.check(source, fmt)
        if checked.invalid is not None:
            return ValidationResult(checked.invalid.problems, checked.invalid.total, checked.product, "")
        assert checked.loaded is not None
        return ValidationResult([], 0, checked.product, checked.loaded.checksum)

    async def environment(self, product: str, env: str, version: int | None = None) -> tuple[Environment, int]:
        """The environment named by slug or name, and the version a call in it runs."""
        state = await self._existing(product)
        assert state.latest is not None
        if version is not None:
            record = await self.record(product, version)
            model = await self.model(record)
            found = model.find_environment(env)
            if found is None:
                raise EnvNotFound(product, env, version, [e.slug for e in model.environments])
            return found, version
        latest_model = await self.model(state.latest)
        found = latest_model.find_environment(env)
        if found is None:
            # An environment removed from the latest manifest still runs the version it is pinned to.
            for slug, pinned in state.pins.items():
                pinned_model = await self.model(await self.record(product, pinned))
                candidate = pinned_model.find_environment(env)
                if candidate is not None and candidate.slug == slug:
                    return candidate, pinned
            raise EnvNotFound(product, env, state.latest.version, [e.slug for e in latest_model.environments])
        return found, state.pins.get(found.slug, state.latest.version)

    def in_memory(self, product: str, env: str, version: int | None = None) -> Resolved | None:
        """What `resolve` answers from memory, without a coroutine (None when it would have to look further)."""
        slot = self._slots.get(product)
        if slot is not None and slot.state is not None:
            return slot.resolved.get((env, version))
        return None

    async def resolve(self, product: str, env: str, version: int | None = None) -> Resolved:
        """The model a call runs: the version asked for, else the environment's pin, else the latest.

        Served from memory (one dictionary lookup) until the product changes.
        """
        hit = self.in_memory(product, env, version)
        if hit is not None:
            return hit
        slot = self._slots.setdefault(product, _Slot())
        generation = slot.generation
        environment, chosen = await self.environment(product, env, version)
        record = await self.record(product, chosen)
        compiled = await self.compiled(record)
        resolved = Resolved(
            product, chosen, environment, compiled.model, record, compiled.plan, compiled.databases, compiled.features
        )
        if slot.state is not None and slot.generation == generation:
            slot.resolved.put((env, version), resolved)
        return resolved

    async def get(
        self, product: str, *, version: int | None = None, env: str | None = None
    ) -> tuple[VersionRecord, dict[str, int]]:
        """A version's record (explicit, pinned for `env`, or latest) and the product's pins."""
        state = await self._existing(product)
        assert state.latest is not None
        if version is not None:
            return await self.record(product, version), state.pins
        if env is not None:
            return (await self.resolve(product, env)).record, state.pins
        return state.latest, state.pins

    async def list_versions(
        self, product: str, page_size: int, page_token: str
    ) -> tuple[list[VersionRecord], str, dict[str, int]]:
        """One page of versions, newest first, the next page's token, and the pins."""
        size = effective_page_size(page_size)
        listing = ("versions", product)
        before = decode_page_token(listing, page_token, version_position) if page_token else None
        state = await self._existing(product)
        records = await self._store.list_versions(product, before=before, limit=size + 1)
        records, token = page(records, size, listing, lambda record: (record.version,))
        return records, token, state.pins

    async def promote(self, product: str, env: str, version: int) -> tuple[str, int | None]:
        """Pin an environment (slug or name, declared by `version`) to `version`; return its slug and old pin."""
        if version <= 0:
            raise InvalidArgument.field("version", "must be 1 or more")
        record = await self.record(product, version)
        model = await self.model(record)
        found = model.find_environment(env)
        if found is None:
            raise EnvNotFound(product, env, version, [e.slug for e in model.environments])
        previous = await self._store.set_pin(product, found.slug, version)
        self.invalidate(product)
        return found.slug, previous
