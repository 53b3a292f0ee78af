"""The manifest's `webhooks` section: a webhook per tag, its events, per environment the endpoints its events are
emitted to and the path provider webhooks are received on.

Kept apart from `manifest.py` (which lists it on `Manifest`); cross-references (environment slugs, an endpoint's
events, the broker topic a receive publishes to) are checked by `references.py` with the other kinds'. Secrets are
never values here: an endpoint's and a receive's `secret` is `$Secret{NAME}`, resolved when it is first used.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import partial
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, Field, model_validator

from ductape_processor.adapters.http.encoding import header_name_problem, header_value_problem
from ductape_processor.runtime.registry.durations import Duration, PositiveDuration
from ductape_processor.runtime.registry.fields import ManifestModel, NamedResource, Schema, Tag, http_url
from ductape_processor.runtime.registry.jobs import JobRetryPolicy

DEFAULT_SCHEDULE: Final = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
"""When a delivery's attempts are made, each after the one before failed: at once, then 5 s, 5 min, 30 min, 2 h,
5 h, 10 h and 10 h later (Svix's schedule)."""
_SECRET_ONLY = re.compile(r"^\$Secret\{[^{}]+\}$")
_RECEIVE_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def _secret(value: str) -> str:
    if not _SECRET_ONLY.match(value):
        raise ValueError("must be $Secret{NAME}: a signing secret is never written in a manifest")
    return value


def _headers(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        problem = header_name_problem(name) or header_value_problem(text)
        if problem is not None:
            raise ValueError(f"header {name!r}: {problem}")
        if name.lower().startswith("webhook-"):
            raise ValueError(f"header {name!r}: the webhook-* headers are the signature's, set by the processor")
    return value


SecretRef = Annotated[str, AfterValidator(_secret)]


class WebhookEvent(ManifestModel):
    """An event a webhook emits: its tag, and optionally the fields its payload must have."""

    tag: Tag
    description: str = ""
    payload_schema: Schema | None = Field(
        None, alias="schema", description="The payload's fields (as an action's input body); unset: any JSON object."
    )


class WebhookEndpoint(ManifestModel):
    """A subscriber's URL in one environment, the secret its deliveries are signed with, the events it takes."""

    url: Annotated[str, AfterValidator(partial(http_url, hint="use headers"))] = Field(
        description="Where the events are POSTed."
    )
    secret: SecretRef | list[SecretRef] = Field(
        description="`$Secret{NAME}` of a `whsec_` secret; a list (newest first) signs with each during a rotation."
    )
    events: list[Tag] = Field(default_factory=list, description="The event tags it takes; empty: every event.")
    headers: Annotated[dict[str, str], AfterValidator(_headers)] = Field(
        default_factory=dict, description="Headers sent with every delivery."
    )
    rate_limit: int | None = Field(
        None, ge=1, le=100_000, description="Most deliveries per second from each replica; unset: no cap."
    )

    @property
    def secrets(self) -> list[str]:
        """The secret references, newest first."""
        return [self.secret] if isinstance(self.secret, str) else list(self.secret)

    @model_validator(mode="after")
    def _some_secret(self) -> WebhookEndpoint:
        if not self.secrets or len(self.secrets) > 3:
            raise ValueError("give one to three secrets")
        return self


class DispatchJob(ManifestModel):
    """A job a received webhook schedules: it runs once, at once, with the webhook as its input (docs/webhooks.md)."""

    kind: Literal["action", "database_action", "storage"] = Field(
        "action",
        description="action: the JSON body is the action's `body`; database_action: its `data`; storage: the body "
        "is saved as a file.",
    )
    event: str = Field(min_length=1, description="`app_tag:action_tag`, `database_tag:action_tag` or `storage_tag`.")
    retry: JobRetryPolicy = Field(default_factory=JobRetryPolicy, description="How the job's failed run is retried.")


class Dispatch(ManifestModel):
    """Where a received webhook goes once stored: a topic, a job, a feature, or several of them."""

    publish: str | None = Field(
        None, pattern=r"^[^:]+:[^:]+$", description="A topic of the product, `broker_tag:topic_tag`."
    )
    job: DispatchJob | None = Field(None, description="A job to schedule for each received webhook.")
    feature: Tag | None = Field(
        None,
        description="A feature of the product, by tag: one run is started for each received webhook, with its JSON "
        "body as the run's input.",
    )

    @model_validator(mode="after")
    def _somewhere(self) -> Dispatch:
        if self.publish is None and self.job is None and self.feature is None:
            raise ValueError("give publish (a topic), job, feature, or several of them")
        return self


class Receive(ManifestModel):
    """How provider webhooks are received in one environment."""

    path: str = Field(
        pattern=_RECEIVE_PATH.pattern,
        max_length=256,
        description="Served at /webhooks/<product>/<env><path> on the webhook listener.",
    )
    verify: Literal["standard-webhooks", "hmac-sha256", "none"] = Field(
        "standard-webhooks",
        description="standard-webhooks (webhook-id, webhook-timestamp, webhook-signature), hmac-sha256 of the body "
        "in `header`, or none.",
    )
    secret: SecretRef | None = Field(None, description="The signing secret; required unless verify is none.")
    header: str = Field("X-Signature", description="hmac-sha256: the header carrying the signature.")
    encoding: Literal["hex", "base64"] = Field("hex", description="hmac-sha256: how the signature is written.")
    prefix: str = Field("", max_length=32, description="hmac-sha256: text before the signature (`sha256=`).")
    tolerance: PositiveDuration = Field(
        timedelta(minutes=5), description="standard-webhooks: the most a webhook-timestamp may differ from now."
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024, description="Larger bodies are refused 413.")
    dispatch: Dispatch | None = Field(
        None,
        description="Publish each received webhook to a topic, schedule a job with it, start a feature run with it, "
        "or several of them.",
    )

    @model_validator(mode="after")
    def _secret_given(self) -> Receive:
        if self.verify != "none" and self.secret is None:
            raise ValueError(f"verify {self.verify} needs a secret")
        problem = header_name_problem(self.header)
        if problem is not None:
            raise ValueError(f"header {self.header!r}: {problem}")
        return self


class Webhook(NamedResource):
    """A webhook: the events it emits, the endpoints they go to and the path provider webhooks come in on."""

    events: list[WebhookEvent] = Field(default_factory=list)
    endpoints: dict[str, list[WebhookEndpoint]] = Field(
        default_factory=dict, description="Per product environment slug: the subscribed endpoints."
    )
    receive: dict[str, Receive] = Field(default_factory=dict, description="Per product environment slug.")
    schedule: list[Duration] | None = Field(
        None,
        min_length=1,
        max_length=20,
        description="Delays before each attempt (the first usually 0); default 0, 5s, 5m, 30m, 2h, 5h, 10h, 10h.",
    )
    timeout: PositiveDuration = Field(timedelta(seconds=15), description="How long an endpoint has to answer 2xx.")
    disable_after: PositiveDuration = Field(
        timedelta(days=5), description="An endpoint failing every delivery for this long is disabled."
    )

    def event(self, tag: str) -> WebhookEvent | None:
        """The event of that tag."""
        return next((event for event in self.events if event.tag == tag), None)

    @property
    def delays(self) -> tuple[timedelta, ...]:
        """The schedule: the delay before each attempt."""
        return DEFAULT_SCHEDULE if self.schedule is None else tuple(self.schedule)
