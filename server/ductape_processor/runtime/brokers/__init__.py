"""Message brokers: publishing and opening streams (publisher.py), the subscription engine (subscriptions.py) and a
Subscribe stream's whole life (stream.py), for every broker adapter."""

from ductape_processor.adapters.brokers.base import InboundMessage
from ductape_processor.runtime.brokers.publisher import BrokerRuntime, Outgoing
from ductape_processor.runtime.brokers.stream import Ack, Batch, Nack, StaleAcks, StreamEvent, StreamRequest
from ductape_processor.runtime.brokers.subscriptions import Limits

__all__ = [
    "Ack",
    "Batch",
    "BrokerRuntime",
    "InboundMessage",
    "Limits",
    "Nack",
    "Outgoing",
    "StaleAcks",
    "StreamEvent",
    "StreamRequest",
]
