"""Typed domain errors.

Domain code raises these; `api.status` turns them into a gRPC status with rich details (AIP-193) in one place.
A `reason` is an UPPER_SNAKE word a caller can branch on; `metadata` names the resource involved; `violations`
lists bad fields for `google.rpc.BadRequest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (or one problem in a manifest): where, and why."""

    field: str
    description: str


class ProcessorError(Exception):
    """Base of every error a caller may see; carries the canonical code, the reason and the details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
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


class InvalidArgument(ProcessorError):
    """A request field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """An error about one field, with that field as its only violation."""
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])


class InvalidManifest(InvalidArgument):
    """A product manifest has problems; each is a violation whose field is its path in the manifest."""

    reason = "INVALID_MANIFEST"

    def __init__(self, problems: Iterable[FieldViolation]) -> None:
        listed = list(problems)
        first = listed[0] if listed else FieldViolation("", "invalid manifest")
        where = f"{first.field}: " if first.field else ""
        others = len(listed) - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
        super().__init__(f"invalid manifest: {where}{first.description}{more}", violations=listed)


class NotFound(ProcessorError):
    """A named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ProductNotFound(NotFound):
    """No manifest was ever applied for this product."""

    reason = "PRODUCT_NOT_FOUND"

    def __init__(self, product: str) -> None:
        super().__init__(f"product {product!r} not found", metadata={"product": product})


class EnvNotFound(NotFound):
    """The product (at the version in use) declares no environment with this slug or name."""

    reason = "ENV_NOT_FOUND"

    def __init__(self, product: str, env: str, version: int, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known))
        super().__init__(
            f"product {product!r} version {version} has no environment {env!r} (it has: {names})",
            metadata={"product": product, "env": env, "version": str(version)},
        )


class VersionNotFound(NotFound):
    """The product has no such version."""

    reason = "VERSION_NOT_FOUND"

    def __init__(self, product: str, version: int, latest: int) -> None:
        super().__init__(
            f"product {product!r} has no version {version} (latest is {latest})",
            metadata={"product": product, "version": str(version), "latest_version": str(latest)},
        )


class FailedPrecondition(ProcessorError):
    """The call cannot run in the current state of things (or as the product is configured)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unauthenticated(ProcessorError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class Unavailable(ProcessorError):
    """The processor cannot serve the call now; a retry (possibly on another replica) may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
