"""NotificationRuntime: one Send from the call to a result per channel.

The path of a call, as for the other resource kinds: resolve the product version → find the notification and its
message → verify the session → check recipients and render every template (`render.py`; any problem refuses the
call before anything is sent) → idempotency claim when a key is given → each channel concurrently, through the
provider its environment names (one adapter per notification environment and channel, `EnvironmentAdapters`),
each delivery retried on the shared policy while the provider did not accept it → execution record (queued).

A channel that fails is a result, never the call's error, so the others' results are not lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.notify.base import (
    ChannelAdapter,
    ChannelFailure,
    EmailAttachment,
    Outgoing,
    OutgoingEmail,
    Sent,
)
from ductape_processor.adapters.notify.registry import NOTIFICATION_PROVIDERS, Placement
from ductape_processor.errors import InvalidArgument, NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.logs.recorder import execution_record
from ductape_processor.runtime.notifications.call import ChannelResult, NotificationCall, NotificationResult
from ductape_processor.runtime.notifications.render import MessageTemplates, render
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.environments import EnvironmentAdapters, EnvironmentRef
from ductape_processor.runtime.policies.idempotency import idempotency_key_problem, record_key, run_once
from ductape_processor.runtime.policies.retry import Backoff, RetryBudget
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.notifications import Notification
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.services import CallServices
from ductape_processor.runtime.storage.operations import StorageRef, StorageRuntime
from ductape_processor.store.base import ExecutionStatus

log = logging.getLogger(__name__)

DEFAULT_RETRIES: Final = 2
"""Retries of a delivery the provider did not accept (unreachable, 429, 5xx, SMTP 4xx)."""
MAX_RETRIES: Final = 20
RETRY_BACKOFF: Final = Backoff(0.2, 5.0)
ATTEMPT_TIMEOUT_S: Final = 30.0
"""The longest one delivery attempt takes when the caller's deadline is later."""
IDEMPOTENCY_LEASE: Final = timedelta(minutes=2)
"""How long a send holding an idempotency key keeps it without recording its results."""
MAX_DETAIL: Final = 16_384
"""Characters of an execution record's detail (what each channel sent); longer, the rendered messages are left out."""


@dataclass(slots=True)
class _Run:
    resolved: Resolved
    notification: Notification
    resource: str
    process_id: str
    started: datetime
    shown: dict[str, Any] = field(default_factory=dict)


class NotificationRuntime:
    """Sends notifications. One instance per processor; safe for concurrent calls."""

    def __init__(self, services: CallServices, http: HttpClientPool, storage: StorageRuntime) -> None:
        self._services = services
        self._storage = storage
        self._registry = services.registry
        self._recorder = services.recorder
        self._http = http
        self._templates = MessageTemplates()
        self._adapters: EnvironmentAdapters[ChannelAdapter] = EnvironmentAdapters("notification", services.secrets)

    async def send(self, call: NotificationCall, deadline: Deadline) -> NotificationResult:
        """Send the call's message on each channel it gives input for; raise a ProcessorError only for a call that
        cannot be sent as asked."""
        started = datetime.now(UTC)
        tag, _, message_tag = call.event.partition(":")
        if not tag or not message_tag or ":" in message_tag:
            raise InvalidArgument.field("event", "must be notification_tag:message_tag")
        if call.retries is not None and not 0 <= call.retries <= MAX_RETRIES:
            raise InvalidArgument.field("retries", f"must be between 0 and {MAX_RETRIES}")
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        resolved = await self._registry.resolve(call.product, call.env, call.version)
        notification = named(
            resolved.product, resolved.manifest.notifications, "notification", tag, Reason.NOTIFICATION_NOT_FOUND
        )
        message = notification.message(message_tag)
        if message is None:
            raise NotFound.in_resource(
                resolved.product, "notification", tag, "message", message_tag, Reason.NOTIFICATION_MESSAGE_NOT_FOUND
            )
        run = _Run(resolved, notification, call.event, self._recorder.new_id(), started)
        try:
            if call.session is not None:
                await self._services.sessions.verify(call.product, call.env, *call.session)
            if call.email is not None and call.email.attachments:
                email = replace(call.email, attachments=await self._attachments(call, deadline))
                call = replace(call, email=email)
            rendered = render(call, message, self._templates, call.event)
        except ProcessorError as exc:
            self._record(run, (), exc.reason)
            raise

        async def work() -> NotificationResult:
            channels = rendered.channels
            results = await asyncio.gather(
                *(self._channel(run, channel, deliveries, call.retries, deadline) for channel, deliveries in channels)
            )
            return NotificationResult(tuple(results))

        if call.idempotency_key:
            scope = ("notification", resolved.product, resolved.env.slug, notification.tag)
            result = await run_once(
                self._services.store,
                record_key(scope, call.idempotency_key),
                _digest(call),
                idempotency_key=call.idempotency_key,
                lease=IDEMPOTENCY_LEASE,
                retention=self._services.idempotency_retention,
                deadline=deadline,
                work=work,
                encode=NotificationResult.encode,
                decode=lambda data: NotificationResult.decode(data, "", 0),
                mark_sent=True,
            )
        else:
            result = await work()
        self._record(run, result.results, "")
        return NotificationResult(result.results, run.process_id, resolved.version)

    async def _attachments(self, call: NotificationCall, deadline: Deadline) -> tuple[EmailAttachment, ...]:
        """The call's attachments with the storage files read; a storage or file that is not there fails the call
        (NOT_FOUND `STORAGE_NOT_FOUND`, `FILE_NOT_FOUND`) before anything is sent."""
        assert call.email is not None
        files: list[EmailAttachment] = []
        for index, given in enumerate(call.email.attachments):
            if isinstance(given, EmailAttachment):
                files.append(given)
                continue
            if given.storage_file is None:
                files.append(EmailAttachment(given.file_name, given.content_type, given.data))
                continue
            tag, key = given.storage_file
            if not tag or not key:
                raise InvalidArgument.field(
                    f"email.attachments[{index}].storage_file", "needs both storage and file_name"
                )
            info, data = await self._storage.read(StorageRef(call.product, call.env, tag), key, deadline)
            name = given.file_name or key.rsplit("/", 1)[-1]
            files.append(EmailAttachment(name, given.content_type or info.content_type, data))
        return tuple(files)

    async def _channel(
        self, run: _Run, channel: str, deliveries: tuple[Outgoing, ...], retries: int | None, deadline: Deadline
    ) -> ChannelResult:
        resolved = run.resolved
        settings = getattr(run.notification.envs[resolved.env.slug], channel)
        ref = EnvironmentRef(resolved.product, resolved.version, resolved.env.slug, f"{run.notification.tag}.{channel}")
        provider = settings.provider
        try:
            adapter = self._adapters.get(ref, settings, lambda s: self._open(s, ref))
        except ImportError as exc:
            why = f"the {provider} provider is not available on this processor (missing {exc.name})"
            return ChannelResult(channel, provider, False, (), Reason.NOTIFICATION_PROVIDER_UNAVAILABLE, why)
        except ProcessorError as exc:
            return ChannelResult(channel, provider, False, (), exc.reason, exc.message)
        deliveries = tuple(
            replace(d, message_id=f"{run.process_id}.{i}") if isinstance(d, OutgoingEmail) else d
            for i, d in enumerate(deliveries)
        )
        allowed = DEFAULT_RETRIES if retries is None else retries
        outcomes = await asyncio.gather(*(self._deliver(adapter, d, allowed, deadline) for d in deliveries))
        ids = tuple(sent.message_id for sent, _, _ in outcomes if sent is not None)
        attempts = sum(count for _, count, _ in outcomes)
        shown = [sent.shown for sent, _, _ in outcomes if sent is not None and sent.shown is not None]
        if shown:
            run.shown[channel] = shown if len(shown) > 1 else shown[0]
        failure = next((failure for _, _, failure in outcomes if failure is not None), None)
        if failure is None:
            return ChannelResult(channel, provider, True, ids, attempts=attempts)
        return ChannelResult(channel, provider, False, ids, failure.reason, failure.message, attempts)

    def _open(self, settings: Any, ref: EnvironmentRef) -> ChannelAdapter:
        provider = NOTIFICATION_PROVIDERS.get(settings.provider)
        if provider is None:
            raise ImportError(name=f"ductape_processor.adapters.notify ({settings.provider})")
        return provider.open(settings, Placement(ref.name, self._http))

    @staticmethod
    async def _deliver(
        adapter: ChannelAdapter, outgoing: Outgoing, retries: int, deadline: Deadline
    ) -> tuple[Sent | None, int, ChannelFailure | None]:
        """One delivery, tried again while the provider did not accept it and the retry budget lasts."""
        budget = RetryBudget(RETRY_BACKOFF, deadline)
        attempts = 0
        while True:
            attempts += 1
            timeout_s = deadline.bound(ATTEMPT_TIMEOUT_S)
            try:
                if timeout_s <= 0:
                    raise ChannelFailure(Reason.UPSTREAM_TIMEOUT, "no time left before the caller's deadline")
                return await adapter.send(outgoing, timeout_s), attempts, None
            except ChannelFailure as failure:
                if not (failure.retryable and budget.retries < retries and await budget.pause(failure.retry_after_s)):
                    return None, attempts, failure
            except Exception as exc:  # an adapter's bug must not fail the other channels
                log.exception("notification provider %s failed unexpectedly", adapter.provider)
                return None, attempts, ChannelFailure(Reason.INTERNAL, f"the provider failed: {type(exc).__name__}")

    def _record(self, run: _Run, results: tuple[ChannelResult, ...], reason: str) -> None:
        failed = next((result for result in results if not result.success), None)
        channels = {
            result.channel: {
                "provider": result.provider,
                "success": result.success,
                "message_ids": list(result.message_ids),
                **({"error_reason": result.error_reason} if result.error_reason else {}),
                **({"sent": run.shown[result.channel]} if result.channel in run.shown else {}),
            }
            for result in results
        }
        detail = json.dumps(channels, separators=(",", ":"), ensure_ascii=False, default=str)
        if len(detail) > MAX_DETAIL:
            for entry in channels.values():
                entry.pop("sent", None)
            detail = json.dumps(channels, separators=(",", ":"), ensure_ascii=False)
        self._recorder.record(
            execution_record(
                run.resolved,
                "notification",
                run.resource,
                run.process_id,
                run.started,
                ExecutionStatus.FAIL if reason or failed is not None else ExecutionStatus.SUCCESS,
                attempts=sum(result.attempts for result in results),
                error_reason=reason or (failed.error_reason if failed is not None else ""),
                detail=detail if results else "",
            )
        )

    async def close(self) -> None:
        """Close every provider's connections (at shutdown)."""
        await self._adapters.close()


def _digest(call: NotificationCall) -> str:
    text = json.dumps(
        [call.event, call.email, call.push, call.sms, call.callback, call.session],
        sort_keys=True,
        separators=(",", ":"),
        default=_plain,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, tuple | frozenset):
        return list(value)
    return str(value)
