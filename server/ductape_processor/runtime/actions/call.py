"""The values of one action call: what the caller asks for (`ActionCall`), what it gets back (`ActionResult`), and
the state the executor threads through the call's steps (`CallState`), from which its execution record is written."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ductape_processor.adapters.http.client import HttpResponse
from ductape_processor.reasons import Reason
from ductape_processor.records import record
from ductape_processor.runtime.actions.plan import ActionPlan
from ductape_processor.runtime.logs.recorder import execution_record
from ductape_processor.runtime.options import CallOptions
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.registry import Resolved
from ductape_processor.runtime.templates import Scope, Taint
from ductape_processor.store.base import ExecutionRecord, ExecutionStatus


@record
class ActionCall(CallOptions):
    """What a caller asks for: an action of an app, its input, a cache tag, and the options every call has."""

    product: str
    env: str
    app: str
    event: str
    input: Mapping[str, Any]
    cache: str = ""


@record
class ActionResult(HttpResponse):
    """What the upstream answered (the `HttpResponse` fields), and how the processor got it."""

    process_id: str = ""
    attempts: int = 0
    cached: bool = False
    version: int = 0

    def encode(self) -> bytes:
        """A JSON form for the cache and idempotency records."""
        return json.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "c": self.content_type,
                "b": base64.b64encode(self.body).decode(),
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ActionResult:
        """The inverse of `encode`."""
        raw = json.loads(data)
        return cls(raw["s"], [(h[0], h[1]) for h in raw["h"]], base64.b64decode(raw["b"]), raw["c"])


def outcome(result: ActionResult) -> tuple[ExecutionStatus, str]:
    """The execution record's status and reason for an upstream answer."""
    return (
        (ExecutionStatus.SUCCESS, "") if 200 <= result.status < 300 else (ExecutionStatus.FAIL, Reason.UPSTREAM_STATUS)
    )


@dataclass(slots=True)
class CallState:
    """Per-call state threaded through the steps (a login action minting a token has its own)."""

    call: ActionCall
    resolved: Resolved
    plan: ActionPlan
    deadline: Deadline
    # What the call's sends did (kept here, not in an object of their own: one fewer a call).
    attempts: int = 0
    """How many sends there were."""
    upstream_status: int = 0
    """The last upstream status."""
    detail: str = ""
    """The last request as the execution record shows it."""
    session: Mapping[str, Any] | None = None
    taint: Taint = field(default_factory=Taint)
    """The call's rendered values that derive from secrets, auths or the session: the record redacts them."""
    upstream_headers: Mapping[str, str] | None = None  # set by the processor, over the request's
    process_id: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    recorded: bool = False  # the execution record was written with the idempotency answer

    def scope(self, secrets: SecretSource, checked: Mapping[str, Any], auth: Mapping[str, Mapping[str, Any]]) -> Scope:
        """What the action's templates read: the checked input, the app's values, the auths, secrets, the session."""
        app = self.plan.app
        return Scope(
            input=checked,
            variables={app.tag: app.variables.get(self.resolved.env.slug, {})},
            constants={app.tag: app.constants},
            auth=auth,
            secrets=secrets.get,
            session=self.session,
            taint=self.taint,
        )

    def execution(
        self, process_id: str, started: datetime, status: ExecutionStatus, reason: str, *, cached: bool
    ) -> ExecutionRecord:
        """The execution record of the call, ending now."""
        return execution_record(
            self.resolved,
            "action",
            self.plan.resource,
            process_id,
            started,
            status,
            attempts=self.attempts,
            error_reason=reason,
            cached=cached,
            upstream_status=self.upstream_status,
            detail=self.detail,
        )
