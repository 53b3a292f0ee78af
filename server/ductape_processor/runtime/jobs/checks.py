"""What makes a job's fields valid, said once for JobService.Schedule and for the manifest's `jobs`: a cron
expression, a time zone, a target the product declares. Each answers the problem as a sentence, or None.

This module imports nothing of the runtime, so the manifest's models (runtime/registry/) can use it.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MAX_CRON_CHARS: Final = 1000
"""Longer than any real expression (every minute listed is 170 characters); parsing is bounded by it (~5 ms)."""
MAX_ZONE_CHARS: Final = 64
MAX_NAME_CHARS: Final = 200
TARGET_KINDS: Final = ("action", "database_action", "notification", "storage", "publish", "feature")
"""The kinds of resource a job runs."""
_DECLARED: Final = {
    "action": ("apps", "actions", "app_tag:action_tag"),
    "database_action": ("databases", "actions", "database_tag:action_tag"),
    "notification": ("notifications", "messages", "notification_tag:message_tag"),
    "publish": ("brokers", "topics", "broker_tag:topic_tag"),
    "storage": ("storage", "", "storage_tag"),
    "feature": ("features", "", "feature_tag"),
}
"""Per kind: the manifest's list of resources, each one's list of addressable parts, and the address's form."""


def time_zone(name: str) -> tzinfo | None:
    """The IANA time zone `name` (empty: UTC); None when there is none of that name."""
    if not name or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone_problem(name: str) -> str | None:
    """Why `name` is not a time zone, or None."""
    if len(name) > MAX_ZONE_CHARS:
        return f"is longer than {MAX_ZONE_CHARS} characters: not an IANA time zone"
    return None if time_zone(name) is not None else f"{name!r} is not an IANA time zone (such as Europe/London)"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a job, or None."""
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    return "must not contain control characters" if any(ord(char) < 32 or ord(char) == 127 for char in name) else None


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a cron expression of 5 or 6 fields that ever matches, or None."""
    if len(expression) > MAX_CRON_CHARS:
        return f"is longer than {MAX_CRON_CHARS} characters"
    fields = len(expression.split())
    if fields not in (5, 6):
        return f"a cron expression has 5 or 6 fields, not {fields}"
    try:
        next(CronSim(expression, _EPOCH))
    except (CronSimError, StopIteration, ValueError) as exc:  # the reason first: a long expression is cut short
        shown = repr(expression) if len(expression) <= 64 else f"{expression[:60]!r}…"
        return f"is not a valid cron expression ({exc}): {shown}"
    return None


def target_problem(manifest: Any, kind: str, address: str) -> str | None:
    """Why `address` names no resource of `kind` in `manifest` (a `Manifest`), or None."""
    section, parts, form = _DECLARED[kind]
    tag, _, part = address.partition(":")
    resource = next((item for item in getattr(manifest, section) if item.tag == tag), None)
    if resource is None or bool(part) != bool(parts):
        return f"{address!r} is not a {kind} of the product (give {form})"
    if parts and part not in {item.tag for item in getattr(resource, parts)}:
        return f"{tag!r} has no {parts[:-1]} {part!r}"
    return None
