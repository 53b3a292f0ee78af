"""The values of feature runs: what a caller asks for (`RunCall`, `RunRef`), what it reads back (`RunView`,
`StepView`, `WatchEvent`). The store keeps runs and calls (`FeatureRunRecord`, `FeatureStepRecord`); this module
says how a caller sees them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Re-exported: the API layer reads the states and records through the runtime, never from the store.
from ductape_processor.store.feature_records import FeatureRunRecord as FeatureRunRecord
from ductape_processor.store.feature_records import FeatureRunStatus as FeatureRunStatus
from ductape_processor.store.feature_records import FeatureStepRecord as FeatureStepRecord
from ductape_processor.store.feature_records import StepStatus as StepStatus


@dataclass(frozen=True, slots=True)
class RunCall:
    """What a caller asks FeatureService.Run for (or what Replay and a `feature` event start)."""

    product: str
    env: str
    feature: str
    input: dict[str, Any] = field(default_factory=dict)
    session: tuple[str, str] | None = None
    idempotency_key: str = ""
    version: int | None = None
    replay_of: str = ""
    parent_run: str = ""


@dataclass(frozen=True, slots=True)
class RunRef:
    """A run as a call names it: within a product's environment, by its id."""

    product: str
    env: str
    process_id: str


@dataclass(frozen=True, slots=True)
class StepView:
    """One event of a run as a caller reads it: its call and its compensation as recorded (None: not yet)."""

    sequence: str
    event: str
    type: str
    call: FeatureStepRecord | None
    rollback: FeatureStepRecord | None


@dataclass(frozen=True, slots=True)
class RunView:
    """A run and (when read with them) its events, in the order the feature declares them."""

    run: FeatureRunRecord
    steps: tuple[StepView, ...] = ()


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of a watched run: the event that changed (None when the run itself did), the run's status, and on
    the last event the ended run."""

    step: StepView | None
    status: FeatureRunStatus
    ended: RunView | None = None
