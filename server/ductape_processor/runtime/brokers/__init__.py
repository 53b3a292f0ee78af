"""Message brokers: publishing (publisher.py), the subscription engine (subscriptions.py) and a Subscribe stream's
life (stream.py), for every broker adapter."""

from ductape_processor.runtime.brokers.publisher import BrokerRuntime, Outgoing

__all__ = ["BrokerRuntime", "Outgoing"]
