"""The notification providers a manifest may name: provider name -> typed settings model + factory (an
`AdapterType`, `adapters/registry.py`).

Adding a provider is one module (a `ChannelAdapter`) and one entry in `NOTIFICATION_PROVIDERS`. A factory imports
its module when it is first called, so a processor loads only the drivers its manifests use; a driver that is not
installed is reported as the channel's `NOTIFICATION_PROVIDER_UNAVAILABLE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ductape_processor.adapters.http import HttpClientPool
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


def _fcm(settings: FcmPush, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.push import FcmChannel

    return FcmChannel(settings, placement.http, placement.name)


def _expo(settings: ExpoPush, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.push import ExpoChannel

    return ExpoChannel(settings, placement.http, placement.name)


def _webpush(settings: WebPush, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.webpush import WebPushChannel

    return WebPushChannel(settings, placement.http, placement.name)


def _twilio(settings: TwilioSms, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.sms import TwilioChannel

    return TwilioChannel(settings, placement.http, placement.name)


def _vonage(settings: VonageSms, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.sms import VonageChannel

    return VonageChannel(settings, placement.http, placement.name)


def _plivo(settings: PlivoSms, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.sms import PlivoChannel

    return PlivoChannel(settings, placement.http, placement.name)


def _callback(settings: HttpCallback, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.callback import CallbackChannel

    return CallbackChannel(settings, placement.http, placement.name)


NOTIFICATION_PROVIDERS: dict[str, AdapterType[Any, Placement, ChannelAdapter]] = {
    "log": AdapterType(LogProvider, _log),
    "smtp": AdapterType(SmtpEmail, _smtp),
    "fcm": AdapterType(FcmPush, _fcm),
    "expo": AdapterType(ExpoPush, _expo),
    "webpush": AdapterType(WebPush, _webpush),
    "twilio": AdapterType(TwilioSms, _twilio),
    "vonage": AdapterType(VonageSms, _vonage),
    "plivo": AdapterType(PlivoSms, _plivo),
    "http": AdapterType(HttpCallback, _callback),
}
