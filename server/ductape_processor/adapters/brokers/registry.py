"""The broker types a manifest may name: type name -> typed settings model + factory (`adapters/registry.py`), the
place an adapter is opened with being a name for logs.

Adding a broker is one module (an adapter built on `base` and the toolkit) and one entry in `BROKER_TYPES`.
"""

from __future__ import annotations

from typing import Any

from ductape_processor.adapters.brokers.base import BrokerAdapter
from ductape_processor.adapters.registry import AdapterType
from ductape_processor.runtime.registry.manifest import (
    MemoryBrokerEnv,
    NatsBrokerEnv,
    RabbitMQBrokerEnv,
    RedisBrokerEnv,
)


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


BROKER_TYPES: dict[str, AdapterType[Any, str, BrokerAdapter]] = {
    "memory": AdapterType(MemoryBrokerEnv, _memory),
    "redis": AdapterType(RedisBrokerEnv, _redis),
    "rabbitmq": AdapterType(RabbitMQBrokerEnv, _rabbitmq),
    "nats": AdapterType(NatsBrokerEnv, _nats),
}
