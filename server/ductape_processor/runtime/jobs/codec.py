"""A job's spec as the store keeps it: JSON, written and read here only."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from ductape_processor.runtime.jobs.model import JobRetry, JobSpec, Overlap, Repeat, Target, TargetKind


def _seconds(value: timedelta | None) -> float | None:
    return value.total_seconds() if value is not None else None


def _delta(value: Any) -> timedelta | None:
    return timedelta(seconds=value) if value is not None else None


def encode_spec(spec: JobSpec) -> str:
    """`spec` as JSON text."""
    target, repeat, retry = spec.target, spec.repeat, spec.retry
    document: dict[str, Any] = {
        "target": {
            "kind": target.kind.value,
            "address": target.address,
            "input": target.input,
            "session": list(target.session) if target.session else None,
        },
        "retry": [retry.max_retries, _seconds(retry.initial_delay), _seconds(retry.max_delay), retry.jitter],
        "overlap": spec.overlap.value,
        "catch_up": _seconds(spec.catch_up),
    }
    if repeat is not None:
        document["repeat"] = {
            "cron": repeat.cron,
            "every": _seconds(repeat.every),
            "timezone": repeat.timezone,
            "limit": repeat.limit,
            "end_at": repeat.end_at.isoformat() if repeat.end_at else None,
        }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def decode_spec(text: str) -> JobSpec:
    """The inverse of `encode_spec`."""
    document = json.loads(text)
    target = document["target"]
    session = target.get("session")
    repeat = document.get("repeat")
    max_retries, initial, maximum, jitter = document["retry"]
    return JobSpec(
        target=Target(
            TargetKind(target["kind"]),
            target["address"],
            target["input"],
            (session[0], session[1]) if session else None,
        ),
        repeat=Repeat(
            cron=repeat["cron"],
            every=_delta(repeat["every"]),
            timezone=repeat["timezone"],
            limit=repeat["limit"],
            end_at=datetime.fromisoformat(repeat["end_at"]) if repeat["end_at"] else None,
        )
        if repeat
        else None,
        retry=JobRetry(max_retries, timedelta(seconds=initial), timedelta(seconds=maximum), jitter),
        overlap=Overlap(document["overlap"]),
        catch_up=timedelta(seconds=document["catch_up"]),
    )
