"""The step types of features, as the manifest checks them: one `StepKind` per resource kind an event may call.

Each says how its `event` names a resource and whether the manifest declares it, whether a call of it is safe to
repeat (a run taken over after its process died repeats a call that may have been in flight only when it is), and
whether the processor always passes a key of its own to it. How each kind runs is `runtime/features/steps.py`, whose
table has the same names (a test keeps them equal). This module imports nothing of the runtimes, so the manifest's
compilation (`runtime/features/plan.py`) can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ductape_processor.runtime.jobs.checks import TARGET_KINDS, target_problem
from ductape_processor.runtime.registry.databases import READ_TYPES
from ductape_processor.runtime.registry.manifest import Manifest

_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class StepKind:
    """One step type: how its `event` is checked, and how its calls may be repeated."""

    form: str
    """How an event of this type names its resource, for problems."""
    problem: Callable[[Manifest, str], str | None]
    """Why `event` names no resource of this type in the manifest, or None."""
    safe: Callable[[Manifest, str], bool]
    """Whether a call of the resource is safe to repeat without a key (a read, an overwrite, a PUT)."""
    keyed: bool = False
    """The processor passes every call a key of its own (one per run and event), so a repeat finds the first."""
    caches: bool = False
    """An event of this type may name a cache."""


def _declared(kind: str) -> Callable[[Manifest, str], str | None]:
    return lambda manifest, event: target_problem(manifest, kind, event)


def _safe_when(section: str, parts: str, test: Callable[[Any], bool]) -> Callable[[Manifest, str], bool]:
    """Safe to repeat when the `tag:part` the event names passes `test` (a GET action, a read)."""

    def safe(manifest: Manifest, event: str) -> bool:
        tag, _, part = event.partition(":")
        resource = next((item for item in getattr(manifest, section) if item.tag == tag), None)
        return resource is not None and any(item.tag == part and test(item) for item in getattr(resource, parts))

    return safe


def _job_problem(manifest: Manifest, event: str) -> str | None:
    kind, _, address = event.partition(":")
    if kind not in TARGET_KINDS:
        return f"{event!r} is not a job's target: give kind:address, kind one of {', '.join(TARGET_KINDS)}"
    return target_problem(manifest, kind, address)


def _webhook_problem(manifest: Manifest, event: str) -> str | None:
    tag, _, event_tag = event.partition(":")
    webhook = next((item for item in manifest.webhooks if item.tag == tag), None)
    if webhook is None or not event_tag:
        return f"{event!r} is not a webhook event of the product (give webhook_tag:event_tag)"
    return None if webhook.event(event_tag) is not None else f"webhook {tag!r} has no event {event_tag!r}"


def _feature_problem(manifest: Manifest, event: str) -> str | None:
    return None if any(feature.tag == event for feature in manifest.features) else f"no feature {event!r}"


def _never(manifest: Manifest, event: str) -> bool:
    return False


def _always(manifest: Manifest, event: str) -> bool:
    return True


STEP_KINDS: Final[dict[str, StepKind]] = {
    "action": StepKind(
        "app_tag:action_tag",
        _declared("action"),
        _safe_when("apps", "actions", lambda action: action.method in _SAFE_METHODS),
        caches=True,
    ),
    "database_action": StepKind(
        "database_tag:action_tag",
        _declared("database_action"),
        _safe_when("databases", "actions", lambda action: action.type in READ_TYPES),
        caches=True,
    ),
    "notification": StepKind("notification_tag:message_tag", _declared("notification"), _never),
    # A save of the same rendered input writes the same file again.
    "storage": StepKind("storage_tag", _declared("storage"), _always),
    "publish": StepKind("broker_tag:topic_tag", _declared("publish"), _never),
    "job": StepKind("kind:address (publish:events:user-created)", _job_problem, _always, keyed=True),
    "webhook": StepKind("webhook_tag:event_tag", _webhook_problem, _always, keyed=True),
    "feature": StepKind("feature_tag", _feature_problem, _always, keyed=True),
}
"""Step type -> what the manifest checks of it."""
