"""Deadlines: the time a call (or a retry budget) has left, as a monotonic instant; time limits on awaits."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Deadline:
    """The time a call has left: the caller's gRPC deadline, if any, as a monotonic instant."""

    __slots__ = ("at",)

    def __init__(self, remaining_s: float | None) -> None:
        self.at = None if remaining_s is None else time.monotonic() + remaining_s

    def remaining(self) -> float | None:
        """Seconds left, or None when the caller set no deadline."""
        return None if self.at is None else self.at - time.monotonic()

    def bound(self, timeout_s: float) -> float:
        """`timeout_s`, shortened to what is left of the deadline."""
        at = self.at  # `remaining()` written out: a call fewer on every send
        return timeout_s if at is None else min(timeout_s, at - time.monotonic())


class Timeouts:
    """Time limits for many awaits at once, on one timer of the event loop: what `asyncio.timeout` does (the task
    is cancelled when its limit passes and the CancelledError that ends the awaited work becomes TimeoutError; a
    cancellation from elsewhere stays a cancellation, even when both come together), for a fifth of the cost.

    `asyncio.timeout` on uvloop costs about 30k instructions a use (callgrind): a Timeout object, its two coroutine
    methods, an enum-driven state machine, and a timer handle of the loop created and closed each time; around a
    single publish that was 4-5 % of the processor's CPU for it. Here a use is a heap entry, and the loop's timer
    is set only for a limit earlier than the one it waits for: with limits of one length, once per limit's length
    however many awaits run meanwhile. The entries of awaits that ended are dropped from the top of the heap as
    they end (they end in about the order they began), or when the timer fires.
    """

    __slots__ = ("_heap", "_loop", "_order", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []  # [when, order, task (None once ended or fired), fired]
        self._order = itertools.count()  # ties of `when` are broken by it: a task is never compared
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def within(self, seconds: float, work: Awaitable[T]) -> T:
        """`await work`, for at most `seconds` (TimeoutError after). Must run in a task."""
        task = asyncio.current_task()
        assert task is not None, "Timeouts.within runs in a task"
        loop = task.get_loop()  # not get_running_loop(): in C it asks the system for the process id each time
        if loop is not self._loop:  # a new loop (tests run several in turn): what the old one held is gone
            self._loop, self._heap, self._timer, self._timer_at = loop, [], None, math.inf
        when = loop.time() + max(seconds, 0.0)
        entry = [when, next(self._order), task, False]
        heap = self._heap
        heapq.heappush(heap, entry)
        if when < self._timer_at:
            self._arm(loop, when)
        cancelling = task.cancelling()
        try:
            return await work
        except asyncio.CancelledError:
            if entry[3] and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            entry[2] = None
            while heap and heap[0][2] is None:
                heapq.heappop(heap)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire), when

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        loop = self._loop
        assert loop is not None
        now = loop.time()
        heap = self._heap
        while heap:
            entry = heap[0]
            task = entry[2]
            if task is not None:
                if entry[0] > now:
                    self._arm(loop, entry[0])
                    return
                entry[2], entry[3] = None, True
                task.cancel()
            heapq.heappop(heap)
