"""Reading manifest bytes (YAML or JSON) into a validated `Manifest`, or into the list of every problem found.

Parsing is defensive: the document's size in bytes is checked before anything is parsed, then its number of values
and its depth; duplicate keys are refused, YAML aliases cannot expand into a huge document, and YAML 1.1's surprises
are switched off (`on`, `yes` and `no` stay strings, dates stay strings, mapping keys are always the text written).
Problems read in the processor's words: `problems.problem_reason` turns each validation error into our phrasing, in
one place.

`ManifestLoader` does this work without stalling the event loop: see its docstring for how and why.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hashlib
import itertools
import json
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import yaml
from pydantic import ValidationError

from ductape_processor.errors import (
    MAX_PROBLEMS_LISTED,
    FieldViolation,
    InvalidManifest,
    ManifestTooLarge,
    Unavailable,
)
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.plan import ProductPlan, compile_plan
from ductape_processor.runtime.databases.plan import DatabasePlans, compile_databases
from ductape_processor.runtime.features.plan import FeaturePlans, compile_features
from ductape_processor.runtime.registry.manifest import Manifest
from ductape_processor.runtime.registry.problems import violation
from ductape_processor.runtime.registry.references import reference_problems, secret_problems

if TYPE_CHECKING:  # the worker's modules (multiprocessing's) are imported when a large manifest first needs one
    import multiprocessing.context
    from concurrent.futures import ProcessPoolExecutor

MAX_MANIFEST_BYTES: Final = 1024 * 1024
"""Default largest manifest, in bytes (`PROCESSOR_MANIFEST_MAX_BYTES`); checked before parsing."""
MAX_VALUES: Final = 200_000
"""Most values (mappings, lists, scalars) a manifest may hold, YAML aliases counted once per use."""
MAX_DEPTH: Final = 64
"""Deepest nesting of mappings and lists in a manifest."""
INLINE_MAX_BYTES: Final = 16 * 1024
"""Manifests up to this size are read on the event loop: a few milliseconds, cheaper than a trip to the worker."""
INLINE_MAX_VALUES: Final = 2_000
"""A manifest read on the event loop that holds more values than this (aliases expanded) goes to the worker."""
WORKER_IDLE_S: Final = 60.0
"""A worker process unused this long is stopped (its memory returned); the next large manifest starts another."""

T = TypeVar("T")


class ManifestFormat(enum.IntEnum):
    """How a manifest is encoded; the values match the `ManifestFormat` proto enum."""

    UNSPECIFIED = 0
    YAML = 1
    JSON = 2


@dataclass(frozen=True, slots=True)
class LoadedManifest:
    """A validated and compiled manifest with the forms the registry stores."""

    compiled: CompiledManifest
    canonical_json: str
    checksum: str
    format: ManifestFormat

    @property
    def model(self) -> Manifest:
        """The validated model."""
        return self.compiled.model


@dataclass(frozen=True, slots=True)
class CheckedManifest:
    """What checking a manifest found: the loaded manifest, or its problems and the product it names (if readable)."""

    loaded: LoadedManifest | None
    invalid: InvalidManifest | None
    product: str


@dataclass(frozen=True, slots=True)
class CompiledManifest:
    """A validated manifest and the plan compiled from it while validating it."""

    model: Manifest
    """The validated model."""
    plan: ProductPlan
    """Its actions and auths compiled: what calls run, without compiling anything."""
    databases: DatabasePlans = field(default_factory=dict)
    """Its database actions compiled (`runtime/databases/plan.py`)."""
    features: FeaturePlans = field(default_factory=dict)
    """Its features compiled (`runtime/features/plan.py`)."""


# libyaml's parser when PyYAML has it (its wheels do): several times faster, and it bounds nesting itself.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ManifestYamlLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader with YAML 1.2 booleans, no timestamps, literal string keys and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            key = str(key_node.value)
            if key in mapping:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_ManifestYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ManifestYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ManifestYamlLoader.add_constructor("tag:yaml.org,2002:map", _ManifestYamlLoader.construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        mapping[key] = value
    return mapping


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _bounded(document: object, max_values: int) -> None:
    """Refuse documents too deep or too large once aliases are expanded (e.g. the 'billion laughs')."""
    count = 0
    stack: list[tuple[object, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values:
            raise ManifestTooLarge("values", max_values)
        if depth > MAX_DEPTH:
            raise ManifestTooLarge("depth", MAX_DEPTH)
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        elif isinstance(node, float) and (node != node or node in (float("inf"), float("-inf"))):
            raise InvalidManifest([FieldViolation("", "NaN and infinite numbers are not allowed in a manifest")])
        elif not isinstance(node, _PLAIN_SCALARS):
            raise InvalidManifest(
                [
                    FieldViolation(
                        "",
                        f"a manifest holds text, numbers, true/false, null, lists and mappings only; a YAML tag made "
                        f"a {type(node).__name__} here",
                    )
                ]
            )


def detect_format(source: bytes, declared: ManifestFormat) -> ManifestFormat:
    """The declared format, or JSON when the content starts with `{`, else YAML."""
    if declared != ManifestFormat.UNSPECIFIED:
        return declared
    return ManifestFormat.JSON if source.lstrip()[:1] == b"{" else ManifestFormat.YAML


def check_size(source: bytes, max_bytes: int) -> None:
    """Raise ManifestTooLarge when `source` is over `max_bytes`; checked before anything is parsed."""
    if len(source) > max_bytes:
        raise ManifestTooLarge("bytes", max_bytes, len(source))


def parse_document(source: bytes, fmt: ManifestFormat, *, max_values: int = MAX_VALUES) -> dict[str, Any]:
    """Parse manifest bytes into plain data; raise InvalidManifest with the syntax problem, ManifestTooLarge."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidManifest([FieldViolation("", f"the manifest is not UTF-8 (byte {exc.start})")]) from None
    try:
        if fmt == ManifestFormat.JSON:
            document = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            document = yaml.load(text, Loader=_ManifestYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        why = str(exc).replace('in "<unicode string>", ', "")
        if "exceeded maximum nesting depth" in why:
            raise ManifestTooLarge("depth", MAX_DEPTH) from None
        raise InvalidManifest([FieldViolation("", f"YAML syntax error: {why}")]) from None
    except RecursionError:
        raise ManifestTooLarge("depth", MAX_DEPTH) from None
    except ValueError as exc:
        kind = "JSON syntax error" if fmt == ManifestFormat.JSON else "invalid YAML"
        raise InvalidManifest([FieldViolation("", f"{kind}: {exc}")]) from None
    _bounded(document, max_values)
    if not isinstance(document, dict):
        raise InvalidManifest(
            [FieldViolation("", "a manifest is a mapping with at least `product` and `environments`")]
        )
    return document


def validate_document(document: dict[str, Any]) -> CompiledManifest:
    """Validate parsed data into a `Manifest` and compile its plan; raise InvalidManifest listing every problem with
    its path."""
    try:
        model = Manifest.model_validate(document)
    except ValidationError as exc:
        secrets = secret_problems(document)
        errors = exc.errors(include_url=False)
        problems: Iterator[FieldViolation] = itertools.chain(
            (violation(document, err) for err in errors), (FieldViolation(p, m) for p, m in secrets)
        )
        raise InvalidManifest(
            itertools.islice(problems, MAX_PROBLEMS_LISTED), total=len(errors) + len(secrets)
        ) from None
    problems_found = reference_problems(model) + secret_problems(document)
    plan = None
    databases: DatabasePlans = {}
    features: FeaturePlans = {}
    if not problems_found:
        plan, problems_found = compile_plan(model)
        databases, database_problems = compile_databases(model)
        features, feature_problems = compile_features(model)
        problems_found += database_problems + feature_problems
    if plan is None or problems_found:
        raise InvalidManifest([FieldViolation(path, why) for path, why in problems_found])
    return CompiledManifest(model, plan, databases, features)


def canonical_json(document: dict[str, Any]) -> str:
    """The canonical JSON form: sorted keys, no spaces. Identical content, identical text, whatever the source."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _loaded(document: dict[str, Any], fmt: ManifestFormat) -> LoadedManifest:
    compiled = validate_document(document)
    text = canonical_json(document)
    return LoadedManifest(compiled, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), fmt)


def load_manifest(
    source: bytes,
    declared: ManifestFormat = ManifestFormat.UNSPECIFIED,
    *,
    max_bytes: int = MAX_MANIFEST_BYTES,
    max_values: int = MAX_VALUES,
) -> LoadedManifest:
    """Parse and validate manifest bytes; raise ManifestTooLarge, or InvalidManifest with every problem found."""
    check_size(source, max_bytes)
    fmt = detect_format(source, declared)
    return _loaded(parse_document(source, fmt, max_values=max_values), fmt)


def check_manifest(
    source: bytes, declared: ManifestFormat, max_bytes: int, max_values: int = MAX_VALUES
) -> CheckedManifest:
    """Like `load_manifest`, but an invalid manifest is a result (with the product it names), not an exception."""
    check_size(source, max_bytes)
    fmt = detect_format(source, declared)
    try:
        document = parse_document(source, fmt, max_values=max_values)
    except InvalidManifest as exc:
        return CheckedManifest(None, exc, "")
    product = document.get("product")
    named = product if isinstance(product, str) else ""
    try:
        return CheckedManifest(_loaded(document, fmt), None, named)
    except InvalidManifest as exc:
        return CheckedManifest(None, exc, named)


def model_from_json(document: str) -> CompiledManifest:
    """The model and plan of a stored version's canonical JSON (validated again: the processor may be newer)."""
    return validate_document(json.loads(document))


# -- off the event loop -------------------------------------------------------------------------------------------


class ManifestLoader:
    """Parses and validates manifests without stalling the event loop.

    A small manifest (at most `INLINE_MAX_BYTES` and `INLINE_MAX_VALUES`) is read on the loop: it takes about a
    millisecond, less than a trip to another process. Anything larger is read in a worker process. A thread does
    not do: while it builds a maximal manifest, the GIL is held for long stretches (libyaml, json and pydantic-core
    run in C, and the cycle collector walks the growing document), and health checks measured a p99 of 1.4 s.
    Only the loaded model and its compiled plan come back, adopted by `_adopt`.

    One worker, started on first use from a fork server (later starts take milliseconds), stopped after
    `WORKER_IDLE_S` unused and replaced when it dies: the call it was serving fails with UNAVAILABLE
    `MANIFEST_WORKER_FAILED` and the next call gets a fresh worker. Calls wait their turn here, one job per worker,
    so a caller that gives up does not leave work piling up in the worker's queue.
    """

    def __init__(self, max_bytes: int = MAX_MANIFEST_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._slot = asyncio.Semaphore(1)
        self._idle: asyncio.TimerHandle | None = None
        self._closed = False

    async def load(self, source: bytes, fmt: ManifestFormat) -> LoadedManifest:
        """The validated manifest; raise ManifestTooLarge, InvalidManifest or Unavailable (worker lost)."""
        check_size(source, self.max_bytes)
        if len(source) <= INLINE_MAX_BYTES:
            try:
                return load_manifest(source, fmt, max_bytes=self.max_bytes, max_values=INLINE_MAX_VALUES)
            except ManifestTooLarge as exc:
                if exc.limit != "values":
                    raise
        return await self._in_worker(load_manifest, source, fmt, max_bytes=self.max_bytes)

    async def check(self, source: bytes, fmt: ManifestFormat) -> CheckedManifest:
        """What is wrong with a manifest, if anything; raise ManifestTooLarge or Unavailable (worker lost)."""
        check_size(source, self.max_bytes)
        if len(source) <= INLINE_MAX_BYTES:
            try:
                return check_manifest(source, fmt, self.max_bytes, INLINE_MAX_VALUES)
            except ManifestTooLarge as exc:
                if exc.limit != "values":
                    raise
        return await self._in_worker(check_manifest, source, fmt, self.max_bytes)

    async def model(self, document: str) -> CompiledManifest:
        """The model and plan of a stored version's canonical JSON."""
        if len(document) <= INLINE_MAX_BYTES:
            return model_from_json(document)
        return await self._in_worker(model_from_json, document)

    async def close(self) -> None:
        """Stop the worker (a job still running ends on its own; nobody waits for it)."""
        self._closed = True
        self._retire()

    async def _in_worker(self, job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise Unavailable("the processor is shutting down", reason=Reason.SHUTTING_DOWN)
        await self._slot.acquire()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        pool = self._pool
        if pool is None:
            from concurrent.futures import ProcessPoolExecutor

            pool = self._pool = ProcessPoolExecutor(1, mp_context=_worker_context())
        running = asyncio.ensure_future(self._run(pool, job, args, kwargs))
        running.add_done_callback(self._finished)
        # A caller that gives up does not stop the job (bounded by the limits): it keeps the worker, and the
        # slot, until it ends, so abandoned jobs cannot pile up in the worker's queue.
        return await asyncio.shield(running)

    async def _run(
        self, pool: ProcessPoolExecutor, job: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        from concurrent.futures.process import BrokenProcessPool  # imported with the pool

        try:
            # Submitted from a thread: starting a worker waits for the fork server, which imports modules first.
            submitted = await asyncio.to_thread(pool.submit, _pickled_result, job, args, kwargs)
            result: T = await asyncio.to_thread(_adopt, await asyncio.wrap_future(submitted))
            return result
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False)
            raise Unavailable(
                "the worker process checking manifests ended before answering (killed, or out of memory); "
                "nothing was stored, and the next call starts a new worker",
                reason=Reason.MANIFEST_WORKER_FAILED,
            ) from None

    def _finished(self, running: asyncio.Future[Any]) -> None:
        if not running.cancelled():
            running.exception()  # retrieved here when its caller gave up; the caller re-raises it otherwise
        self._slot.release()
        if self._pool is not None and not self._closed and not self._slot.locked():
            self._idle = asyncio.get_running_loop().call_later(WORKER_IDLE_S, self._retire)

    def _retire(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _pickled_result(job: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Run a job in the worker and pickle its result there (see `_adopt` for why).

    The cycle collector is paused meanwhile: it would walk the growing document again and again (seconds, for a
    maximal manifest), and whatever the job builds is dropped when it returns.
    """
    gc.disable()
    try:
        return pickle.dumps(job(*args, **kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        gc.enable()


def _adopt(data: bytes) -> Any:
    """Unpickle a worker's result in this process, off the loop, and keep its objects out of the cycle collector.

    A maximal manifest's model is some hundred thousand objects. Left to the collector, their arrival triggers a
    full collection that holds the GIL for 100-300 ms, stalling the loop; frozen, they are never walked (they are
    freed by reference counting when the model is dropped: models hold no cycles).
    """
    gc.disable()
    try:
        value = pickle.loads(data)  # noqa: S301 - bytes from our own worker process
        gc.freeze()
    finally:
        gc.enable()
    return value


def _worker_context() -> multiprocessing.context.BaseContext:
    """A fork server preloaded with this module: workers start in milliseconds, without the server's threads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
