"""What the feature tests share: a loopback upstream that records when each operation arrived and ended, and a
product manifest whose app calls it, with a feature section built from small helpers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from ductape_processor.store.feature_records import FeatureRunRecord, FeatureRunStatus


@dataclass
class Ops:
    """The upstream's `/op/<name>` routes (any method): each call is recorded with its arrival and end times (monotonic
    seconds) and its JSON body; `delay`, `failures` (answers of 500 before succeeding) and `answers` (the JSON to
    answer, or a function of the call number) shape it. Unknown names answer `{"name": name, "n": call number}`."""

    server: TestServer
    delay: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)
    arrived: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ended: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bodies: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    order: list[str] = field(default_factory=list)
    events: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def count(self) -> Counter[str]:
        return Counter(self.order)

    def arrival(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.arrived[name].append(time.monotonic())
        self.order.append(name)
        raw = await request.read()
        self.bodies[name].append(json.loads(raw) if raw else None)
        self.arrival(name).set()
        calls = len(self.arrived[name])
        await asyncio.sleep(self.delay.get(name, 0.0))
        self.ended[name].append(time.monotonic())
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            return web.json_response({"error": "failing on purpose"}, status=500)
        answer = self.answers.get(name, {"name": name, "n": calls})
        return web.json_response(answer(calls) if callable(answer) else answer)


async def start_ops() -> Ops:
    """Start the upstream on a free loopback port; close it with `await ops.server.close()`."""
    app = web.Application()
    server = TestServer(app, host="127.0.0.1", port=0, shutdown_timeout=1.0)
    ops = Ops(server)
    app.router.add_route("*", "/op/{name}", ops.handle)
    await server.start_server()
    return ops


def op(tag: str, name: str | None = None, method: str = "POST", **fields: Any) -> dict[str, Any]:
    """An event calling `/op/<name>` (default: its tag) with `method`; `body` goes in as the request's body."""
    body = fields.pop("body", None)
    event = {"tag": tag, "type": "action", "event": f"api:{method.lower()}", "input": {"params": {"name": name or tag}}}
    if body is not None:
        event["input"]["body"] = body
    event.update(fields)
    return event


def step(tag: str, *events: dict[str, Any], parents: list[str] | None = None) -> dict[str, Any]:
    return {"tag": tag, "parents": parents or [], "events": list(events)}


def manifest(base_url: str, *features: dict[str, Any], **extra: Any) -> bytes:
    """The product `shop`: the app `api` (`post`, `get`, `put` on `/op/:name`, no retries of its own), a memory
    broker, and `features`."""
    actions = [
        {
            "tag": method.lower(),
            "method": method,
            "path": "/op/:name",
            "body": "$Input{body}" if method != "GET" else None,
            "input": {"params": {"name": {"type": "string", "required": True}}},
        }
        for method in ("POST", "GET", "PUT")
    ]
    for action in actions:
        if action["body"] is None:
            del action["body"]
    document: dict[str, Any] = {
        "product": "shop",
        "environments": [{"slug": "dev", "allow_private_endpoints": True}],
        "apps": [{"tag": "api", "envs": {"dev": {"base_url": base_url}}, "retry": {"max": 0}, "actions": actions}],
        "brokers": [{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": [{"tag": "done", "name": "d"}]}],
        "features": list(features),
    }
    document.update(extra)
    return json.dumps(document).encode()


def run_record(owner: str, created_at: datetime, lease_until: datetime, **fields: Any) -> FeatureRunRecord:
    """A stored run of the product `shop` in `dev`, going (running) under `owner`'s lease; `fields` replace any."""
    values: dict[str, Any] = {
        "run_id": uuid.uuid4().hex,
        "product": "shop",
        "env": "dev",
        "feature": "signup",
        "version": 1,
        "status": FeatureRunStatus.RUNNING,
        "input": "{}",
        "session_tag": "",
        "session_token": "",
        "idempotency_key": "",
        "request_hash": "",
        "output": "",
        "error_reason": "",
        "error_message": "",
        "failed_step": "",
        "replay_of": "",
        "parent_run": "",
        "takeovers": 0,
        "created_at": created_at,
        "ended_at": None,
        "expires_at": None,
        "owner": owner,
        "lease_until": lease_until,
    }
    values.update(fields)
    return FeatureRunRecord(**values)
