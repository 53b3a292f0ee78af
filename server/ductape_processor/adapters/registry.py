"""The one shape of every adapter registry: a type name a manifest may give -> the typed model of its settings and
a factory that builds the adapter from them.

Each kind of system keeps one table of these (`brokers/registry.py`, `databases/registry.py`,
`storage/registry.py`); adding a system is one module and one entry. A factory imports its module when it is first
called, so a processor loads only the drivers its manifests use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

SettingsT = TypeVar("SettingsT")
PlaceT = TypeVar("PlaceT")
AdapterT = TypeVar("AdapterT")


@dataclass(frozen=True, slots=True)
class AdapterType(Generic[SettingsT, PlaceT, AdapterT]):
    """One system: the manifest model of its environment settings and what builds its adapter from them and from
    where the adapter works (its name in logs, a folder, a signer: what the kind needs beyond the settings)."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, PlaceT], AdapterT]
    """(settings with secrets resolved, place) -> an adapter; it connects on first use."""

    def open(self, settings: object, place: PlaceT) -> AdapterT:
        """The adapter of one resource environment; `settings` must be an instance of `self.settings`."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__} settings, got {type(settings).__name__}")
        return self.factory(settings, place)
