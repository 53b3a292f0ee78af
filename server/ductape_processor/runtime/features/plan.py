"""Features compiled for running, once per product version, while its manifest is validated.

Compiling a feature orders its steps (sequences) by their parents, refusing a cycle or a parent that is not a step of
the feature; checks every event's resource against the manifest through its step type (`kinds.py`); compiles every
template (inputs, conditions, loops, compensations, the output) with the shared engine; and checks that a
`$Sequence{step}{event}` reads an event of a step that is done before the reader starts (an ancestor: a parent, a
parent's parent ...), so that a run never reads a step that may not have run. A feature calling itself, directly or
through other features, is refused too. Every problem is reported with its path in the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from ductape_processor.runtime.features.kinds import STEP_KINDS
from ductape_processor.runtime.registry.features import Comparison, Compensation, Feature, FeatureEvent
from ductape_processor.runtime.registry.manifest import Manifest
from ductape_processor.runtime.templates import Template, TemplateError, compile_template

STEP_TIMEOUT_S: Final = 300.0
"""How long one attempt of an event may take when its `timeout` says nothing."""
AUTO_KEY: Final = "auto"
"""An event's `idempotency_key` that asks the processor for a key of its own, one per run and event."""
_NOT_IN_FEATURES: Final = {
    "Auth": "an app's auth is read by the action's own templates, not by a feature's",
    "Response": "a login response is read by an auth's templates, not by a feature's",
    "Default": "a feature's templates build no field with a default",
}
"""Selectors a feature's templates cannot read, and what they read elsewhere."""

Problems = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ComparisonPlan:
    """One comparison of a condition, its two sides compiled."""

    left: Template
    op: str
    right: Template


@dataclass(frozen=True, slots=True)
class CallPlan:
    """A resource call: its step type, the resource, its input template, and whether it is safe to repeat."""

    kind: str
    address: str
    input: Template
    safe: bool
    keyed: bool
    """The processor passes the call a key of its own (one per run and event)."""


@dataclass(frozen=True, slots=True)
class EventPlan:
    """One event of a step, ready to render and call."""

    sequence: str
    tag: str
    call: CallPlan
    retries: int
    allow_fail: bool
    cache: str
    condition: tuple[ComparisonPlan, ...]
    loop: tuple[ComparisonPlan, ...]
    """The `do_while` condition; empty when the event runs once."""
    loop_max: int
    timeout_s: float
    key: Template | None
    """The `idempotency_key` template; None for none or `auto` (see `auto_key`)."""
    auto_key: bool
    critical: bool
    rollback: CallPlan | None

    @property
    def name(self) -> str:
        """`step.event`, as problems and errors name it."""
        return f"{self.sequence}.{self.tag}"


@dataclass(frozen=True, slots=True)
class SequencePlan:
    """A step: its parents and its events."""

    tag: str
    parents: tuple[str, ...]
    events: tuple[EventPlan, ...]


@dataclass(frozen=True, slots=True)
class FeaturePlan:
    """One feature: its model, its steps in an order where parents come first, its output template."""

    feature: Feature
    sequences: tuple[SequencePlan, ...]
    output: Template
    sinks: frozenset[str]
    """The steps no other step waits for: only the run's end reads them."""

    @property
    def events(self) -> Iterator[EventPlan]:
        """Every event, step by step."""
        for sequence in self.sequences:
            yield from sequence.events


FeaturePlans = Mapping[str, FeaturePlan]
"""Feature tag -> plan."""


def _ordered(feature: Feature, where: str, problems: Problems) -> tuple[list[int], dict[str, set[str]]]:
    """The feature's steps (indexes) with parents first, and each step's ancestors; cycles and unknown parents are
    problems (the steps in a cycle are left out of the order)."""
    index = {step.tag: i for i, step in enumerate(feature.sequence)}
    for i, step in enumerate(feature.sequence):
        for p, parent in enumerate(step.parents):
            if parent not in index:
                problems.append((f"{where}.sequence[{i}].parents[{p}]", f"{parent!r} is not a step of the feature"))
            elif parent == step.tag:
                problems.append((f"{where}.sequence[{i}].parents[{p}]", "a step cannot be its own parent"))
    order: list[int] = []
    ancestors: dict[str, set[str]] = {}
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(tag: str, trail: list[str]) -> bool:
        if state.get(tag) == 2:
            return True
        if state.get(tag) == 1:
            cycle = [*trail[trail.index(tag) :], tag]
            problems.append(
                (f"{where}.sequence[{index[tag]}].parents", f"the parents form a cycle: {' -> '.join(cycle)}")
            )
            return False
        state[tag] = 1
        found: set[str] = set()
        fine = True
        for parent in feature.sequence[index[tag]].parents:
            if parent in index and parent != tag:
                fine = visit(parent, [*trail, tag]) and fine
                found |= {parent, *ancestors.get(parent, ())}
        state[tag] = 2
        ancestors[tag] = found
        if fine:
            order.append(index[tag])
        return fine

    for step in feature.sequence:
        visit(step.tag, [])
    return order, ancestors


class _Compiler:
    """Compiles one feature's templates and checks what they read."""

    def __init__(self, manifest: Manifest, feature: Feature, problems: Problems) -> None:
        self.manifest = manifest
        self.feature = feature
        self.problems = problems
        self.events = {step.tag: {event.tag for event in step.events} for step in feature.sequence}

    def template(self, value: object, path: str, readable: set[str] | None, own: tuple[str, str] | None) -> Template:
        """`value` compiled; `readable`: the steps its `$Sequence` may read (None: any), `own`: an event it may read
        besides them (its own output)."""
        try:
            template = compile_template(value, path)  # type: ignore[arg-type]
        except TemplateError as exc:
            self.problems.append((exc.path, exc.reason))
            return compile_template(None, path)
        for ref in template.references:
            why = self._reference_problem(ref.kind, ref.keys, readable, own)
            if why is not None:
                self.problems.append((ref.path or path, f"{ref.text}: {why}"))
        return template

    def _reference_problem(
        self, kind: str, keys: tuple[str | int, ...], readable: set[str] | None, own: tuple[str, str] | None
    ) -> str | None:
        if kind in _NOT_IN_FEATURES:
            return _NOT_IN_FEATURES[kind]
        if kind == "Input" and keys and self.feature.input and keys[0] not in self.feature.input:
            return f"the feature's input has no field {keys[0]!r}"
        if kind != "Sequence":
            return None
        step, event = str(keys[0]), str(keys[1])
        if step not in self.events:
            return f"the feature has no step {step!r}"
        if event not in self.events[step]:
            return f"step {step!r} has no event {event!r}"
        if readable is None or step in readable or own == (step, event):
            return None
        return f"step {step!r} is not an ancestor of this step: it may not have run yet (add it to parents)"

    def condition(
        self, comparisons: list[Comparison], path: str, readable: set[str], own: tuple[str, str] | None
    ) -> tuple[ComparisonPlan, ...]:
        return tuple(
            ComparisonPlan(
                self.template(c.left, f"{path}[{i}].left", readable, own),
                c.op,
                self.template(c.right, f"{path}[{i}].right", readable, own),
            )
            for i, c in enumerate(comparisons)
        )

    def call(
        self, kind: str, address: str, value: object, path: str, readable: set[str], own: tuple[str, str] | None
    ) -> CallPlan:
        step_kind = STEP_KINDS[kind]
        problem = step_kind.problem(self.manifest, address)
        if problem is not None:
            self.problems.append((f"{path}.event", problem))
        return CallPlan(
            kind,
            address,
            self.template(value, f"{path}.input", readable, own),
            problem is None and step_kind.safe(self.manifest, address),
            step_kind.keyed,
        )

    def event(self, event: FeatureEvent, sequence: str, path: str, readable: set[str]) -> EventPlan:
        own = (sequence, event.tag)
        call = self.call(event.type, event.event, event.input, path, readable, None)
        if event.cache is not None:
            if not STEP_KINDS[event.type].caches:
                self.problems.append((f"{path}.cache", f"a {event.type} event takes no cache"))
            elif all(cache.tag != event.cache for cache in self.manifest.caches):
                self.problems.append((f"{path}.cache", f"no cache {event.cache!r}"))
        auto = event.idempotency_key == AUTO_KEY
        key = (
            self.template(event.idempotency_key, f"{path}.idempotency_key", readable, None)
            if event.idempotency_key is not None and not auto
            else None
        )
        rollback = self._rollback(event.rollback, f"{path}.rollback", readable, own)
        return EventPlan(
            sequence=sequence,
            tag=event.tag,
            call=CallPlan(
                call.kind,
                call.address,
                call.input,
                call.safe or event.idempotent or event.idempotency_key is not None,
                call.keyed,
            ),
            retries=event.retries,
            allow_fail=event.allow_fail,
            cache=event.cache or "",
            condition=self.condition(event.condition or [], f"{path}.condition", readable, None),
            loop=self.condition(event.do_while.condition, f"{path}.do_while.condition", readable, own)
            if event.do_while is not None
            else (),
            loop_max=event.do_while.max if event.do_while is not None else 1,
            timeout_s=event.timeout.total_seconds() if event.timeout is not None else STEP_TIMEOUT_S,
            key=key,
            auto_key=auto,
            critical=event.critical,
            rollback=rollback,
        )

    def _rollback(
        self, rollback: Compensation | None, path: str, readable: set[str], own: tuple[str, str]
    ) -> CallPlan | None:
        if rollback is None:
            return None
        return self.call(rollback.type, rollback.event, rollback.input, path, readable, own)


def _duplicates(tags: list[str], where: str, what: str) -> Iterator[tuple[str, str]]:
    seen: dict[str, int] = {}
    for i, tag in enumerate(tags):
        if tag in seen:
            yield f"{where}[{i}].tag", f"{what} {tag!r} is already used by {where}[{seen[tag]}]"
        seen.setdefault(tag, i)


def _compile_feature(manifest: Manifest, feature: Feature, where: str, problems: Problems) -> FeaturePlan:
    problems.extend(_duplicates([step.tag for step in feature.sequence], f"{where}.sequence", "step"))
    for i, step in enumerate(feature.sequence):
        problems.extend(_duplicates([e.tag for e in step.events], f"{where}.sequence[{i}].events", "event"))
    order, ancestors = _ordered(feature, where, problems)
    compiler = _Compiler(manifest, feature, problems)
    sequences: list[SequencePlan] = []
    for i in order:
        step = feature.sequence[i]
        readable = ancestors[step.tag]
        events = tuple(
            compiler.event(event, step.tag, f"{where}.sequence[{i}].events[{e}]", readable)
            for e, event in enumerate(step.events)
        )
        sequences.append(SequencePlan(step.tag, tuple(step.parents), events))
    output = compiler.template(feature.output, f"{where}.output", None, None)
    sinks = frozenset(step.tag for step in feature.sequence) - {p for step in feature.sequence for p in step.parents}
    return FeaturePlan(feature, tuple(sequences), output, sinks)


def _calls(feature: Feature) -> Iterator[tuple[str, str]]:
    """(path under the feature, called feature) of each event and compensation that runs a feature."""
    for i, step in enumerate(feature.sequence):
        for e, event in enumerate(step.events):
            path = f"sequence[{i}].events[{e}]"
            if event.type == "feature":
                yield f"{path}.event", event.event
            if event.rollback is not None and event.rollback.type == "feature":
                yield f"{path}.rollback.event", event.rollback.event


def _recursion_problems(manifest: Manifest) -> Iterator[tuple[str, str]]:
    """A feature that runs itself, directly or through others, would never end: each such call is a problem."""
    calls = {feature.tag: list(_calls(feature)) for feature in manifest.features}
    index = {feature.tag: i for i, feature in enumerate(manifest.features)}

    def reaches(start: str, goal: str, seen: set[str]) -> list[str] | None:
        for _, called in calls.get(start, ()):
            if called == goal:
                return [called]
            if called in calls and called not in seen:
                seen.add(called)
                rest = reaches(called, goal, seen)
                if rest is not None:
                    return [called, *rest]
        return None

    for tag, made in calls.items():
        for path, called in made:
            if called == tag:
                chain = [tag, tag]
            else:
                rest = reaches(called, tag, {called}) if called in calls else None
                if rest is None:
                    continue
                chain = [tag, called, *rest]
            yield f"features[{index[tag]}].{path}", f"the feature would run itself: {' -> '.join(chain)}"


def compile_features(manifest: Manifest) -> tuple[dict[str, FeaturePlan], Problems]:
    """Every feature of a manifest compiled, and every problem found (path in the manifest, why)."""
    plans: dict[str, FeaturePlan] = {}
    problems: Problems = []
    for f, feature in enumerate(manifest.features):
        before = len(problems)
        plan = _compile_feature(manifest, feature, f"features[{f}]", problems)
        if len(problems) == before:
            plans[feature.tag] = plan
    problems.extend(_recursion_problems(manifest))
    return plans, problems
