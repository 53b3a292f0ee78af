"""What a job's run calls: the other resource kinds' runtimes, given the job's stored input in the shape each kind's
own service takes. A run goes through the same path as a caller's call (registry, session, policies, execution log).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypedDict

from ductape_processor.errors import FailedPrecondition, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.call import ActionCall
from ductape_processor.runtime.actions.executor import ActionExecutor
from ductape_processor.runtime.brokers.messages import OutgoingMessage
from ductape_processor.runtime.brokers.publisher import BrokerRuntime
from ductape_processor.runtime.databases.runner import DatabaseCall, DatabaseRunner
from ductape_processor.runtime.features.model import RunCall
from ductape_processor.runtime.jobs.checks import target_problem
from ductape_processor.runtime.jobs.model import Target, TargetKind
from ductape_processor.runtime.notifications.call import (
    CallbackInput,
    EmailInput,
    NotificationCall,
    PushInput,
    SmsInput,
)
from ductape_processor.runtime.notifications.sender import NotificationRuntime
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.registry.manifest import Manifest
from ductape_processor.runtime.storage.operations import FileSpec, StorageRef, StorageRuntime

RUN_TIMEOUT_S: Final = 300.0
"""The longest one attempt of a run may take (the target's own timeouts are usually shorter)."""


@dataclass(frozen=True, slots=True)
class TargetOptions:
    """How one call of a target runs beside what it runs: a job's run takes the defaults, a feature's event gives
    its own (its timeout, its run's pinned version, its key, its cache)."""

    timeout_s: float = RUN_TIMEOUT_S
    version: int | None = None
    idempotency_key: str = ""
    cache: str = ""


class FeatureTargets(Protocol):
    """Runs a feature as a job's target (FeatureRuntime)."""

    async def run_target(self, call: RunCall, timeout_s: float) -> tuple[Any, str]:
        """The ended run's `{process_id, status, output}` and its process id; FEATURE_RUN_FAILED when it did not
        complete."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a target answered: a JSON-able result, and the execution log's id of the call when it has one."""

    result: Any
    process_id: str = ""


def check_target(manifest: Manifest, target: Target, field: str) -> None:
    """INVALID_ARGUMENT on `field`.address unless the manifest declares the target's resource, and on `field`.input
    when the input holds what JSON cannot carry (a Struct's double may be NaN or infinite)."""
    problem = target_problem(manifest, target.kind.value, target.address)
    if problem is not None:
        raise InvalidArgument.field(f"{field}.address", problem)
    try:
        json.dumps(target.input, allow_nan=False)
    except ValueError:  # stored, it ran as `Infinity` sent upstream, and clients could not read the job
        why = "holds NaN or an infinite number, which JSON cannot carry"
        raise InvalidArgument.field(f"{field}.input", why) from None


class _Given(TypedDict):
    """What a target's call takes from the job and the run beside its own input: the `CallOptions` it sets."""

    session: tuple[str, str] | None
    version: int | None
    idempotency_key: str


def _given(target: Target, options: TargetOptions) -> _Given:
    return {"session": target.session, "version": options.version, "idempotency_key": options.idempotency_key}


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument.field(f"target.input.{name}", "must be an object")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(item) for item in value) if isinstance(value, list) else ((str(value),) if value else ())


class JobTargets:
    """Calls a job's target through the runtime of its kind."""

    def __init__(
        self,
        actions: ActionExecutor,
        databases: DatabaseRunner,
        notifications: NotificationRuntime,
        storage: StorageRuntime,
        brokers: BrokerRuntime,
    ) -> None:
        self._actions = actions
        self._databases = databases
        self._notifications = notifications
        self._storage = storage
        self._brokers = brokers
        self._calls: dict[TargetKind, Callable[[str, str, Target, TargetOptions], Awaitable[Outcome]]] = {
            TargetKind.ACTION: self._action,
            TargetKind.DATABASE_ACTION: self._database,
            TargetKind.NOTIFICATION: self._notification,
            TargetKind.STORAGE: self._save,
            TargetKind.PUBLISH: self._publish,
            TargetKind.FEATURE: self._feature,
        }
        self._features: FeatureTargets | None = None

    def serve_features(self, features: FeatureTargets) -> None:
        """Who runs `feature` targets (the features' runtime, built after this: its steps call these targets)."""
        self._features = features

    async def call(self, product: str, env: str, target: Target, options: TargetOptions = TargetOptions()) -> Outcome:
        """Call `target` once in the product's environment; a failure raises the kind's ProcessorError."""
        return await self._calls[target.kind](product, env, target, options)

    async def _action(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        app, _, event = target.address.partition(":")
        parts = {part: _mapping(target.input.get(part), part) for part in ("query", "params", "body", "headers")}
        call = ActionCall(product, env, app, event, parts, cache=options.cache, **_given(target, options))
        result = await self._actions.run(call, Deadline(options.timeout_s))
        body: Any = result.body.decode("utf-8", "replace")
        if "json" in result.content_type:
            with contextlib.suppress(ValueError):  # not JSON after all: the text
                body = json.loads(result.body)
        answer = {"status_code": result.status, "body": body}
        if not 200 <= result.status < 300:
            raise FailedPrecondition(
                f"the upstream answered {result.status}",
                reason=Reason.UPSTREAM_STATUS,
                metadata={"status_code": str(result.status), "process_id": result.process_id},
            )
        return Outcome(answer, result.process_id)

    async def _database(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        database, _, action = target.address.partition(":")
        given: dict[str, Any] = {
            part: _mapping(target.input.get(part), part) for part in ("data", "filter") if part in target.input
        }
        call = DatabaseCall(product, env, database, action, given, cache=options.cache, **_given(target, options))
        result = await self._databases.execute(call, Deadline(options.timeout_s))
        step = result.steps[0]
        answer = {"rows": list(step.rows), "affected_rows": step.affected_rows, "count": step.count}
        return Outcome(answer, result.process_id)

    async def _notification(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        given = target.input
        email, push, sms, callback = (_mapping(given.get(name), name) for name in ("email", "push", "sms", "callback"))
        call = NotificationCall(
            product,
            env,
            target.address,
            email=EmailInput(
                _strings(email.get("to")),
                _strings(email.get("cc")),
                _strings(email.get("bcc")),
                _mapping(email.get("variables"), "email.variables"),
            )
            if email
            else None,
            push=PushInput(_strings(push.get("device_tokens")), push.get("variables") or {}, push.get("data") or {})
            if push
            else None,
            sms=SmsInput(_strings(sms.get("to")), sms.get("variables") or {}) if sms else None,
            callback=CallbackInput(**{k: v for k, v in callback.items() if k in _CALLBACK_FIELDS})
            if callback
            else None,
            **_given(target, options),
        )
        result = await self._notifications.send(call, Deadline(options.timeout_s))
        channels = [
            {"channel": r.channel, "success": r.success, "error_reason": r.error_reason} for r in result.results
        ]
        failed = [r for r in result.results if not r.success]
        if failed:
            raise FailedPrecondition(
                f"the {failed[0].channel} channel failed: {failed[0].error_message}",
                reason=Reason.NOTIFICATION_REJECTED,
                metadata={"process_id": result.process_id},
            )
        return Outcome({"channels": channels}, result.process_id)

    async def _save(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        given = target.input
        name = str(given.get("file_name", ""))
        if "text" in given:
            data = str(given["text"]).encode()
        else:
            try:
                data = base64.b64decode(str(given.get("data", "")), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument.field("target.input.data", "is not base64") from None
        spec = FileSpec(name, str(given.get("content_type", "")))
        info = await self._storage.save(StorageRef(product, env, target.address), spec, data)
        return Outcome({"file_name": info.key, "size": info.size, "sha256": info.sha256})

    async def _publish(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        given = target.input
        message = given.get("message")
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
        attributes: Mapping[str, Any] = _mapping(given.get("attributes"), "attributes")
        outgoing = OutgoingMessage(
            data,
            "application/json",
            {k: str(v) for k, v in attributes.items()},
            str(given.get("ordering_key", "")),
            options.idempotency_key,
        )
        message_id = await self._brokers.publish(
            product, env, target.address, outgoing, deadline=Deadline(options.timeout_s)
        )
        return Outcome({"message_id": message_id})

    async def _feature(self, product: str, env: str, target: Target, options: TargetOptions) -> Outcome:
        if self._features is None:
            raise FailedPrecondition("this processor runs no features", reason=Reason.FEATURE_NOT_FOUND)
        call = RunCall(product, env, target.address, dict(target.input), target.session)
        result, process_id = await self._features.run_target(call, options.timeout_s)
        return Outcome(result, process_id)


_CALLBACK_FIELDS: Final = frozenset(("query", "params", "body", "headers", "variables"))
