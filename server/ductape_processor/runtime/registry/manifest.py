"""The product manifest as typed, immutable models.

A manifest is validated once, at apply time, into a `Manifest`; the runtime reads these models, never raw dicts.
Every model forbids unknown fields, so a misspelt key or a resource kind this processor does not know is refused
instead of silently ignored. A new resource kind is one new model and one new list field on `Manifest`.
Cross-references (environment slugs, tags, path parameters) are checked by `references.reference_problems`, which
reports every problem with its path rather than stopping at the first.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, field_validator, model_validator

from ductape_processor.runtime.registry.databases import Database
from ductape_processor.runtime.registry.durations import Duration, PositiveDuration
from ductape_processor.runtime.registry.features import Feature
from ductape_processor.runtime.registry.fields import TAG_PATTERN as TAG_PATTERN
from ductape_processor.runtime.registry.fields import Decorator as Decorator
from ductape_processor.runtime.registry.fields import FieldSpec as FieldSpec
from ductape_processor.runtime.registry.fields import FieldType as FieldType
from ductape_processor.runtime.registry.fields import ManifestModel as _Model
from ductape_processor.runtime.registry.fields import NamedResource as NamedResource
from ductape_processor.runtime.registry.fields import Schema as Schema
from ductape_processor.runtime.registry.fields import Tag as Tag
from ductape_processor.runtime.registry.jobs import DeclaredJob
from ductape_processor.runtime.registry.notifications import Notification
from ductape_processor.runtime.registry.storage import Storage
from ductape_processor.runtime.registry.webhooks import Webhook

TOPIC_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
SECRET_REFERENCE = re.compile(r"\$Secret\{([^{}]*)\}")
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PATH_PARAMETER = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")


class Environment(_Model):
    """A product environment. Callers address it by `slug` (`prd`) or by `name` (`production`)."""

    slug: Tag
    name: str | None = Field(None, min_length=1, max_length=100, description="Human name; also accepted by calls.")
    description: str = ""
    allow_private_endpoints: bool = Field(
        False,
        description="Webhook deliveries may go to private, loopback and link-local addresses (refused otherwise).",
    )


# ---------------------------------------------------------------------------------------------------------------
# Apps and actions

RequestType = Literal[
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "application/xml",
    "text/xml",
    "application/soap+xml",
]
HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_STATUS_RULE = re.compile(r"^([1-5]\d\d)(?:-([1-5]\d\d))?$")


class RetryPolicy(_Model):
    """When and how often a failed upstream call is tried again."""

    max: int = Field(0, ge=0, le=20, description="Retries after the first try; 0 disables retries.")
    backoff: Literal["constant", "exponential"] = "exponential"
    initial: Duration = Field(timedelta(milliseconds=200), description="Delay before the first retry.")
    max_interval: Duration = Field(timedelta(seconds=5), description="Cap on any one delay.")
    on: list[str] = Field(
        default_factory=lambda: ["429", "500-599", "network"],
        description='Status codes ("503"), ranges ("500-599") and "network" (connection errors) that are retried.',
    )

    @field_validator("on")
    @classmethod
    def _rules(cls, value: list[str]) -> list[str]:
        bad = []
        for rule in value:
            match = _STATUS_RULE.match(rule)
            if rule != "network" and (match is None or (match.group(2) and match.group(2) < match.group(1))):
                bad.append(repr(rule))
        if bad:
            raise ValueError(f'{", ".join(bad)}: not a status code ("503"), a range ("500-599") or "network"')
        return value

    @model_validator(mode="after")
    def _intervals(self) -> RetryPolicy:
        if self.initial > self.max_interval:
            raise ValueError("initial is longer than max_interval")
        return self


class CircuitBreakerPolicy(_Model):
    """When an app environment's calls are refused for a while after repeated failures."""

    failures: int = Field(5, ge=1, le=1000, description="Consecutive failures that open the circuit.")
    cooldown: PositiveDuration = Field(timedelta(seconds=30), description="How long it stays open before one probe.")


class AppEnv(_Model):
    """How an app is reached in one product environment."""

    base_url: str = Field(description="Scheme, host, optional port and base path: `https://api.example.com/v2`.")
    request_type: RequestType = "application/json"

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("base_url may not carry a query, a fragment or credentials (use auths)")
        return value.rstrip("/")


class TokenAuth(_Model):
    """A static credential: headers, query or body values built from secrets (`$Secret{NAME}`)."""

    tag: Tag
    type: Literal["token"]
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: dict[str, JsonValue] = Field(default_factory=dict)


class CredentialAuth(_Model):
    """A credential flow: a login action of the same app mints a token, reused until `expiry`."""

    tag: Tag
    type: Literal["credential"]
    action: Tag = Field(description="Tag of the app's login action.")
    expiry: PositiveDuration = Field(description="How long a minted token is reused.")
    input: dict[str, JsonValue] = Field(default_factory=dict, description="Input of the login action.")
    headers: dict[str, str] = Field(default_factory=dict, description="Values built from the login response.")
    query: dict[str, str] = Field(default_factory=dict)
    body: dict[str, JsonValue] = Field(default_factory=dict)


Auth = Annotated[TokenAuth | CredentialAuth, Field(discriminator="type")]


class ActionInput(_Model):
    """The input contract of an action, per part of the request."""

    params: Schema = Field(default_factory=dict, description="Path parameters (`:name` in the path).")
    query: Schema = Field(default_factory=dict)
    body: Schema = Field(default_factory=dict)
    headers: Schema = Field(default_factory=dict)


class Action(NamedResource):
    """One endpoint of an app."""

    method: HttpMethod
    path: str = Field(min_length=1, max_length=2048, description="Starts with `/`; `:name` marks a path parameter.")
    headers: dict[str, str] = Field(default_factory=dict, description="Header templates.")
    query: dict[str, JsonValue] = Field(default_factory=dict, description="Query templates.")
    body: JsonValue = Field(None, description="Body template.")
    input: ActionInput = Field(default_factory=ActionInput)
    timeout: PositiveDuration | None = Field(None, description="Overrides the app's timeout.")
    retry: RetryPolicy | None = Field(None, description="Overrides the app's retry policy.")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith("//"):
            raise ValueError("a path starts with a single '/' and names no host")
        if "?" in value or "#" in value:
            raise ValueError("a path has no query or fragment (use query and input.query)")
        return value

    def path_parameters(self) -> list[str]:
        """Names of the `:name` parameters in the path, in order."""
        return PATH_PARAMETER.findall(self.path)


class App(NamedResource):
    """A third-party API and its actions."""

    envs: dict[str, AppEnv] = Field(description="Per product environment slug: base URL and request type.")
    constants: dict[str, JsonValue] = Field(default_factory=dict)
    variables: dict[str, dict[str, JsonValue]] = Field(
        default_factory=dict,
        description="Per product environment slug: values read by `$Variable{app}{key}`.",
    )
    auths: list[Auth] = Field(default_factory=list)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: PositiveDuration = Field(timedelta(seconds=30), description="Per-try timeout of the app's actions.")
    circuit_breaker: CircuitBreakerPolicy = Field(default_factory=CircuitBreakerPolicy)
    idempotency_header: str = Field(
        "Idempotency-Key",
        max_length=64,
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]*$",
        description="The header that carries a call's idempotency key to the upstream; empty to send none.",
    )
    actions: list[Action] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Message brokers


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    if value.startswith("$Secret{") and value.endswith("}"):
        return value
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(
            f"{value.split('@')[-1]!r} is not a URL of this broker (expected {allowed}, or $Secret{{NAME}})"
        )
    return value


def _url_of(*schemes: str) -> AfterValidator:
    """Checks that a broker's `url` has one of `schemes` (a `$Secret{NAME}` standing for the whole URL passes)."""
    return AfterValidator(lambda value: _check_url(value, schemes))


class MemoryBrokerEnv(_Model):
    """The in-process broker: nothing to install, nothing survives a restart."""

    type: Literal["memory"]


class RedisBrokerEnv(_Model):
    """Redis Streams with consumer groups."""

    type: Literal["redis"]
    url: Annotated[str, _url_of("redis", "rediss")] = Field(
        description="`redis://` or `rediss://`; may be `$Secret{NAME}` or contain one."
    )


class RabbitMQBrokerEnv(_Model):
    """RabbitMQ through AMQP 0-9-1."""

    type: Literal["rabbitmq"]
    url: Annotated[str, _url_of("amqp", "amqps")] = Field(
        description="`amqp://` or `amqps://`; may be `$Secret{NAME}` or contain one."
    )
    exchange: str = Field("", max_length=255, description="Exchange topics publish to; empty: one per topic.")


class NatsBrokerEnv(_Model):
    """NATS JetStream."""

    type: Literal["nats"]
    url: Annotated[str, _url_of("nats", "tls")] = Field(
        description="`nats://` or `tls://`; may be `$Secret{NAME}` or contain one."
    )
    stream: str | None = Field(None, max_length=255, description="JetStream stream name; default `ductape`.")


BrokerEnv = Annotated[MemoryBrokerEnv | RedisBrokerEnv | RabbitMQBrokerEnv | NatsBrokerEnv, Field(discriminator="type")]


class Topic(_Model):
    """A topic: callers use its tag (`broker:topic`), the broker sees its name."""

    tag: Tag
    name: str = Field(min_length=1, max_length=255, pattern=TOPIC_NAME_PATTERN)


class Broker(NamedResource):
    """A message broker and its topics."""

    envs: dict[str, BrokerEnv] = Field(description="Per product environment slug: broker type and connection.")
    topics: list[Topic] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Sessions and caches

_SESSION_SELECTOR = re.compile(r"^\$Session\{([^{}]+)\}$")


class SessionType(_Model):
    """A kind of user session: the data it carries, who it identifies and how long it lives."""

    tag: Tag
    description: str = ""
    data_schema: Schema = Field(alias="schema", description="The fields a session's data holds.")
    selector: str = Field(description="The field identifying the user: `$Session{userId}`.")
    expiry: PositiveDuration = Field(timedelta(hours=1), description="Lifetime of a session token.")
    refresh_expiry: PositiveDuration = Field(timedelta(days=30), description="Lifetime of a refresh token.")

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="after")
    def _check(self) -> SessionType:
        match = _SESSION_SELECTOR.match(self.selector)
        if match is None:
            raise ValueError(f"selector {self.selector!r} must be $Session{{field}}")
        if match.group(1) not in self.data_schema:
            raise ValueError(f"selector names {match.group(1)!r}, which is not a field of the schema")
        if self.refresh_expiry < self.expiry:
            raise ValueError("refresh_expiry is shorter than expiry")
        return self

    @property
    def identifier_field(self) -> str:
        """The schema field that identifies the user."""
        match = _SESSION_SELECTOR.match(self.selector)
        assert match is not None
        return match.group(1)


class Cache(_Model):
    """A cache: an execution naming it memoises its result for `ttl`."""

    tag: Tag
    description: str = ""
    ttl: PositiveDuration = Field(description="How long a stored result is served.")
    backend: Literal["store", "redis"] = Field(
        "store", description="Where entries live: the processor's store or Redis."
    )
    url: str | None = Field(
        None, description="`redis://` URL when backend is redis; may be `$Secret{NAME}` or contain one."
    )

    @model_validator(mode="after")
    def _backend(self) -> Cache:
        if self.backend == "redis":
            if self.url is None:
                raise ValueError("a redis cache needs url")
            _check_url(self.url, ("redis", "rediss"))
        elif self.url is not None:
            raise ValueError("url is only for backend: redis")
        return self


# ---------------------------------------------------------------------------------------------------------------
# The manifest


class Manifest(_Model):
    """One product: its environments and its resources."""

    product: Tag
    name: str | None = None
    description: str = ""
    environments: list[Environment] = Field(min_length=1)
    apps: list[App] = Field(default_factory=list)
    brokers: list[Broker] = Field(default_factory=list)
    sessions: list[SessionType] = Field(default_factory=list)
    caches: list[Cache] = Field(default_factory=list)
    storage: list[Storage] = Field(default_factory=list)
    databases: list[Database] = Field(default_factory=list)
    notifications: list[Notification] = Field(default_factory=list)
    jobs: list[DeclaredJob] = Field(default_factory=list)
    webhooks: list[Webhook] = Field(default_factory=list)
    features: list[Feature] = Field(default_factory=list)

    # Built with the class (unlike the models it holds, see ManifestModel): the first Apply or Validate would
    # otherwise wait some 30 ms for it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=False)

    def find_environment(self, slug_or_name: str) -> Environment | None:
        """The environment with this slug, else the one with this name."""
        for env in self.environments:
            if env.slug == slug_or_name:
                return env
        for env in self.environments:
            if env.name == slug_or_name:
                return env
        return None
