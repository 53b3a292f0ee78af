"""Received provider webhooks: the receive path of a webhook in an environment, the signature verified (in constant
time, within the timestamp tolerance), the webhook stored once (a webhook id received before is a replay, refused),
then dispatched: published to the receive's topic, where Receive streams (and any subscriber) take it.

The HTTP listener (api/webhook_http.py) only converts: it finds the target, reads at most its `max_body_bytes`, and
answers what `accept` says. A dispatch that fails is tried again a few times, then logged; the webhook stays stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ductape_processor.errors import FailedPrecondition, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import IncomingEvent, OutgoingMessage
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.brokers.stream import SubscribeStream
from ductape_processor.runtime.brokers.subscriptions import Limits
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.retry import Backoff
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.registry.webhooks import Receive, Webhook
from ductape_processor.runtime.webhooks.signing import SignatureRefused, signing_key, verify_hmac, verify_standard
from ductape_processor.store.base import Store
from ductape_processor.store.webhook_records import ReceivedRecord

log = logging.getLogger(__name__)

HEADER_ATTRIBUTE: Final = "header."
"""The prefix of the attributes that carry a received webhook's headers on its dispatch topic."""
MAX_HEADER_ATTRIBUTES: Final = 48
"""Headers carried as attributes at most (the broker takes 64 attributes)."""
DISPATCH_TRIES: Final = 5
DISPATCH_BACKOFF: Final = Backoff(0.2, 5.0)


@dataclass(frozen=True, slots=True)
class ReceiveTarget:
    """The receive path a request came to: the environment's slug, the webhook and its receive settings."""

    product: str
    env: str
    webhook: Webhook
    receive: Receive


def attributes(record: ReceivedRecord, headers: Mapping[str, str]) -> dict[str, str]:
    """The attributes a received webhook is published with: its ids, and its headers (those that fit)."""
    carried = {"webhook": record.webhook, "webhook_received_id": record.received_id}
    if record.webhook_id != record.received_id:
        carried["webhook_id"] = record.webhook_id
    for name, value in list(headers.items())[:MAX_HEADER_ATTRIBUTES]:
        key = HEADER_ATTRIBUTE + name
        if len(value) <= 4096 and all(c.isalnum() or c in "-_." for c in key):
            carried[key] = value
    return carried


def received(message: IncomingEvent) -> ReceivedRecord:
    """A received webhook as its dispatch topic carried it (`attributes` says what it was)."""
    carried = message.attributes
    received_id = carried.get("webhook_received_id", message.id)
    headers = {k.removeprefix(HEADER_ATTRIBUTE): v for k, v in carried.items() if k.startswith(HEADER_ATTRIBUTE)}
    return ReceivedRecord(
        received_id=received_id,
        product="",
        env="",
        webhook=carried.get("webhook", ""),
        webhook_id=carried.get("webhook_id", ""),
        received_at=message.time,
        content_type=message.content_type,
        headers=json.dumps(headers, separators=(",", ":")),
        body=message.data,
    )


class WebhookReceiver:
    """Verifies, stores and dispatches provider webhooks."""

    def __init__(
        self, registry: Registry, store: Store, brokers: BrokerRuntime, secrets: SecretSource, clock: Clock
    ) -> None:
        self._registry = registry
        self._store = store
        self._brokers = brokers
        self._secrets = secrets
        self._clock = clock
        self._dispatching: set[asyncio.Task[None]] = set()

    async def declared(self) -> bool:
        """True when the latest version of some product declares a receive path (the listener is needed)."""
        for revision in await self._store.revisions():
            state = await self._registry.state(revision.product)
            if state.latest is not None:
                manifest = await self._registry.model(state.latest)
                if any(webhook.receive for webhook in manifest.webhooks):
                    return True
        return False

    async def target(self, product: str, env: str, path: str) -> ReceiveTarget:
        """The webhook whose receive path in `env` is `path`; NOT_FOUND `WEBHOOK_NOT_FOUND` otherwise."""
        resolved = await self._registry.resolve(product, env)
        for webhook in resolved.manifest.webhooks:
            receive = webhook.receive.get(resolved.env.slug)
            if receive is not None and receive.path == path:
                return ReceiveTarget(resolved.product, resolved.env.slug, webhook, receive)
        raise NotFound(f"no webhook receives on {path!r}", reason=Reason.WEBHOOK_NOT_FOUND)

    def _secret(self, target: ReceiveTarget) -> str:
        assert target.receive.secret is not None  # the manifest requires one unless verify is none

        def missing(name: str) -> ProcessorError:
            return FailedPrecondition(f"secret {name} is not defined on this processor", reason=Reason.SECRET_NOT_FOUND)

        return self._secrets.resolve(target.receive.secret, missing)

    def verify(self, target: ReceiveTarget, headers: Mapping[str, str], body: bytes) -> str:
        """The id that names the webhook against replays ("" for verify: none); SignatureRefused when the signature
        does not verify."""
        receive = target.receive
        if receive.verify == "none":
            return ""
        secret = self._secret(target)
        if receive.verify == "hmac-sha256":
            return verify_hmac(headers, body, secret.encode(), receive.header, receive.encoding, receive.prefix)
        try:
            key = signing_key(secret)
        except ValueError as exc:
            raise FailedPrecondition(str(exc), reason=Reason.SECRET_NOT_FOUND) from None
        now = self._clock.now().timestamp()
        return verify_standard(headers, body, key, now, receive.tolerance.total_seconds())

    async def accept(self, target: ReceiveTarget, headers: Mapping[str, str], body: bytes) -> ReceivedRecord:
        """Verify, store and start dispatching a webhook; SignatureRefused for a bad signature or a replay."""
        webhook_id = self.verify(target, headers, body)
        received_id = f"rcv_{uuid.uuid4().hex}"
        record = ReceivedRecord(
            received_id=received_id,
            product=target.product,
            env=target.env,
            webhook=target.webhook.tag,
            webhook_id=webhook_id or received_id,
            received_at=self._clock.now(),
            content_type=headers.get("content-type", ""),
            headers=json.dumps(dict(headers), separators=(",", ":")),
            body=body,
        )
        if not await self._store.insert_received(record):
            raise SignatureRefused(f"webhook {webhook_id!r} was received before (a replay)")
        if target.receive.dispatch is not None:
            task = asyncio.get_running_loop().create_task(self._dispatch(target, record, headers))
            self._dispatching.add(task)
            task.add_done_callback(self._dispatching.discard)
        return record

    async def _dispatch(self, target: ReceiveTarget, record: ReceivedRecord, headers: Mapping[str, str]) -> None:
        assert target.receive.dispatch is not None
        event = target.receive.dispatch.publish
        # No idempotency key: its claim and record would be two more store writes on the path to the subscriber.
        # A publish tried again after an answer that was lost may store a second copy: subscribers drop repeats by
        # the `webhook_received_id` attribute (delivery is at least once anyway).
        outgoing = OutgoingMessage(
            record.body, record.content_type or "application/octet-stream", attributes(record, headers)
        )
        for attempt in range(1, DISPATCH_TRIES + 1):
            try:
                await self._brokers.publish(record.product, record.env, event, outgoing)
                return
            except ProcessorError as exc:
                if attempt == DISPATCH_TRIES:
                    log.warning(
                        "received webhook not dispatched",
                        extra={"received_id": record.received_id, "topic": event, "error": exc.message},
                    )
                    return
                await asyncio.sleep(DISPATCH_BACKOFF.delay(attempt))

    async def watch(self, product: str, env: str, tag: str, group: str, limits: Limits) -> SubscribeStream:
        """A Receive stream: a subscription of `group` to the topic the webhook's receive in `env` publishes to
        (FAILED_PRECONDITION `WEBHOOK_NOT_DISPATCHED` when it has none)."""
        resolved = await self._registry.resolve(product, env)
        webhook = named(product, resolved.manifest.webhooks, "webhook", tag, Reason.WEBHOOK_NOT_FOUND)
        receive = webhook.receive.get(resolved.env.slug)
        if receive is None or receive.dispatch is None:
            raise FailedPrecondition(
                f"webhook {tag!r} has no receive with a dispatch topic in this environment",
                reason=Reason.WEBHOOK_NOT_DISPATCHED,
                metadata={"product": product, "webhook": tag},
            )
        return await self._brokers.subscribe(product, env, receive.dispatch.publish, group, limits, "")

    async def close(self) -> None:
        """Let dispatches going finish (briefly), then cancel the rest."""
        if self._dispatching:
            _, late = await asyncio.wait(set(self._dispatching), timeout=5.0)
            for task in late:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*late, return_exceptions=True)
