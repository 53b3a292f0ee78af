"""Webhooks: events emitted to subscribers' endpoints, signed and retried durably (`emitter.WebhookRuntime`,
`deliveries.DeliveryWorker`), and provider webhooks received, verified, stored and dispatched (`receiver.py`).
Import each part from its module; the package re-exports nothing."""
