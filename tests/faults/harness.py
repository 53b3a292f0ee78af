"""What the fault tests share: a product whose action counts its executions per key on a real HTTP upstream, callers
that retry with the same idempotency key as a client would, and the figures each fault prints."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from ductape.processor import DeadlineExceededError, Processor, UnavailableError

from ductape_processor.store.base import ExecutionFilter, ExecutionRecord, Store
from tests.upstream import Upstream

OUTCOME_UNKNOWN = "IDEMPOTENCY_OUTCOME_UNKNOWN"


def product(base_url: str) -> bytes:
    """One app whose `create` action is a POST (not idempotent by itself) to the test upstream."""
    document = {
        "product": "faults",
        "environments": [{"slug": "dev"}],
        "apps": [
            {
                "tag": "api",
                "envs": {"dev": {"base_url": base_url}},
                "retry": {"max": 0},
                "timeout": "10s",
                "actions": [
                    {
                        "tag": "create",
                        "method": "POST",
                        "path": "/create",
                        "input": {"body": {"name": {"type": "string", "required": True}}},
                    }
                ],
            }
        ],
    }
    return json.dumps(document).encode()


@dataclass
class CountingUpstream:
    """Counts the requests that reached the upstream per key (the body's `name`) and those it answered."""

    upstream: Upstream
    delay_s: float = 0.02
    slow: dict[str, float] = field(default_factory=dict)  # key -> delay for that key
    received: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    arrived: dict[str, asyncio.Event] = field(default_factory=dict)

    def install(self) -> None:
        async def create(request: web.Request) -> web.Response:
            key = (await request.json())["name"]
            self.received[key] += 1
            self.arrived.setdefault(key, asyncio.Event()).set()
            await asyncio.sleep(self.slow.get(key, self.delay_s))
            self.answered[key] += 1
            return web.json_response({"created": key}, status=201)

        self.upstream.on("POST /create", create)

    def arrival(self, key: str) -> asyncio.Event:
        return self.arrived.setdefault(key, asyncio.Event())


@dataclass
class Outcome:
    """What one caller saw for one key."""

    key: str
    process_id: str = ""
    unknown: bool = False  # answered IDEMPOTENCY_OUTCOME_UNKNOWN
    errors: list[str] = field(default_factory=list)
    first_failure: float | None = None
    settled: float | None = None

    @property
    def recovery_s(self) -> float:
        if self.first_failure is None or self.settled is None:
            return 0.0
        return self.settled - self.first_failure


async def call_until_settled(
    clients: Callable[[], Processor],
    key: str,
    outcome: Outcome,
    *,
    budget_s: float = 15.0,
    timeout_s: float = 8.0,
    unknown_is_final: bool = True,
) -> None:
    """Run `create` with idempotency key `key` until it is answered, retrying retryable errors with the same key (on
    whichever replica `clients()` names at the time), as a client following the documented contract does. With
    `unknown_is_final=False`, IDEMPOTENCY_OUTCOME_UNKNOWN is retried too (the answer may still be recorded) and counts
    only if it is still the answer when the budget runs out."""
    started = time.monotonic()
    while time.monotonic() - started < budget_s:
        try:
            result = await clients().action.run(
                product="faults",
                env="dev",
                app="api",
                event="create",
                input={"body": {"name": key}},
                idempotency_key=key,
                timeout=timeout_s,
            )
        except (UnavailableError, DeadlineExceededError) as exc:
            outcome.errors.append(exc.reason or type(exc).__name__)
            if outcome.first_failure is None:
                outcome.first_failure = time.monotonic()
            outcome.unknown = exc.reason == OUTCOME_UNKNOWN
            if outcome.unknown and unknown_is_final:
                outcome.settled = time.monotonic()
                return
            await asyncio.sleep(0.05)
            continue
        except Exception as exc:  # every other error is a finding, reported in the figures
            outcome.errors.append(getattr(exc, "reason", "") or type(exc).__name__)
            if outcome.first_failure is None:
                outcome.first_failure = time.monotonic()
            await asyncio.sleep(0.05)
            continue
        outcome.process_id = result.process_id
        outcome.unknown = False
        outcome.settled = time.monotonic()
        return


async def records(store: Store, expected: int, *, wait_s: float = 3.0) -> list[ExecutionRecord]:
    """The product's execution records, once at least `expected` are there (or after `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = await store.list_executions(ExecutionFilter(product="faults"), after=None, limit=5000)
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


@dataclass
class Figures:
    """Per fault: calls made, upstream executions, duplicate executions, answered calls without a record, keys left
    with an unknown outcome, and the longest a caller waited from its first failure to a definite answer."""

    fault: str
    calls: int
    executions: int
    duplicates: int
    lost_records: int
    unknown: int
    recovery_s: float
    errors: Counter[str]

    def show(self) -> None:
        print(
            f"\nFAULT {self.fault}: calls={self.calls} upstream_executions={self.executions} "
            f"duplicates={self.duplicates} lost_records={self.lost_records} outcome_unknown={self.unknown} "
            f"recovery_s={self.recovery_s:.2f} errors_seen={dict(self.errors)}"
        )


def figures(fault: str, upstream: CountingUpstream, outcomes: list[Outcome], stored: list[ExecutionRecord]) -> Figures:
    recorded = {record.process_id for record in stored}
    errors: Counter[str] = Counter()
    for outcome in outcomes:
        errors.update(outcome.errors)
    return Figures(
        fault=fault,
        calls=len(outcomes),
        executions=sum(upstream.received.values()),
        duplicates=sum(count - 1 for count in upstream.received.values() if count > 1),
        lost_records=sum(1 for o in outcomes if o.process_id and o.process_id not in recorded),
        unknown=sum(1 for o in outcomes if o.unknown),
        recovery_s=max((o.recovery_s for o in outcomes), default=0.0),
        errors=errors,
    )
