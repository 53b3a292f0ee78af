"""The pieces every manifest model is built from: the base models, tags, and input-contract fields.

They live apart from `manifest.py` so that a resource kind's models in a sibling module (`databases.py`) and the
`Manifest` that lists them can both import them without an import loop; `manifest.py` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from ductape_processor.errors import NotFound
from ductape_processor.reasons import Reason

TAG_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
Tag = Annotated[
    str,
    Field(
        pattern=TAG_PATTERN,
        description="Letters, digits, `_` and `-`, starting with a letter, at most 64 characters.",
    ),
]


class ManifestModel(BaseModel):
    """Base of every manifest model: unknown fields are errors, instances are immutable.

    `defer_build`: a model's validator and serializer are built when first used, not when its class is defined.
    Manifests are validated through `Manifest`, whose validator holds every model it contains; the models' own
    (about 0.5 MB together, idle) are built only for those the code validates or dumps by themselves (an adapter's
    settings, dumped once when it is opened: a millisecond or two).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)


def http_url(value: str, *, secret: bool = False, query: bool = True, hint: str = "") -> str:
    """`value` if it is an http:// or https:// URL with a host and no credentials or fragment (nor query, unless
    `query`); with `secret`, a `$Secret{NAME}` (resolved when used) passes too. `hint` says where credentials go
    instead."""
    if secret and value.startswith("$Secret{") and value.endswith("}"):
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host" + (", or $Secret{NAME}" if secret else ""))
    if parts.username or parts.password or parts.fragment or (parts.query and not query):
        carried = "credentials or a fragment" if query else "credentials, a query or a fragment"
        raise ValueError(f"may not carry {carried}" + (f" ({hint})" if hint else ""))
    return value


def together(first: str, second: str) -> Any:
    """A model validator: the optional fields `first` and `second` are both set or both unset."""

    def check(model: BaseModel) -> BaseModel:
        if (getattr(model, first) is None) != (getattr(model, second) is None):
            raise ValueError(f"{first} and {second} go together")
        return model

    validator: Callable[[BaseModel], BaseModel] = check
    return model_validator(mode="after")(validator)


class NamedResource(ManifestModel):
    """Base of a resource a call names (an app, an action, a broker, a database …): the tag callers use, a name
    for people, a description."""

    tag: Tag
    name: str | None = None
    description: str = ""


class _Tagged(Protocol):
    @property
    def tag(self) -> str: ...


TaggedT = TypeVar("TaggedT", bound=_Tagged)


def named(product: str, resources: Iterable[TaggedT], kind: str, tag: str, reason: Reason) -> TaggedT:
    """The resource of `kind` (broker, cache, database …) a call names by its tag; NotFound with `reason`, naming
    the product and the tag, when the product has none by that tag."""
    found = next((resource for resource in resources if resource.tag == tag), None)
    if found is None:
        raise NotFound.in_product(product, kind, tag, reason)
    return found


FieldType = Literal["string", "number", "integer", "boolean", "email", "uuid", "date", "array", "object"]


class Decorator(ManifestModel):
    """Text added to a string value before it is sent."""

    text: str
    position: Literal["prepend", "append"] = "prepend"


class FieldSpec(ManifestModel):
    """The contract of one input field. `0`, `""` and `false` are values, not missing."""

    type: FieldType = "string"
    required: bool = False
    min_length: int | None = Field(None, ge=0, description="Least length of a string or array.")
    max_length: int | None = Field(None, ge=0, description="Greatest length of a string or array.")
    default: JsonValue = Field(None, description="Value used when the caller gives none.")
    decorator: Decorator | None = None
    description: str = ""

    @model_validator(mode="after")
    def _lengths(self) -> FieldSpec:
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length is greater than max_length")
        if (self.min_length is not None or self.max_length is not None) and self.type not in (
            "string",
            "email",
            "array",
        ):
            raise ValueError(f"min_length/max_length apply to strings and arrays, not to type {self.type!r}")
        if self.decorator is not None and self.type != "string":
            raise ValueError(f"a decorator applies to strings, not to type {self.type!r}")
        return self


Schema = dict[Annotated[str, Field(min_length=1, max_length=128)], FieldSpec]
