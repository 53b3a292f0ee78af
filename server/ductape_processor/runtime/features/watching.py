"""Following runs: the changes this replica makes to the runs it executes, fanned out to the Watch streams that
follow them (`RunEvents`), a run as a caller reads it (`run_view`), and one Watch stream's life (`follow`): what was
recorded first, then each change, until the run ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from ductape_processor.runtime.features.model import RunView, StepView, WatchEvent
from ductape_processor.runtime.features.plan import FeaturePlan
from ductape_processor.store.feature_records import GOING, FeatureRunRecord, FeatureStepRecord, Phase


class RunEvents:
    """A run's changes this replica makes, handed to whoever follows them (`runtime.py`'s watchers)."""

    def __init__(self) -> None:
        self._followers: dict[str, set[Callable[[WatchEvent], None]]] = {}

    def follow(self, run_id: str, follower: Callable[[WatchEvent], None]) -> Callable[[], None]:
        """Call `follower` with each change of the run; returns how to stop."""
        self._followers.setdefault(run_id, set()).add(follower)

        def stop() -> None:
            followers = self._followers.get(run_id)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._followers[run_id]

        return stop

    def publish(self, run_id: str, event: WatchEvent) -> None:
        """Hand `event` to the run's followers."""
        for follower in list(self._followers.get(run_id, ())):
            follower(event)

    def followed(self, run_id: str) -> bool:
        """Whether anyone follows the run (events are built only then)."""
        return run_id in self._followers

    def queue(self, run_id: str, size: int) -> Changes:
        """The run's changes from now on, in a queue of at most `size` (a reader that far behind loses the oldest:
        later changes of the same event say more); `Changes.stop` ends the following."""
        changes = Changes(size)

        def push(event: WatchEvent) -> None:
            if changes.full():
                changes.get_nowait()
            changes.put_nowait(event)

        changes.stop = self.follow(run_id, push)
        return changes


class Changes(asyncio.Queue[WatchEvent]):
    """The changes of one followed run, as they come; `stop` ends the following."""

    stop: Callable[[], None]


def run_view(
    plan: FeaturePlan | None, run: FeatureRunRecord, records: Mapping[tuple[str, str, Phase], FeatureStepRecord]
) -> RunView:
    """The run with its events in the order the feature declares them (recorded calls of events the plan does not
    know, from a version this processor cannot read, are left out)."""
    if plan is None:
        return RunView(run)
    steps = tuple(
        StepView(
            event.sequence,
            event.tag,
            event.call.kind,
            records.get((event.sequence, event.tag, Phase.CALL)),
            records.get((event.sequence, event.tag, Phase.ROLLBACK)),
        )
        for event in plan.events
    )
    return RunView(run, steps)


async def follow(
    changes: Changes, read: Callable[[], Awaitable[RunView]], here: Callable[[], bool], poll_s: float
) -> AsyncIterator[WatchEvent]:
    """A Watch stream: the run's recorded events (`read()`), then each change until the run ends. While the run is
    not executed here (`here()`), the store is read every `poll_s` instead, and what changed is sent."""
    seen: dict[tuple[str, str], StepView] = {}

    def fresh(step: StepView) -> bool:
        if seen.get((step.sequence, step.event)) == step:
            return False
        seen[(step.sequence, step.event)] = step
        return step.call is not None or step.rollback is not None

    try:
        view: RunView | None = await read()
        while True:
            if view is not None:
                for step in view.steps:
                    if fresh(step):
                        yield WatchEvent(step, view.run.status)
                if view.run.status not in GOING:
                    yield WatchEvent(None, view.run.status, view)
                    return
                view = None
            try:
                event = await asyncio.wait_for(changes.get(), poll_s)
            except TimeoutError:
                if not here():
                    view = await read()  # another replica runs it: read what it recorded
                continue
            if event.step is not None and fresh(event.step):
                yield event
            elif event.ended is not None:
                yield event
                return
    finally:
        changes.stop()
