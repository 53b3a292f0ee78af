"""Received provider webhooks: the receive path of a webhook in an environment, the signature verified (in constant
time, within the timestamp tolerance), the webhook stored once (a webhook id received before is a replay, refused),
then dispatched (dispatches.py): published to the receive's topic, where Receive streams (and any subscriber) take
it, or given to a job, or both.

The HTTP listener (api/webhook_http.py) only converts: it finds the target, reads at most its `max_body_bytes`, and
answers what `accept` says. The webhook is stored with its dispatch pending and leased to this replica, so a dispatch
this replica does not finish (a failure, a crash) is made by a replica's claim, durably.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ductape_processor.errors import FailedPrecondition, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.brokers.messages import IncomingEvent
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.brokers.stream import SubscribeStream
from ductape_processor.runtime.brokers.subscriptions import Limits
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.registry.webhooks import Receive, Webhook
from ductape_processor.runtime.webhooks.dispatches import HEADER_ATTRIBUTE, DispatchWorker
from ductape_processor.runtime.webhooks.signing import SignatureRefused, signing_key, verify_hmac, verify_standard
from ductape_processor.store.base import Store
from ductape_processor.store.webhook_records import ReceivedRecord


@dataclass(frozen=True, slots=True)
class ReceiveTarget:
    """The receive path a request came to: the environment's slug, the webhook and its receive settings."""

    product: str
    env: str
    webhook: Webhook
    receive: Receive


def received(message: IncomingEvent) -> ReceivedRecord:
    """A received webhook as its dispatch topic carried it (`dispatches.attributes` says what it was)."""
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
        self,
        registry: Registry,
        store: Store,
        brokers: BrokerRuntime,
        secrets: SecretSource,
        clock: Clock,
        dispatches: DispatchWorker,
    ) -> None:
        self._registry = registry
        self._store = store
        self._brokers = brokers
        self._secrets = secrets
        self._clock = clock
        self._dispatches = dispatches

    @property
    def dispatches(self) -> DispatchWorker:
        """This replica's dispatches (started and stopped by the app)."""
        return self._dispatches

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
        unheld = ReceivedRecord(
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
        record = self._dispatches.held(unheld, target.receive.dispatch)
        if not await self._store.insert_received(record):
            raise SignatureRefused(f"webhook {webhook_id!r} was received before (a replay)")
        if target.receive.dispatch is not None:
            self._dispatches.dispatch(record, headers)
        return record

    async def watch(self, product: str, env: str, tag: str, group: str, limits: Limits) -> SubscribeStream:
        """A Receive stream: a subscription of `group` to the topic the webhook's receive in `env` publishes to
        (FAILED_PRECONDITION `WEBHOOK_NOT_DISPATCHED` when it has none)."""
        resolved = await self._registry.resolve(product, env)
        webhook = named(product, resolved.manifest.webhooks, "webhook", tag, Reason.WEBHOOK_NOT_FOUND)
        receive = webhook.receive.get(resolved.env.slug)
        if receive is None or receive.dispatch is None or receive.dispatch.publish is None:
            raise FailedPrecondition(
                f"webhook {tag!r} has no receive with a dispatch topic in this environment",
                reason=Reason.WEBHOOK_NOT_DISPATCHED,
                metadata={"product": product, "webhook": tag},
            )
        return await self._brokers.subscribe(product, env, receive.dispatch.publish, group, limits, "")
