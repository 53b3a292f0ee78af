"""The policies every resource kind and adapter share: backoff, retry budgets."""

from __future__ import annotations

import time

from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.retry import MAX_RETRY_AFTER_S, Backoff, RetryBudget


def test_exponential_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.05, 1.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_jittered_backoff_waits_between_half_and_all_of_the_pause() -> None:
    backoff = Backoff(1.0, 10.0)
    assert backoff.delay(3, rand=lambda: 0.0) == 2.0
    assert backoff.delay(3, rand=lambda: 1.0) == 4.0
    assert Backoff(1.0, 10.0, exponential=False).delay(5, rand=lambda: 1.0) == 1.0


async def test_a_budget_sleeps_the_backoff_between_attempts() -> None:
    budget = RetryBudget(Backoff(0.02, 1.0, jitter=False), Deadline(5.0))
    started = time.monotonic()
    assert await budget.pause()
    assert await budget.pause()
    assert time.monotonic() - started >= 0.06
    assert budget.retries == 2


async def test_a_budget_gives_up_at_once_when_the_next_pause_would_pass_its_deadline() -> None:
    budget = RetryBudget(Backoff(0.2, 1.0, jitter=False), Deadline(0.3))
    assert await budget.pause()  # 0.2 s of the 0.3 s
    started = time.monotonic()
    assert not await budget.pause()  # 0.4 s does not fit in what is left
    assert time.monotonic() - started < 0.05
    assert budget.retries == 2 and budget.pause_s == 0.4


async def test_a_budget_honours_an_upstreams_retry_after_within_its_bound() -> None:
    budget = RetryBudget(Backoff(0.01, 0.01), Deadline(None))
    assert await budget.pause(retry_after_s=0.0)
    assert budget.pause_s == 0.0
    limited = RetryBudget(Backoff(0.01, 0.01), Deadline(1.0))
    assert not await limited.pause(retry_after_s=3600.0)
    assert limited.pause_s == MAX_RETRY_AFTER_S
