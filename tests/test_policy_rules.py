"""Retry rules, Retry-After and the circuit breaker at their edges, which a mutation run showed no test would notice
(docs/mutation.md): which statuses a manifest's `on` list retries, the backoff kind, Retry-After dates, and the
breaker's cool-down, single probe and release."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ductape_processor.runtime.policies.breaker import CircuitBreaker, CircuitOpen
from ductape_processor.runtime.policies.retry import RetryRules, parse_retry_after
from ductape_processor.runtime.registry.manifest import RetryPolicy


def test_every_rule_of_the_on_list_is_read_wherever_network_stands() -> None:
    rules = RetryRules.from_policy(RetryPolicy(on=["network", "503", "429", "500-502"]))
    assert rules.network and rules.statuses == frozenset({429, 500, 501, 502, 503})
    assert not RetryRules.from_policy(RetryPolicy(on=["503"])).network


def test_the_backoff_kind_is_the_manifests() -> None:
    assert RetryRules.from_policy(RetryPolicy(backoff="exponential")).backoff.exponential
    assert not RetryRules.from_policy(RetryPolicy(backoff="constant")).backoff.exponential


def test_retry_after_reads_seconds_and_dates_with_or_without_a_zone() -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 -0000", now) == 10.0  # no zone: read as UTC
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # past: retry now
    for unreadable in ("soon", "1.5", "-3", "Wed, 32 Oct 2015 07:28:10 GMT", "", None):
        assert parse_retry_after(unreadable, now) is None, unreadable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=2, cooldown_s=30.0, clock=clock)
    breaker.failure()
    breaker.failure()
    return breaker


def test_an_open_circuit_says_when_the_probe_comes_and_lets_one_through_at_the_end_of_its_cooldown() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 10.0
    with pytest.raises(CircuitOpen) as caught:
        breaker.before_call("api")
    assert caught.value.retry_after_s == pytest.approx(20.0)
    clock.now += 20.0  # exactly the cool-down
    breaker.before_call("api")  # the probe
    with pytest.raises(CircuitOpen):
        breaker.before_call("api")  # one probe at a time


def test_a_probe_that_succeeds_closes_the_circuit_for_good() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 30.0
    breaker.before_call("api")
    breaker.success()
    breaker.failure()  # one failure after closing does not reopen (threshold 2)
    breaker.before_call("api")
    breaker.before_call("api")


def test_a_probe_that_ends_without_a_verdict_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 30.0
    breaker.before_call("api")
    breaker.release()  # e.g. the caller cancelled
    breaker.before_call("api")
