"""The deliveries of one replica: claims due deliveries from the store under leases (`ClaimRounds`, store/leases.py:
each attempt is made by one replica), POSTs each message to its endpoint signed per Standard Webhooks, and records
every attempt and the delivery's next state, a batch of them per transaction.

An attempt succeeds on a 2xx within the webhook's `timeout` (15 s by default); any other answer, no answer, or a
refused address fails it, and the delivery's next attempt is due after the next delay of the webhook's schedule, or
it has failed for good when the schedule is used up. An endpoint that failed every attempt for `disable_after` is
disabled (logged as a warning, `webhook endpoint disabled`), and its pending deliveries with it. An endpoint's
`rate_limit` spaces this replica's sends to it (docs/webhooks.md says why it is not shared between replicas).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final

from yarl import URL

from ductape_processor.adapters.http.addresses import address_problem
from ductape_processor.adapters.http.client import HttpClientPool, HttpRequest
from ductape_processor.errors import FailedPrecondition, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.clock import Clock
from ductape_processor.runtime.policies.leases import ClaimedWork, ClaimLimits, EndBatches
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.registry.webhooks import Webhook, WebhookEndpoint
from ductape_processor.runtime.webhooks.signing import signed_headers, signing_key
from ductape_processor.store.base import Store
from ductape_processor.store.webhook_records import (
    WEBHOOKS_TOPIC,
    AttemptEnd,
    AttemptRecord,
    Deferral,
    DeliveryRecord,
    DeliveryStatus,
)

log = logging.getLogger(__name__)

EXCERPT_BYTES: Final = 1024
"""The most of an endpoint's answer kept with an attempt."""
FLUSH_BATCH: Final = 200
"""Attempt ends written in one transaction at most."""
MAX_RATE_WAIT_S: Final = 5.0
"""The longest an attempt waits for its endpoint's `rate_limit`: a delivery that would wait longer goes back to the
store, due when the endpoint has a free slot, and is not counted as an attempt (so a queue of deliveries to a slow
endpoint never outlasts their leases)."""


DELIVERY_LIMITS: Final = ClaimLimits(poll_s=5.0, claim_batch=200, concurrency=256)
"""Deliveries: a fallback poll every 5 s, claims of 200, 256 attempts at once."""


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """The rhythm of deliveries: the lease of a claimed delivery, and how claims go."""

    lease: timedelta = timedelta(seconds=60)
    """Longer than any attempt (timeouts are at most a few minutes): a live replica never loses a delivery."""
    limits: ClaimLimits = DELIVERY_LIMITS


class RateLimits:
    """At most `rate` sends per second to each endpoint of this replica: each send takes the endpoint's next slot."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def reserve(self, endpoint: str, rate: int | None, longest_wait_s: float) -> tuple[float, bool]:
        """Seconds until `endpoint`'s next free slot, and whether it is reserved: it is when the wait is at most
        `longest_wait_s` (the caller sends after it); a longer wait reserves nothing (the caller comes back then)."""
        if rate is None:
            return 0.0, True
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next.get(endpoint, now))
        if slot - now > longest_wait_s:
            return slot - now, False
        self._next[endpoint] = slot + 1.0 / rate
        return slot - now, True


@dataclass(frozen=True, slots=True)
class _Target:
    webhook: Webhook
    endpoint: WebhookEndpoint
    allow_private: bool


class DeliveryWorker:
    """Attempts the deliveries that fall due, from `start` until `stop`."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        secrets: SecretSource,
        pools: tuple[HttpClientPool, HttpClientPool],
        clock: Clock,
        settings: DeliverySettings,
    ) -> None:
        """`pools`: the HTTP clients of environments that refuse private addresses, and of those that allow them."""
        self._store = store
        self._registry = registry
        self._secrets = secrets
        self._public, self._private = pools
        self._clock = clock
        self._settings = settings
        self.owner = uuid.uuid4().hex
        """This replica's name on the leases it holds."""
        self._work = ClaimedWork("webhook deliveries", self._claim, store.next_delivery_moment, clock, settings.limits)
        self._limits = RateLimits()
        self._ends = EndBatches("webhook attempt ends", self._write_ends, FLUSH_BATCH)
        self._deferrals = EndBatches("webhook deferrals", self._write_deferrals, FLUSH_BATCH)

    async def start(self) -> None:
        """Listen for other replicas' deliveries and start claiming."""
        await self._work.rounds.listen_and_start(self._store, WEBHOOKS_TOPIC)

    def wake(self) -> None:
        """Look for due deliveries now (one was emitted or redelivered here)."""
        self._work.wake()

    def hold(self, deliveries: list[DeliveryRecord]) -> list[DeliveryRecord]:
        """Deliveries an Emit is about to store, those this replica has room to attempt at once leased to it (their
        first attempt counted): no claim stands between the emit and the POST. `release` the room of any not stored
        so (a failed insert, a repeated key, a disabled endpoint)."""
        room = self._work.reserve(len(deliveries))
        now = self._clock.now()
        lease = now + self._settings.lease
        held = [replace(d, attempts=1, lease_owner=self.owner, lease_until=lease) for d in deliveries[:room]]
        return held + deliveries[room:]

    def release(self, count: int) -> None:
        """Give back the room of `count` deliveries `hold` leased that were not stored leased."""
        self._work.release(count)

    def attempt(self, delivery: DeliveryRecord, body: str) -> None:
        """Attempt a delivery `hold` leased to this replica and the store kept so (in the background)."""
        self._work.run(self._attempt(delivery, body), reserved=True)

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; attempts going get `grace_s` to end (their leases run out otherwise, and another replica
        makes them again); the ends are written."""
        await self._work.stop(grace_s)
        await self._ends.close()
        await self._deferrals.close()

    async def _claim(self, free: int) -> int:
        now = self._clock.now()
        claimed = await self._store.claim_deliveries(self.owner, now, now + self._settings.lease, free)
        for delivery, body in claimed:
            self._work.run(self._attempt(delivery, body))
        return len(claimed)

    async def _target(self, delivery: DeliveryRecord) -> _Target:
        resolved = await self._registry.resolve(delivery.product, delivery.env)
        webhook = next((w for w in resolved.manifest.webhooks if w.tag == delivery.webhook), None)
        endpoints = webhook.endpoints.get(resolved.env.slug, []) if webhook is not None else []
        endpoint = next((e for e in endpoints if e.url == delivery.endpoint), None)
        if webhook is None or endpoint is None:
            raise FailedPrecondition(
                "the endpoint is no longer in the product's manifest", reason=Reason.WEBHOOK_NOT_FOUND
            )
        return _Target(webhook, endpoint, resolved.env.allow_private_endpoints)

    def _keys(self, endpoint: WebhookEndpoint) -> list[bytes]:
        def missing(name: str) -> ProcessorError:
            return FailedPrecondition(f"secret {name} is not defined on this processor", reason=Reason.SECRET_NOT_FOUND)

        try:
            return [signing_key(self._secrets.resolve(ref, missing)) for ref in endpoint.secrets]
        except ValueError as exc:
            raise FailedPrecondition(str(exc), reason=Reason.SECRET_NOT_FOUND) from None

    async def _attempt(self, delivery: DeliveryRecord, body: str) -> None:
        started = self._clock.now()
        loop = asyncio.get_running_loop()
        began = loop.time()
        code, excerpt, error, success = 0, "", "", False
        target: _Target | None = None
        try:
            target = await self._target(delivery)
            url = URL(delivery.endpoint)
            problem = None if target.allow_private else address_problem(url.host or "")
            if problem is not None:
                raise FailedPrecondition(f"refused: {problem}", reason=Reason.INVALID_ARGUMENT)
            wait_s, reserved = self._limits.reserve(delivery.endpoint, target.endpoint.rate_limit, MAX_RATE_WAIT_S)
            if not reserved:  # the endpoint's rate is taken for a while: back to the store, due when a slot frees
                due = self._clock.now() + timedelta(seconds=wait_s)
                self._deferrals.add(Deferral(delivery.delivery_id, self.owner, due))
                return
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                started, began = self._clock.now(), loop.time()
            data = body.encode()
            headers = {
                **target.endpoint.headers,
                "Content-Type": "application/json",
                **signed_headers(delivery.message_id, int(started.timestamp()), data, self._keys(target.endpoint)),
            }
            pool = self._private if target.allow_private else self._public
            key = f"webhook {delivery.product}/{delivery.env}/{url.origin()}"
            response = await pool.send(
                key, HttpRequest("POST", url, headers, [], data), target.webhook.timeout.total_seconds()
            )
            code = response.status
            excerpt = response.body[:EXCERPT_BYTES].decode("utf-8", "replace")
            success = 200 <= code < 300
            error = "" if success else f"the endpoint answered {code}"
        except ProcessorError as exc:
            error = exc.message
        except Exception as exc:  # a bug on this path must fail the attempt, not lose the delivery
            log.exception("webhook delivery %s: the attempt failed unexpectedly", delivery.delivery_id)
            error = f"{type(exc).__name__}: the processor failed"
        duration_ms = round((loop.time() - began) * 1000)
        attempt = AttemptRecord(
            delivery.delivery_id, delivery.attempts, started, duration_ms, code, excerpt, error, success
        )
        self._ends.add(self._end(delivery, attempt, target))

    def _end(self, delivery: DeliveryRecord, attempt: AttemptRecord, target: _Target | None) -> AttemptEnd:
        disable_after = target.webhook.disable_after if target is not None else timedelta(days=5)
        if attempt.success:
            return AttemptEnd(delivery, self.owner, attempt, DeliveryStatus.SUCCEEDED, None, disable_after)
        delays = target.webhook.delays if target is not None else ()
        if delivery.attempts < len(delays):
            due = self._clock.now() + delays[delivery.attempts]
            return AttemptEnd(delivery, self.owner, attempt, DeliveryStatus.PENDING, due, disable_after)
        return AttemptEnd(delivery, self.owner, attempt, DeliveryStatus.FAILED, None, disable_after)

    async def _write_ends(self, batch: list[AttemptEnd]) -> None:
        disabled = await self._store.end_deliveries(batch, self._clock.now())
        for product, env, webhook, endpoint in disabled:
            log.warning(
                "webhook endpoint disabled",
                extra={"product": product, "env": env, "webhook": webhook, "endpoint": endpoint},
            )
        if any(end.status == DeliveryStatus.PENDING for end in batch):
            self._work.wake()  # a retry may be due sooner than the rounds' wait

    async def _write_deferrals(self, batch: list[Deferral]) -> None:
        await self._store.defer_deliveries(batch)
        self._work.wake()
