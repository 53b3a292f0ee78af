"""Message brokers: the messages the runtime and the adapters pass (messages.py), publishing and opening streams
(publisher.py), the subscription engine (subscriptions.py) and a Subscribe stream's whole life (stream.py), for every
broker adapter.

Import from those modules: this package re-exports nothing, so that an adapter importing the message types does not
import the publisher (which imports the adapters).
"""
