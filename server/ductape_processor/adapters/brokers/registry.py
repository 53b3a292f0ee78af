"""The broker types a manifest may name: type name -> typed settings model + factory.

Adding a broker is one module (an adapter built on `base` and the toolkit) and one entry in `BROKER_TYPES`. A
factory imports its module when it is first called, so a processor loads only the drivers its manifests use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ductape_processor.adapters.brokers.base import BrokerAdapter
from ductape_processor.runtime.registry.manifest import (
    MemoryBrokerEnv,
    NatsBrokerEnv,
    RabbitMQBrokerEnv,
    RedisBrokerEnv,
)

SettingsT = TypeVar("SettingsT")


@dataclass(frozen=True, slots=True)
class BrokerType(Generic[SettingsT]):
    """One broker type: the manifest model of its environment settings and what builds its adapter from them."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, str], BrokerAdapter]
    """(settings with secrets resolved, a name for logs) -> an adapter; it connects on first use."""

    def open(self, settings: Any, name: str) -> BrokerAdapter:
        """The adapter of one broker environment; `settings` must be an instance of `self.settings`."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__} settings, got {type(settings).__name__}")
        return self.factory(settings, name)


def _memory(settings: MemoryBrokerEnv, name: str) -> BrokerAdapter:
    from ductape_processor.adapters.brokers.memory import MemoryBroker

    return MemoryBroker()


def _redis(settings: RedisBrokerEnv, name: str) -> BrokerAdapter:
    from ductape_processor.adapters.brokers.redis import RedisBroker

    return RedisBroker(settings.url, name)


def _rabbitmq(settings: RabbitMQBrokerEnv, name: str) -> BrokerAdapter:
    from ductape_processor.adapters.brokers.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(settings.url, settings.exchange, name)


def _nats(settings: NatsBrokerEnv, name: str) -> BrokerAdapter:
    from ductape_processor.adapters.brokers.nats import DEFAULT_STREAM, NatsBroker

    return NatsBroker(settings.url, settings.stream or DEFAULT_STREAM, name)


BROKER_TYPES: dict[str, BrokerType[Any]] = {
    "memory": BrokerType(MemoryBrokerEnv, _memory),
    "redis": BrokerType(RedisBrokerEnv, _redis),
    "rabbitmq": BrokerType(RabbitMQBrokerEnv, _rabbitmq),
    "nats": BrokerType(NatsBrokerEnv, _nats),
}
