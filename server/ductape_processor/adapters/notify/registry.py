"""The notification providers a manifest may name: provider name -> typed settings model + factory.

Adding a provider is one module (a `ChannelAdapter`) and one entry in `NOTIFICATION_PROVIDERS`. A factory imports
its module when it is first called, so a processor loads only the drivers its manifests use; a driver that is not
installed is reported as the channel's `NOTIFICATION_PROVIDER_UNAVAILABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ductape_processor.adapters.http import HttpClientPool
from ductape_processor.adapters.notify.base import ChannelAdapter
from ductape_processor.runtime.registry.notifications import (
    LogProvider,
    SmtpEmail,
)

SettingsT = TypeVar("SettingsT")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one channel's provider works: its name in logs and errors (`product/env/notification/channel`) and the
    HTTP client of the HTTP providers (the actions' pool: its origin lock, header checks and response bound)."""

    name: str
    http: HttpClientPool


@dataclass(frozen=True, slots=True)
class NotificationProvider(Generic[SettingsT]):
    """One provider: the manifest model of its settings and what builds its adapter from them."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, Placement], ChannelAdapter]
    """(settings with secrets resolved, placement) -> an adapter; it connects on first use."""

    def open(self, settings: Any, placement: Placement) -> ChannelAdapter:
        """The adapter of one channel; `settings` must be an instance of `self.settings`."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__} settings, got {type(settings).__name__}")
        return self.factory(settings, placement)


def _log(settings: LogProvider, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.log import LogChannel

    return LogChannel()


def _smtp(settings: SmtpEmail, placement: Placement) -> ChannelAdapter:
    from ductape_processor.adapters.notify.smtp import SmtpChannel

    return SmtpChannel(settings, placement.name)


NOTIFICATION_PROVIDERS: dict[str, NotificationProvider[Any]] = {
    "log": NotificationProvider(LogProvider, _log),
    "smtp": NotificationProvider(SmtpEmail, _smtp),
}
