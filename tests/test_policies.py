"""The policies every resource kind and adapter share: backoff, retry budgets, time limits, paging, bounded caches."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.policies.deadline import Deadline, Timeouts
from ductape_processor.runtime.policies.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    decode_page_token,
    effective_page_size,
    encode_page_token,
    page,
    time_position,
    version_position,
)
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


async def test_time_limits_end_each_await_at_its_own_limit_and_leave_the_rest_alone() -> None:
    timeouts = Timeouts()
    ended: dict[str, tuple[str, float]] = {}
    started = time.monotonic()

    async def limited(name: str, limit_s: float, work_s: float) -> None:
        try:
            await timeouts.within(limit_s, asyncio.sleep(work_s))
            outcome = "done"
        except TimeoutError:
            outcome = "timed out"
        ended[name] = (outcome, time.monotonic() - started)

    await asyncio.gather(
        limited("late", 0.3, 5.0),
        limited("early", 0.1, 5.0),
        limited("quick", 5.0, 0.01),
        limited("in time", 0.5, 0.2),
    )
    assert {name: outcome for name, (outcome, _) in ended.items()} == {
        "late": "timed out",
        "early": "timed out",
        "quick": "done",
        "in time": "done",
    }
    assert 0.09 <= ended["early"][1] < 0.25 and 0.29 <= ended["late"][1] < 0.45
    assert await timeouts.within(0.05, asyncio.sleep(0, "value")) == "value"
    assert timeouts._heap == [], "nothing is kept for awaits that ended"


async def test_a_cancellation_from_elsewhere_stays_one_within_a_time_limit() -> None:
    timeouts = Timeouts()
    task = asyncio.ensure_future(timeouts.within(5.0, asyncio.sleep(5.0)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # the limit passing together with a cancellation from elsewhere: still a cancellation, as asyncio.timeout does
    async def both() -> None:
        current = asyncio.current_task()
        assert current is not None
        asyncio.get_running_loop().call_later(0.05, current.cancel)
        await timeouts.within(0.05, asyncio.sleep(1.0))

    task = asyncio.ensure_future(both())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_inner_time_limit_ends_the_inner_await_only() -> None:
    timeouts = Timeouts()

    async def outer() -> str:
        with pytest.raises(TimeoutError):
            await timeouts.within(0.05, asyncio.sleep(1.0))
        return await timeouts.within(0.05, asyncio.sleep(0.01, "outer goes on"))

    assert await timeouts.within(2.0, outer()) == "outer goes on"


def test_a_page_token_reads_back_only_in_its_own_listing() -> None:
    sessions = ("sessions", "shop", "dev", "user", "")
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    token = encode_page_token(sessions, (moment.timestamp(), "s-1"))
    assert decode_page_token(sessions, token, time_position) == (moment, "s-1")
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(("sessions", "shop", "dev", "user", "u-1"), token, time_position)  # other filters
    assert refused.value.violations[0].field == "page_token"
    with pytest.raises(InvalidArgument):
        decode_page_token(("versions", "shop"), token, version_position)  # another listing


@pytest.mark.parametrize(
    "position",
    [
        pytest.param((1e300, "s-1"), id="time out of range"),  # was an OverflowError (INTERNAL) in sessions
        pytest.param((float("inf"), "s-1"), id="infinite time"),
        pytest.param(("yesterday", "s-1"), id="time not a number"),
        pytest.param((1.0,), id="id missing"),
        pytest.param((1.0, 7), id="id not text"),
    ],
)
def test_a_page_token_whose_position_does_not_read_is_invalid_argument(position: tuple[object, ...]) -> None:
    listing = ("executions", "shop")
    token = encode_page_token(listing, position)  # type: ignore[arg-type]  # positions no listing writes
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(listing, token, time_position)
    assert refused.value.violations[0].field == "page_token"


@pytest.mark.parametrize("token", ["junk", "", "!!!", "bnVsbA", "WzEsMiwzXQ"])  # junk, null, [1,2,3]
def test_a_page_token_that_is_not_one_is_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_page_token(("versions", "shop"), token, version_position)


def test_a_page_keeps_size_items_and_a_token_only_when_more_follow() -> None:
    listing = ("versions", "shop")
    kept, token = page([5, 4, 3], 2, listing, lambda version: (version,))
    assert kept == [5, 4] and decode_page_token(listing, token, version_position) == 4
    assert page([2, 1], 2, listing, lambda version: (version,)) == ([2, 1], "")


def test_a_page_stops_before_its_items_outweigh_the_page_bytes_and_keeps_one_at_least() -> None:
    listing = ("runs", "shop")
    third = MAX_PAGE_BYTES // 3 + 1
    kept, token = page([9, 8, 7, 6], 100, listing, lambda n: (n,), lambda _: third)
    assert kept == [9, 8] and decode_page_token(listing, token, version_position) == 8
    kept, token = page([9, 8], 100, listing, lambda n: (n,), lambda _: MAX_PAGE_BYTES * 5)
    assert kept == [9] and decode_page_token(listing, token, version_position) == 9
    assert page([9], 100, listing, lambda n: (n,), lambda _: MAX_PAGE_BYTES * 5) == ([9], "")
    assert page([9, 8], 100, listing, lambda n: (n,), lambda _: 10) == ([9, 8], "")


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert effective_page_size(0) == DEFAULT_PAGE_SIZE
    assert effective_page_size(7) == 7
    assert effective_page_size(10**6) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument):
        effective_page_size(-1)


def test_a_bounded_cache_evicts_the_least_recently_used_entry() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
    cache.put("a", 10)  # rewriting keeps the size
    assert len(cache) == 2 and cache.pop("a") == 10 and cache.get("a") is None
