"""The one retry layer of storage calls: the runtime's, which knows the caller's deadline and which calls are safe to
repeat. The providers' clients make a single attempt each (adapters/storage/), so a provider that cannot be reached
is answered UNAVAILABLE after this layer's few attempts, never after the SDK's retries multiplied by ours.

A call's attempts, and the pauses between them, end before the caller's deadline less an answer margin: no pause is
slept, and no attempt started, that could not end by then, and each attempt is cut at that moment. The caller then
gets STORAGE_UNAVAILABLE naming the storage, the provider and the operation, instead of racing its own timer to a
bare DEADLINE_EXCEEDED. A caller with no deadline gets RETRY_LIMIT_S.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from ductape_processor.adapters.storage.base import StorageUnavailable
from ductape_processor.runtime.policies import Backoff, Deadline, RetryBudget

RETRIES: Final = 3
"""More attempts after the first, at most, of a call (or a step of a save) that is safe to repeat."""
RETRY_BACKOFF: Final = Backoff(0.1, 2.0)
"""Pauses before the retries: 50-100 ms, 100-200 ms, 200-400 ms (jittered)."""
RETRY_LIMIT_S: Final = 10.0
"""How long a repeatable call keeps trying a provider that does not answer, when the caller's deadline is later or
absent. For a read or listing this bounds the whole call; for a step of a save (whose one attempt may take as long as
its bytes need) it bounds the retries after the step first failed."""
ATTEMPT_TIMEOUT_S: Final = 5.0
"""The longest one attempt of a metadata call (a file's description, a listing, a delete, signing) may take: they
answer in well under a second, so five seconds without an answer is a connection that hung; the next attempt opens
another."""
ANSWER_MARGIN_S: Final = 0.5
"""Time kept before the caller's deadline to answer UNAVAILABLE: the answer's way back (a round trip on a network;
gRPC's deadline starts on the server when the request arrives) and an event loop busy with other calls. A caller's
deadline of less than 2 s keeps a quarter of it instead (ANSWER_MARGIN_SHARE)."""
ANSWER_MARGIN_SHARE: Final = 0.25
MIN_ATTEMPT_S: Final = 0.1
"""The least time a retry must have left after its pause to be started: one that would be cut at once is not."""
T = TypeVar("T")


class Attempts:
    """The attempts of one storage call against one provider, within the caller's deadline (`deadline`)."""

    __slots__ = ("_answer_by", "_provider", "_storage")

    def __init__(self, storage: str, provider: str, deadline: Deadline) -> None:
        self._storage = storage
        self._provider = provider
        left = deadline.remaining()
        self._answer_by = (
            None if left is None else Deadline(left - min(ANSWER_MARGIN_S, max(left, 0.0) * ANSWER_MARGIN_SHARE))
        )

    def _window(self) -> Deadline:
        """RETRY_LIMIT_S from now, or less: until the moment to answer the caller by."""
        if self._answer_by is None:
            return Deadline(RETRY_LIMIT_S)
        return Deadline(self._answer_by.bound(RETRY_LIMIT_S))

    async def metadata(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """`operation` (a file's description, a listing, a delete, signing: answers without a body to move), tried
        again while the provider is unavailable, each attempt at most ATTEMPT_TIMEOUT_S, all within RETRY_LIMIT_S
        and the caller's deadline."""
        return await self._run(what, operation, ATTEMPT_TIMEOUT_S, self._window())

    async def step(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """`operation` (a step whose bytes are in hand: a whole small file, a part, a commit, a small file read
        whole), tried again while the provider is unavailable; an attempt is bounded only by the caller's deadline
        (moving bytes takes what it takes), and retries happen within RETRY_LIMIT_S of the first failure."""
        return await self._run(what, operation, None, None)

    async def _run(
        self, what: str, operation: Callable[[], Awaitable[T]], attempt_s: float | None, window: Deadline | None
    ) -> T:
        budget: RetryBudget | None = None
        while True:
            timeout = self._timeout(attempt_s, window)
            try:
                if timeout is not None and timeout <= 0:
                    raise self._late(what, 0.0)
                async with asyncio.timeout(timeout) as limit:
                    return await operation()
            except TimeoutError:
                if not limit.expired():
                    raise
                error = self._late(what, timeout or 0.0)
            except StorageUnavailable as exc:
                error = exc
            if budget is None:
                # Built at the first failure (most calls have none): a retry's pause must leave it MIN_ATTEMPT_S.
                ends = window or self._window()
                budget = RetryBudget(RETRY_BACKOFF, Deadline(ends.bound(RETRY_LIMIT_S) - MIN_ATTEMPT_S))
            if budget.retries >= RETRIES or not await budget.pause():
                raise error from None

    def _timeout(self, attempt_s: float | None, window: Deadline | None) -> float | None:
        """The time the next attempt may take: its own limit, cut to the window and the moment to answer by."""
        limits = [attempt_s, *(ends.remaining() for ends in (window, self._answer_by) if ends is not None)]
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    def _late(self, what: str, seconds: float) -> StorageUnavailable:
        return StorageUnavailable(
            f"storage {self._storage!r} ({self._provider}): {what} failed: no answer within {seconds:.1f} s",
            metadata={"storage": self._storage, "provider": self._provider},
        )
