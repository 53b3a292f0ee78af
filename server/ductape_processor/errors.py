"""Typed domain errors.

Domain code raises these; `api.status` turns them into a gRPC status with rich details (AIP-193) in one place.
A `reason` is an UPPER_SNAKE word a caller can branch on; `metadata` names the resource involved; `violations`
lists bad fields for `google.rpc.BadRequest`.

An error kind is declared in its class line: it derives from the error of its canonical code (`Unavailable`,
`NotFound` ...) and names its reason, `class CircuitOpen(Unavailable, reason=Reason.CIRCUIT_OPEN)`; a code with no
error of its own here is given as `code=`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import grpc

from ductape_processor.reasons import Reason


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (or one problem in a manifest): where, and why."""

    field: str
    description: str


class ProcessorError(Exception):
    """Base of every error a caller may see; carries the canonical code, the reason and the details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: Reason = Reason.INTERNAL

    def __init_subclass__(cls, *, code: grpc.StatusCode | None = None, reason: Reason | None = None) -> None:
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if reason is not None:
            cls.reason = reason

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[FieldViolation] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[FieldViolation] = list(violations)
        # When a retry may succeed: sent as google.rpc.RetryInfo.retry_delay.
        self.retry_after_s = retry_after_s


class InvalidArgument(ProcessorError, code=grpc.StatusCode.INVALID_ARGUMENT, reason=Reason.INVALID_ARGUMENT):
    """A request field is missing or malformed."""

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """An error about one field, with that field as its only violation."""
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])


MAX_PROBLEMS_LISTED: Final = 100
"""Problems an invalid manifest lists; the others are only counted, so no answer outgrows a gRPC message."""
MAX_PROBLEM_TEXT: Final = 300
"""Characters kept of a problem's path and of its reason (a value quoted in a reason can be long)."""
MAX_DETAIL_BYTES: Final = 3000
"""UTF-8 bytes of paths and reasons an INVALID_MANIFEST error carries. Error details and the status message travel
in trailing metadata, which gRPC clients start refusing at 8 KiB (the details base64-encoded, the message
percent-encoded): this budget keeps the worst case under it."""
MAX_MESSAGE_TEXT: Final = 200
"""Characters of the first problem quoted in an INVALID_MANIFEST status message."""


def _clip(text: str, limit: int = MAX_PROBLEM_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class InvalidManifest(InvalidArgument, reason=Reason.INVALID_MANIFEST):
    """A product manifest has problems; each is a violation whose field is its path in the manifest.

    `problems` keeps the first `MAX_PROBLEMS_LISTED` (paths and reasons clipped to `MAX_PROBLEM_TEXT`) and
    `total` counts them all. The error's own violations, sent as a `BadRequest`, are the first problems that fit in
    `MAX_DETAIL_BYTES`; `metadata["problems"]` is the total, so a caller knows how many it was not shown.
    """

    def __init__(self, problems: Iterable[FieldViolation], total: int | None = None) -> None:
        listed: list[FieldViolation] = []
        found = 0
        for problem in problems:
            found += 1
            if len(listed) < MAX_PROBLEMS_LISTED:
                listed.append(FieldViolation(_clip(problem.field), _clip(problem.description)))
        self.problems = listed
        self.total = max(found, total or 0)
        shown: list[FieldViolation] = []
        budget = MAX_DETAIL_BYTES
        for problem in listed:
            budget -= len(problem.field.encode()) + len(problem.description.encode()) + 8
            if budget < 0:
                break
            shown.append(problem)
        first = listed[0] if listed else FieldViolation("", "invalid manifest")
        where = f"{first.field}: " if first.field else ""
        others = self.total - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others > 0 else ""
        super().__init__(
            f"invalid manifest: {_clip(where + first.description, MAX_MESSAGE_TEXT)}{more}",
            metadata={"problems": str(self.total)},
            violations=shown,
        )

    def __reduce__(self) -> tuple[type[InvalidManifest], tuple[list[FieldViolation], int]]:
        # Crosses the boundary of the process that checks manifests.
        return (type(self), (self.problems, self.total))


_TOO_LARGE: Final = {
    "bytes": "is {found} bytes, more than the {maximum} bytes allowed (PROCESSOR_MANIFEST_MAX_BYTES)",
    "values": "holds more than {maximum} values (lists, mappings and scalars; YAML aliases count once per use)",
    "depth": "nests deeper than {maximum} levels",
}


class ManifestTooLarge(InvalidArgument, reason=Reason.MANIFEST_TOO_LARGE):
    """A manifest is over one of the limits checked before it is validated: bytes, values or nesting depth."""

    def __init__(self, limit: str, maximum: int, found: int = 0) -> None:
        self.limit = limit
        self.maximum = maximum
        self.found = found
        why = _TOO_LARGE[limit].format(found=found, maximum=maximum)
        super().__init__(
            f"manifest: {why}",
            metadata={"limit": limit, "maximum": str(maximum)},
            violations=[FieldViolation("manifest", why)],
        )

    def __reduce__(self) -> tuple[type[ManifestTooLarge], tuple[str, int, int]]:
        return (type(self), (self.limit, self.maximum, self.found))


class NotFound(ProcessorError, code=grpc.StatusCode.NOT_FOUND, reason=Reason.NOT_FOUND):
    """A named resource does not exist."""

    @classmethod
    def in_product(cls, product: str, kind: str, tag: str, reason: Reason) -> NotFound:
        """`product` has no `kind` (app, broker, cache, database …) tagged `tag`; the metadata names both."""
        return cls(
            f"product {product!r} has no {kind} {tag!r}", reason=reason, metadata={"product": product, kind: tag}
        )

    @classmethod
    def in_resource(
        cls, product: str, kind: str, tag: str, part: str, name: str, reason: Reason, *, key: str = ""
    ) -> NotFound:
        """The `kind` tagged `tag` has no `part` (a broker's topic, an app's action …) named `name`; the metadata
        names the product, the resource and the part (under `key`, else `part`)."""
        return cls(
            f"{kind} {tag!r} has no {part} {name!r}",
            reason=reason,
            metadata={"product": product, kind: tag, key or part: name},
        )


class ProductNotFound(NotFound, reason=Reason.PRODUCT_NOT_FOUND):
    """No manifest was ever applied for this product."""

    def __init__(self, product: str) -> None:
        super().__init__(f"product {product!r} not found", metadata={"product": product})


class EnvNotFound(NotFound, reason=Reason.ENV_NOT_FOUND):
    """The product (at the version in use) declares no environment with this slug or name."""

    def __init__(self, product: str, env: str, version: int, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known))
        super().__init__(
            f"product {product!r} version {version} has no environment {env!r} (it has: {names})",
            metadata={"product": product, "env": env, "version": str(version)},
        )


class VersionNotFound(NotFound, reason=Reason.VERSION_NOT_FOUND):
    """The product has no such version."""

    def __init__(self, product: str, version: int, latest: int) -> None:
        super().__init__(
            f"product {product!r} has no version {version} (latest is {latest})",
            metadata={"product": product, "version": str(version), "latest_version": str(latest)},
        )


class FailedPrecondition(ProcessorError, code=grpc.StatusCode.FAILED_PRECONDITION, reason=Reason.FAILED_PRECONDITION):
    """The call cannot run in the current state of things (or as the product is configured)."""


class Unauthenticated(ProcessorError, code=grpc.StatusCode.UNAUTHENTICATED, reason=Reason.UNAUTHENTICATED):
    """The caller did not prove who it is."""


class Unavailable(ProcessorError, code=grpc.StatusCode.UNAVAILABLE, reason=Reason.UNAVAILABLE):
    """The processor cannot serve the call now; a retry (possibly on another replica) may succeed."""


class AlreadyExists(ProcessorError, code=grpc.StatusCode.ALREADY_EXISTS, reason=Reason.ALREADY_EXISTS):
    """What the call would create exists already."""


class ResourceExhausted(ProcessorError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason=Reason.RESOURCE_EXHAUSTED):
    """A limit was reached: a result too large, no connection free before the deadline."""


class DeadlineExceeded(ProcessorError, code=grpc.StatusCode.DEADLINE_EXCEEDED, reason=Reason.DEADLINE_EXCEEDED):
    """The work did not finish in the time it had."""


class StoreUnavailable(Unavailable, reason=Reason.STORE_UNAVAILABLE):
    """The processor's store could not be reached or failed mid-operation; the call may be retried."""
