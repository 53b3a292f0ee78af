"""The manifest's `features`: durable multi-step workflows (docs/features.md). A feature has an input contract, a
`sequence` of steps whose `parents` form a DAG, events inside each step that call the product's other resources, and
an `output` template. The models check each field; what relates fields to each other (the DAG, `$Sequence`
references, the resources the events name) is checked when the feature is compiled (`runtime/features/plan.py`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final, Literal

from pydantic import Field, JsonValue, field_validator

from ductape_processor.runtime.registry.durations import PositiveDuration
from ductape_processor.runtime.registry.fields import ManifestModel, NamedResource, Schema, Tag

MAX_SEQUENCES: Final = 100
"""Steps (sequences) one feature holds at most."""
MAX_EVENTS: Final = 50
"""Events one step (sequence) holds at most."""
MAX_LOOP: Final = 1000
"""The highest `do_while.max`: a loop is always bounded."""

StepTypeName = Literal["action", "database_action", "notification", "storage", "publish", "job", "webhook", "feature"]
"""The resource kinds an event calls (one registration each, `runtime/features/kinds.py`)."""
Comparator = Literal["==", "!=", ">", "<", ">=", "<="]


class Comparison(ManifestModel):
    """`left op right`, both sides templates (`$Input{plan}`, `$Sequence{s}{e}{count}`, a literal): `==` and `!=`
    compare JSON values exactly, the others two numbers or two strings."""

    left: JsonValue = Field(description="A template: what is compared.")
    op: Comparator = "=="
    right: JsonValue = Field(True, description="A template: what it is compared with (default true).")


def _all_of(value: object) -> object:
    """One comparison, or a list of them that must all hold."""
    return [value] if isinstance(value, dict) else value


class Loop(ManifestModel):
    """Run the event again while `condition` holds after a run (reading its own output through `$Sequence`), at
    most `max` runs in all."""

    condition: list[Comparison] = Field(min_length=1, description="One comparison, or a list that must all hold.")
    max: int = Field(ge=1, le=MAX_LOOP, description="The most runs of the event.")

    _condition = field_validator("condition", mode="before")(_all_of)


class Compensation(ManifestModel):
    """What undoes a completed event when the run rolls back: a resource call of its own."""

    type: StepTypeName
    event: str = Field(min_length=1, max_length=300, description="The resource, as the event's own `event`.")
    input: JsonValue = Field(
        default_factory=dict, description="A template; may read the event's output through `$Sequence`."
    )


class FeatureEvent(ManifestModel):
    """One call of a step: a resource of the product, its input, and how the run treats its failures."""

    tag: Tag
    type: StepTypeName
    event: str = Field(
        min_length=1,
        max_length=300,
        description="The resource: `app:action`, `database:action`, `notification:message`, `storage`, "
        "`broker:topic`, `kind:address` of a job's target, `webhook:event`, or a feature's tag.",
    )
    input: JsonValue = Field(default_factory=dict, description="A template of the resource's input.")
    retries: int = Field(0, ge=0, le=20, description="Attempts after the first when the call fails.")
    allow_fail: bool = Field(False, description="A failure (after the retries) does not fail the run.")
    cache: Tag | None = Field(None, description="A cache's tag (actions and database actions).")
    condition: list[Comparison] | None = Field(
        None, description="One comparison, or a list that must all hold; when false the event is skipped."
    )
    do_while: Loop | None = None
    timeout: PositiveDuration | None = Field(None, description="How long one attempt may take (default 5m).")
    idempotency_key: str | None = Field(
        None,
        max_length=1000,
        description="`auto` (one key per run and event) or a template; passed on to the resource's call.",
    )
    idempotent: bool = Field(False, description="The call is safe to repeat (a run taken over may repeat it).")
    critical: bool = Field(False, description="Rolled back under the `critical_only` strategy.")
    rollback: Compensation | None = None

    _condition = field_validator("condition", mode="before")(_all_of)


class FeatureSequence(ManifestModel):
    """A step: it starts once every parent step is done; its events run concurrently."""

    tag: Tag
    parents: list[Tag] = Field(default_factory=list, description="Steps that must be done first.")
    events: list[FeatureEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class Feature(NamedResource):
    """A durable workflow of the product's resources, run by FeatureService."""

    input: Schema = Field(default_factory=dict, description='The input contract (`0`, `""`, `false` are values).')
    sequence: list[FeatureSequence] = Field(min_length=1, max_length=MAX_SEQUENCES)
    output: JsonValue = Field(None, description="A template of the run's output.")
    rollback_strategy: Literal["reverse_all", "critical_only", "none"] = Field(
        "reverse_all", description="Which completed events are undone when the run fails."
    )
    retention: PositiveDuration = Field(timedelta(days=30), description="How long an ended run is kept.")

    def event(self, sequence: str, tag: str) -> FeatureEvent | None:
        """The event `tag` of step `sequence`, if the feature has it."""
        for step in self.sequence:
            if step.tag == sequence:
                return next((event for event in step.events if event.tag == tag), None)
        return None
