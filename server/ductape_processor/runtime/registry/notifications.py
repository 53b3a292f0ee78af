"""The manifest's `notifications` section: a notification per tag, per environment the provider of each channel,
and its messages with a template per channel.

Kept apart from `manifest.py` (which lists it on `Manifest`). Everything is checked here, at apply time: each
template's syntax (`runtime/notifications/templates.py`), the sender's address, and that every environment has a
provider for every channel a message uses. Credentials are never values here: a field that takes one holds
`$Secret{NAME}` (or text containing it), resolved when the channel is first used.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, JsonValue, model_validator
from pydantic import Tag as Case

from ductape_processor.runtime.notifications.addresses import mailbox
from ductape_processor.runtime.notifications.templates import template_variables
from ductape_processor.runtime.registry.durations import PositiveDuration
from ductape_processor.runtime.registry.fields import ManifestModel, NamedResource, http_url, together
from ductape_processor.runtime.registry.storage import Endpoint

PUSH_SERVICES = ("fcm.googleapis.com", "push.services.mozilla.com", "notify.windows.com", "push.apple.com")
"""The browsers' push services: where a Web Push subscription's endpoint may be by default."""
CHANNELS = ("email", "push", "sms", "callback")
"""The channels, in the order results are given."""


def _text_template(value: str) -> str:
    template_variables(value)
    return value


def _html_template(value: str) -> str:
    template_variables(value, html=True)
    return value


def _json_template(value: JsonValue) -> JsonValue:
    """A JSON value whose strings are templates."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            template_variables(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _sender(value: str) -> str:
    if "$Secret{" not in value:
        mailbox(value)
    return value


TextTemplate = Annotated[str, AfterValidator(_text_template)]
HtmlTemplate = Annotated[str, AfterValidator(_html_template)]


def _provider(default: str) -> Any:
    """A discriminator reading `provider`, `default` when a mapping gives none."""

    def which(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("provider", default))
        return str(getattr(value, "provider", default))

    return Discriminator(which)


# -- providers ------------------------------------------------------------------------------------------------------


class LogProvider(ManifestModel):
    """Writes the rendered message to the execution log instead of sending it: for development, nothing to run."""

    provider: Literal["log"]


class SmtpEmail(ManifestModel):
    """Email through an SMTP server (aiosmtplib), on pooled connections."""

    provider: Literal["smtp"] = "smtp"
    host: str = Field(min_length=1, max_length=253, description="The server's host name or address.")
    port: int = Field(587, ge=1, le=65535, description="587 (STARTTLS), 465 (implicit TLS), 25.")
    username: str | None = Field(None, description="Login name; may be `$Secret{NAME}`.")
    password: str | None = Field(None, description="`$Secret{NAME}`, with username.")
    sender: Annotated[str, AfterValidator(_sender)] = Field(
        description="The From mailbox: `shop@example.com` or `Shop <shop@example.com>`."
    )
    tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls", description="STARTTLS (required), TLS from the first byte, or none (a local relay only)."
    )
    pool_size: int = Field(4, ge=1, le=64, description="Connections kept open to the server.")
    timeout: PositiveDuration = Field(timedelta(seconds=30), description="Bound of one SMTP exchange.")
    ca_file: str | None = Field(None, description="PEM file of the CA that signed the server's certificate.")

    _login = together("username", "password")


class FcmPush(ManifestModel):
    """Firebase Cloud Messaging's HTTP v1 API, authorised by a service account's JWT."""

    provider: Literal["fcm"]
    project_id: str = Field(min_length=1, max_length=128, pattern=r"^[a-z0-9-]+$", description="Firebase project.")
    credentials: str = Field(description="`$Secret{NAME}` holding the service account's JSON key.")
    endpoint: Endpoint | None = Field(None, description="Base URL of the FCM API; default Google's.")


class ExpoPush(ManifestModel):
    """Expo's push API."""

    provider: Literal["expo"]
    access_token: str | None = Field(None, description="`$Secret{NAME}`: the access token, when push security is on.")
    endpoint: Endpoint | None = Field(None, description="Base URL of Expo's API; default Expo's.")


class WebPush(ManifestModel):
    """Web Push (RFC 8030) with VAPID (RFC 8292); payloads encrypted as RFC 8291 says."""

    provider: Literal["webpush"]
    vapid_private_key: str = Field(description="`$Secret{NAME}`: the VAPID key, PEM or base64url of the P-256 scalar.")
    vapid_subject: str = Field(pattern=r"^(mailto:|https://)", description="`mailto:` or `https:` contact.")
    ttl: PositiveDuration = Field(timedelta(days=1), description="How long the push service keeps the message.")
    push_services: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=lambda: list(PUSH_SERVICES),
        description="Hosts (or parent domains) a subscription's endpoint may be on; loopback is always allowed.",
    )


class _SmsProvider(ManifestModel):
    """What every SMS provider takes besides its credentials: the sender, and the base URL of its API."""

    sender: str = Field(min_length=1, max_length=64, description="The From number (E.164) or sender id.")
    endpoint: Endpoint | None = Field(None, description="Base URL of the API; default the provider's.")


class TwilioSms(_SmsProvider):
    """Twilio's Messages API."""

    provider: Literal["twilio"]
    account_sid: str = Field(min_length=1, description="The account SID; may be `$Secret{NAME}`.")
    auth_token: str = Field(description="`$Secret{NAME}`: the account's auth token.")


class VonageSms(_SmsProvider):
    """Vonage's (Nexmo's) SMS API."""

    provider: Literal["vonage"]
    api_key: str = Field(min_length=1, description="The API key; may be `$Secret{NAME}`.")
    api_secret: str = Field(description="`$Secret{NAME}`: the API secret.")


class PlivoSms(_SmsProvider):
    """Plivo's Message API."""

    provider: Literal["plivo"]
    auth_id: str = Field(min_length=1, description="The auth id; may be `$Secret{NAME}`.")
    auth_token: str = Field(description="`$Secret{NAME}`: the auth token.")


class CallbackAuth(ManifestModel):
    """How a callback proves itself: a bearer token, or a user name and password (Basic)."""

    type: Literal["bearer", "basic"]
    token: str | None = Field(None, description="`$Secret{NAME}`: the bearer token.")
    username: str | None = None
    password: str | None = Field(None, description="`$Secret{NAME}`, with username.")

    @model_validator(mode="after")
    def _values(self) -> CallbackAuth:
        if self.type == "bearer" and (self.token is None or self.username is not None or self.password is not None):
            raise ValueError("bearer auth takes token only")
        if self.type == "basic" and (self.username is None or self.password is None or self.token is not None):
            raise ValueError("basic auth takes username and password")
        return self


class HttpCallback(ManifestModel):
    """An HTTP call through the actions' HTTP client (same origin lock, header checks and bounds)."""

    provider: Literal["http"] = "http"
    url: Annotated[str, AfterValidator(partial(http_url, secret=True, hint="use auth and headers"))] = Field(
        description="The URL; `:name` path segments take the call's params."
    )
    method: Literal["POST", "PUT", "PATCH", "GET", "DELETE"] = "POST"
    headers: dict[Annotated[str, Field(min_length=1, max_length=128)], str] = Field(default_factory=dict)
    auth: CallbackAuth | None = None
    timeout: PositiveDuration = Field(timedelta(seconds=10), description="Bound of one attempt.")


EmailProvider = Annotated[Annotated[SmtpEmail, Case("smtp")] | Annotated[LogProvider, Case("log")], _provider("smtp")]
PushProvider = Annotated[FcmPush | ExpoPush | WebPush | LogProvider, Field(discriminator="provider")]
SmsProvider = Annotated[TwilioSms | VonageSms | PlivoSms | LogProvider, Field(discriminator="provider")]
CallbackProvider = Annotated[
    Annotated[HttpCallback, Case("http")] | Annotated[LogProvider, Case("log")], _provider("http")
]


class NotificationEnv(ManifestModel):
    """The providers of one environment, one per channel it sends on."""

    email: EmailProvider | None = None
    push: PushProvider | None = None
    sms: SmsProvider | None = None
    callback: CallbackProvider | None = None


# -- messages -------------------------------------------------------------------------------------------------------


class EmailTemplate(ManifestModel):
    """An email: its subject and an HTML part, a text part, or both (sent as multipart/alternative)."""

    subject: TextTemplate = Field(min_length=1)
    html: HtmlTemplate | None = Field(None, description="Variables put in it are HTML-escaped.")
    text: TextTemplate | None = None

    @model_validator(mode="after")
    def _body(self) -> EmailTemplate:
        if self.html is None and self.text is None:
            raise ValueError("an email needs html, text or both")
        return self


class PushTemplate(ManifestModel):
    """A push notification: title, body, and data sent with it."""

    title: TextTemplate
    body: TextTemplate
    data: dict[str, TextTemplate] = Field(default_factory=dict)


class SmsTemplate(ManifestModel):
    """An SMS."""

    body: TextTemplate = Field(min_length=1)


class CallbackTemplate(ManifestModel):
    """A callback's JSON body; its strings are templates."""

    body: Annotated[dict[str, JsonValue], AfterValidator(_json_template)] = Field(default_factory=dict)


class NotificationMessage(NamedResource):
    """A message (`notification:message`) with a template per channel it can be sent on."""

    email: EmailTemplate | None = None
    push: PushTemplate | None = None
    sms: SmsTemplate | None = None
    callback: CallbackTemplate | None = None

    @model_validator(mode="after")
    def _some_channel(self) -> NotificationMessage:
        if all(getattr(self, channel) is None for channel in CHANNELS):
            raise ValueError("a message needs a template for at least one channel (email, push, sms, callback)")
        return self


class Notification(NamedResource):
    """A notification: its providers per environment and its messages; calls name `notification:message`."""

    envs: dict[str, NotificationEnv] = Field(description="Per product environment slug: a provider per channel.")
    messages: list[NotificationMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _providers(self) -> Notification:
        missing = [
            f"messages[{index}].{channel}: environment {slug!r} has no {channel} provider"
            for index, message in enumerate(self.messages)
            for channel in CHANNELS
            if getattr(message, channel) is not None
            for slug, env in self.envs.items()
            if getattr(env, channel) is None
        ]
        if missing:
            raise ValueError("; ".join(missing))
        return self

    def message(self, tag: str) -> NotificationMessage | None:
        """The message with this tag."""
        return next((message for message in self.messages if message.tag == tag), None)
