"""The notification providers a manifest may name: provider name -> typed settings model + factory (an
`AdapterType`, `adapters/registry.py`).

Adding a provider is one module (a `ChannelAdapter`) and one entry in `NOTIFICATION_PROVIDERS`. A factory imports
its module when it is first called, so a processor loads only the drivers its manifests use; a driver that is not
installed is reported as the channel's `NOTIFICATION_PROVIDER_UNAVAILABLE`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.notify.base import ChannelAdapter
from ductape_processor.adapters.registry import AdapterType
from ductape_processor.runtime.registry.notifications import (
    ExpoPush,
    FcmPush,
    HttpCallback,
    LogProvider,
    PlivoSms,
    SmtpEmail,
    TwilioSms,
    VonageSms,
    WebPush,
)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one channel's provider works: its name in logs and errors (`product/env/notification.channel`) and the
    HTTP client of the HTTP providers (the actions' pool: its header checks, redirect rule and response bound)."""

    name: str
    http: HttpClientPool


def _log(settings: LogProvider, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.log import LogChannel

    return LogChannel()


def _smtp(settings: SmtpEmail, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.smtp import SmtpChannel

    return SmtpChannel(settings, placement.name)


def _over_http(module: str, name: str) -> Callable[[Any, Placement], ChannelAdapter]:
    """The factory of a provider reached over HTTP: class `name` of `adapters/notify/<module>.py`, built from the
    settings, the actions' HTTP client and the channel's name (every such provider takes these three)."""

    def factory(settings: Any, placement: Placement) -> ChannelAdapter:
        channel = getattr(importlib.import_module(f"ductape_processor.adapters.notify.{module}"), name)
        adapter: ChannelAdapter = channel(settings, placement.http, placement.name)
        return adapter

    return factory


NOTIFICATION_PROVIDERS: dict[str, AdapterType[Any, Placement, ChannelAdapter]] = {
    "log": AdapterType(LogProvider, _log),
    "smtp": AdapterType(SmtpEmail, _smtp),
    "fcm": AdapterType(FcmPush, _over_http("push", "FcmChannel")),
    "expo": AdapterType(ExpoPush, _over_http("push", "ExpoChannel")),
    "webpush": AdapterType(WebPush, _over_http("webpush", "WebPushChannel")),
    "twilio": AdapterType(TwilioSms, _over_http("sms", "TwilioChannel")),
    "vonage": AdapterType(VonageSms, _over_http("sms", "VonageChannel")),
    "plivo": AdapterType(PlivoSms, _over_http("sms", "PlivoChannel")),
    "http": AdapterType(HttpCallback, _over_http("callback", "CallbackChannel")),
}
